#!/usr/bin/python3
"""Trains qforge's own small TinyStories models on the CPU with Debian's python3-torch (1.13).

Two architectures, both written as Hugging Face checkpoints (model.safetensors in bf16 + config.json +
tokenizer.model) that qforge, transformers and llama.cpp (after `qforge convert`) read:

  dense : LlamaForCausalLM   dim 256, hidden 768, 6 layers, 8 heads / 4 kv heads, untied classifier
  moe   : MixtralForCausalLM dim 256, 4 layers, 8 experts of hidden 256, top-2 router per layer

The vocabulary is stories260K's tok512 (a 512-piece SentencePiece BPE model), so both models share their
tokenizer with the original stories260K checkpoint.

Text: stories separated by one blank line. A training sample starts at a story boundary and is what qforge's
evaluator sees when it tokenizes a text file: BOS, the story with SentencePiece's dummy prefix ("▁Once"), then
the following stories each after "\n\n" (no prefix), cut at seq_len + 1 tokens. The text must be disjoint from
the evaluation text (tinystories-eval.txt); this script checks that no training story appears in the file
given by --eval and refuses to train otherwise.

Deterministic for a given seed, thread count and torch build. Usage (see training/README.md):
  /usr/bin/python3 training/train_tinystories.py --arch dense --train TRAIN.txt --eval EVAL.txt --out DIR
"""
import argparse
import json
import math
import os
import shutil
import struct
import sys
import time

