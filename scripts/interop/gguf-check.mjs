// Prints what an independent GGUF reader (@huggingface/gguf) sees in a file: metadata, tensor count, ggml types.
import { gguf } from "@huggingface/gguf";
const path = process.argv[2];
const { metadata, tensorInfos } = await gguf(path, { allowLocalFile: true });
const keys = Object.keys(metadata).filter(k => !k.startsWith("tokenizer.ggml.tokens") && !k.startsWith("tokenizer.ggml.scores") && !k.startsWith("tokenizer.ggml.token_type"));
for (const k of keys) console.log(k, "=", JSON.stringify(metadata[k], (kk, v) => typeof v === "bigint" ? v.toString() : v));
console.log("tokens:", metadata["tokenizer.ggml.tokens"]?.length, "scores:", metadata["tokenizer.ggml.scores"]?.length);
const types = {};
for (const t of tensorInfos) types[t.dtype] = (types[t.dtype] || 0) + 1;
console.log("tensors:", tensorInfos.length, "by ggml type:", JSON.stringify(types));
console.log("first:", JSON.stringify(tensorInfos[0], (k, v) => typeof v === "bigint" ? v.toString() : v));