import sentencepiece
import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = {
    "dense": dict(dim=256, hidden=768, layers=6, heads=8, kv_heads=4, experts=0, experts_used=0),
    "moe": dict(dim=256, hidden=256, layers=4, heads=8, kv_heads=4, experts=8, experts_used=2),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
    # Hugging Face's RoPE layout: the first and second halves of each head form the rotated pairs.
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.heads, self.kv_heads = a["heads"], a["kv_heads"]
        self.hd = a["dim"] // a["heads"]
        self.q_proj = nn.Linear(a["dim"], a["heads"] * self.hd, bias=False)
        self.k_proj = nn.Linear(a["dim"], a["kv_heads"] * self.hd, bias=False)
        self.v_proj = nn.Linear(a["dim"], a["kv_heads"] * self.hd, bias=False)
        self.o_proj = nn.Linear(a["heads"] * self.hd, a["dim"], bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        # Scaling q (t x hd) instead of the scores (t x t) saves a pass over the largest tensor.
        att = (q * (1.0 / math.sqrt(self.hd))) @ k.transpose(-1, -2) + mask
        y = att.softmax(-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class Mlp(nn.Module):
    # Llama's SwiGLU; Mixtral names the same three matrices w1 (gate), w3 (up), w2 (down).
    def __init__(self, dim, hidden, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        setattr(self, names[0], nn.Linear(dim, hidden, bias=False))
        setattr(self, names[1], nn.Linear(dim, hidden, bias=False))
        setattr(self, names[2], nn.Linear(hidden, dim, bias=False))

    def forward(self, x):
        g, u, d = (getattr(self, n) for n in self.names)
        return d(F.silu(g(x)) * u(x))


class SparseMoe(nn.Module):
    # Mixtral's block: softmax over all experts' router logits, keep the top k, renormalise them to sum to 1.
    def __init__(self, a):
        super().__init__()
        self.k = a["experts_used"]
        self.gate = nn.Linear(a["dim"], a["experts"], bias=False)
        self.experts = nn.ModuleList([Mlp(a["dim"], a["hidden"], ("w1", "w3", "w2")) for _ in range(a["experts"])])

    def forward(self, x):
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        probs = self.gate(flat).softmax(-1)
        top_w, top_i = probs.topk(self.k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            out.index_add_(0, rows, expert(flat[rows]) * top_w[rows, slot].unsqueeze(-1))
        # Switch Transformer's load-balancing loss, as Mixtral trains with: E * sum_e f_e * P_e.
        n_exp = len(self.experts)
        frac = F.one_hot(top_i, n_exp).float().sum(1).mean(0) / self.k
        aux = n_exp * (frac * probs.mean(0)).sum()
        return out.view(b, t, d), aux


class Block(nn.Module):
    def __init__(self, a, eps):
        super().__init__()
        self.input_layernorm = RMSNorm(a["dim"], eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a["dim"], eps)
        self.moe = a["experts"] > 0
        if self.moe:
            self.block_sparse_moe = SparseMoe(a)
        else:
            self.mlp = Mlp(a["dim"], a["hidden"])

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        h = self.post_attention_layernorm(x)
        if self.moe:
            y, aux = self.block_sparse_moe(h)
        else:
            y, aux = self.mlp(h), x.new_zeros(())
        return x + y, aux


class Model(nn.Module):
    def __init__(self, a, vocab, seq_len, theta=10000.0, eps=1e-5):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, a["dim"])
        self.layers = nn.ModuleList([Block(a, eps) for _ in range(a["layers"])])
        self.norm = RMSNorm(a["dim"], eps)
        self.lm_head = nn.Linear(a["dim"], vocab, bias=False)
        hd = a["dim"] // a["heads"]
        inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv[None, :]
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)
        self.register_buffer("mask", torch.full((seq_len, seq_len), float("-inf")).triu(1), persistent=False)

    def forward(self, ids):
        t = ids.shape[1]
        x = self.embed_tokens(ids)
        cos, sin, mask = self.cos[:t], self.sin[:t], self.mask[:t, :t]
        aux = x.new_zeros(())
        for layer in self.layers:
            x, a = layer(x, cos, sin, mask)
            aux = aux + a
        return self.lm_head(self.norm(x)), aux / len(self.layers)


def hf_name(name):
    return name if name.startswith("lm_head") else "model." + name


def bf16_bytes(t):
    # Round to nearest even, as torch's own .to(torch.bfloat16) does; written by hand to keep the bytes explicit.
    bits = t.detach().float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(torch.int16).numpy().tobytes()


def write_safetensors(model, path):
    tensors = [(hf_name(n), p) for n, p in model.state_dict().items()]
    header, blobs, offset = {}, [], 0
    for name, t in tensors:
        data = bf16_bytes(t)
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt", "trained_by": "qforge (training/train_tinystories.py)"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def config_json(arch, a, vocab, seq_len, sp):
    c = {
        "hidden_size": a["dim"], "intermediate_size": a["hidden"], "num_hidden_layers": a["layers"],
        "num_attention_heads": a["heads"], "num_key_value_heads": a["kv_heads"], "vocab_size": vocab,
        "max_position_embeddings": seq_len, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(),
        "qforge_trained": "trained by the qforge project on TinyStories text; see training/README.md",
    }
    if arch == "moe":
        c.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=a["experts"],
                 num_experts_per_tok=a["experts_used"], router_aux_loss_coef=0.02)
    else:
        c.update(architectures=["LlamaForCausalLM"], model_type="llama")
    return c


def read_stories(path):
    text = open(path, encoding="utf-8").read()
    return [s.strip("\n") for s in text.split("\n\n") if s.strip()]


def normalized(s):
    return " ".join(s.split())


class Sampler:
    """Samples that start at a story boundary, tokenized as qforge tokenizes a text file (see the module doc)."""

    def __init__(self, sp, stories, seq_len):
        self.first = [sp.encode(s) for s in stories]                    # "▁Once upon ..."
        self.follow = []                                                  # "\n\nOnce upon ..." without its "▁"
        for s in stories:
            ids = sp.encode("\n\n" + s)
            assert sp.id_to_piece(ids[0]) == "▁", "unexpected tokenization of a story separator"
            self.follow.append(ids[1:])
        self.bos, self.n, self.seq_len = sp.bos_id(), len(stories), seq_len
        self.tokens = sum(len(f) for f in self.follow)

    def sample(self, start):
        ids = [self.bos] + self.first[start]
        j = start + 1
        while len(ids) < self.seq_len + 1:
            ids += self.follow[j % self.n]
            j += 1
        return ids[: self.seq_len + 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=sorted(ARCHS), required=True)
    ap.add_argument("--train", required=True, help="training text, stories separated by blank lines")
    ap.add_argument("--eval", required=True, help="evaluation text: checked for overlap, loss reported on it")
    ap.add_argument("--tokenizer", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models",
                                                         "stories260K", "candidate-tok512", "tok512.model"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--aux-coef", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    sp = sentencepiece.SentencePieceProcessor(model_file=args.tokenizer)
    vocab = sp.vocab_size()
    a = ARCHS[args.arch]

    train = read_stories(args.train)
    held_out = read_stories(args.eval)
    overlap = {normalized(s) for s in held_out} & {normalized(s) for s in train}
    if overlap:
        sys.exit(f"train_tinystories: {len(overlap)} training stories also appear in {args.eval}; refusing to train")
    t0 = time.time()
    train_s = Sampler(sp, train, args.seq_len)
    eval_s = Sampler(sp, held_out, args.seq_len)
    print(f"{len(train)} training stories, {train_s.tokens} tokens; {len(held_out)} evaluation stories; "
          f"tokenized in {time.time() - t0:.1f} s", flush=True)

    # Unigram baseline: the cross-entropy of the training text's token frequencies on the evaluation text.
    counts = torch.ones(vocab, dtype=torch.float64)  # add-one smoothing
    for ids in train_s.follow:
        counts += torch.bincount(torch.tensor(ids), minlength=vocab).double()
    logp = (counts / counts.sum()).log()
    eval_ids = torch.tensor([i for ids in eval_s.follow for i in ids])
    unigram_nll = -logp[eval_ids].mean().item()
    print(f"unigram baseline on the evaluation stories: {unigram_nll:.4f} nats/token "
          f"(perplexity {math.exp(unigram_nll):.2f})", flush=True)

    model = Model(a, vocab, args.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}: {n_params} parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    eval_starts = torch.randperm(eval_s.n, generator=torch.Generator().manual_seed(1))[:64].tolist()

    def evaluate():
        model.eval()
        with torch.no_grad():
            batch = torch.tensor([eval_s.sample(i) for i in eval_starts])
            logits, _ = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1)).item()
        model.train()
        return loss

    start = time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(step / args.warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps))))
        lr = max(lr, args.lr * 0.02)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, train_s.n, (args.batch,), generator=gen).tolist()
        batch = torch.tensor([train_s.sample(i) for i in starts])
        logits, aux = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
        total = loss + args.aux_coef * aux if a["experts"] else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == 1:
            el = time.time() - start
            print(f"step {step}/{args.steps} loss {loss.item():.4f} aux {aux.item():.3f} lr {lr:.2e} "
                  f"{el:.0f} s ({el / step:.2f} s/step)", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step}: evaluation loss {evaluate():.4f}", flush=True)
    train_seconds = time.time() - start

    os.makedirs(args.out, exist_ok=True)
    write_safetensors(model, os.path.join(args.out, "model.safetensors"))
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config_json(args.arch, a, vocab, args.seq_len, sp), f, indent=2)
        f.write("\n")
    shutil.copyfile(args.tokenizer, os.path.join(args.out, "tokenizer.model"))
    summary = {
        "arch": args.arch, "parameters": n_params, "steps": args.steps, "batch": args.batch,
        "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed, "threads": args.threads,
        "torch": torch.__version__, "train_stories": len(train), "train_tokens": train_s.tokens,
        "tokens_seen": args.steps * args.batch * args.seq_len, "train_seconds": round(train_seconds),
        "final_eval_loss": round(evaluate(), 4), "unigram_eval_nll": round(unigram_nll, 4),
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
