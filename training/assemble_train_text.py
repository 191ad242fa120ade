#!/usr/bin/python3
"""Rebuild tinystories-train.txt, the training text described in training/README.md ("The training text").

The text is assembled from files in four public GitHub repositories. Nothing is downloaded here, at build time
or otherwise: the developers' tools fetch snapshots of those repositories (bare git mirrors), and this script
reads the files out of them with `git show COMMIT:PATH` (--mirror-root), or takes the already extracted files
from a cache directory (--cache-dir). The sources, in output order:

  1. gusjengis/toy-RNN @ e4c7ff8b  data/tinystories_sample.txt  (first 2 MiB of TinyStories V1 train; stories end
     with "<|endoftext|>"; the cut-off story after the last marker is not used)
  2. maxme1/tiny-stories @ 037e886f  frontend/src/assets/tiny-stories.json  ({"texts": [...]})
  3. NiuHuangxiaozi/assignment1-basics @ feb0cce8  cs336_basics/tokenizers/tiny_story_train_ids.npy, decoded with
     that repository's own BPE vocabulary (cs336_basics/bpe/output/TinyStoriesV2-GPT4-train_optim_vocab_10000.pkl,
     a pickled {id: bytes} dict, read with an unpickler that refuses every class); the text is the CS336 5 MiB
     sample, which starts and ends mid-story, so the pieces before the first and after the last "<|endoftext|>"
     are not used
  4. czhou578/train-gpt2 @ b213c75b  data/tinystories/val.bin, then test.bin (uint16 GPT-2 token ids), decoded with
     GPT-2's byte-level vocabulary (tests/fixtures/gpt2_vocab.json of NiuHuangxiaozi/assignment1-basics, GPT-2's
     encoder.json); stories end with "<|endoftext|>"

Per story: lines stripped of trailing whitespace, blank lines removed, the story's outer whitespace removed
(some stories start with a space). The whitespace-
collapsed text is the deduplication key (first occurrence kept). A story is also dropped when its collapsed text
occurs in the (collapsed) evaluation or calibration text, or when one of its lines of 40+ characters is a line
of those files. Output: stories joined by a blank line, with a final newline.

Usage:
  /usr/bin/python3 training/assemble_train_text.py --mirror-root /work/.mirror \
      --eval ../shared/data/tinystories-eval.txt --calib ../shared/data/tinystories-calib.txt \
      --out tinystories-train.txt
  (or --cache-dir DIR holding the extracted files under the names in CACHE_NAMES; --save-cache DIR writes them)

Expected result: 17,979 stories, 14,596,746 bytes,
sha256 e908bc5d00ca6351068c7781b9ee965d01f7c29c20f9ece37e0ae63743b65a58.
"""
import argparse
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np

EOT = "<|endoftext|>"
EXPECTED_SHA256 = "e908bc5d00ca6351068c7781b9ee965d01f7c29c20f9ece37e0ae63743b65a58"
EXPECTED_STORIES = 17979
EXPECTED_BYTES = 14596746

NIU = ("NiuHuangxiaozi/assignment1-basics", "feb0cce87d38877dabf7b2379955f8536537d465")
CZHOU = ("czhou578/train-gpt2", "b213c75be938fad8009e40e65a3765af2b5987c8")
# cache name -> (repository, commit, path)
FILES = {
    "toyrnn_sample.txt": ("gusjengis/toy-RNN", "e4c7ff8bba4ff7989e69a3a816ebe4b14813b41e",
                          "data/tinystories_sample.txt"),
    "maxme1.json": ("maxme1/tiny-stories", "037e886f4ee35dca2c469b0da3638ebf2255e4cb",
                    "frontend/src/assets/tiny-stories.json"),
    "niu_ids.npy": NIU + ("cs336_basics/tokenizers/tiny_story_train_ids.npy",),
    "niu_vocab.pkl": NIU + ("cs336_basics/bpe/output/TinyStoriesV2-GPT4-train_optim_vocab_10000.pkl",),
    "gpt2_vocab.json": NIU + ("tests/fixtures/gpt2_vocab.json",),
    "czhou_val.bin": CZHOU + ("data/tinystories/val.bin",),
    "czhou_test.bin": CZHOU + ("data/tinystories/test.bin",),
}
CACHE_NAMES = list(FILES)


def read_from_mirror(root, repo, commit, path):
    """Bytes of PATH at COMMIT in the bare mirror ROOT/owner+name/repo (the fetch tool's layout)."""
    git_dir = os.path.join(root, repo.replace("/", "+"), "repo")
    if not os.path.isdir(git_dir):
        git_dir = os.path.join(root, repo.replace("/", "+"))
    try:
        return subprocess.run(["git", "--git-dir", git_dir, "show", f"{commit}:{path}"],
                              check=True, capture_output=True).stdout
    except subprocess.CalledProcessError as e:
        sys.exit(f"assemble_train_text: cannot read {repo}@{commit}:{path} from {git_dir}: "
                 f"{e.stderr.decode(errors='replace').strip()}")


class NoClassUnpickler(pickle.Unpickler):
    """Plain data only (dict / int / bytes): refuses to import anything."""
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def gpt2_byte_decoder():
    """Inverse of GPT-2's bytes_to_unicode() table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def decode_ids(ids, table):
    return b"".join(table[int(i)] for i in ids).decode("utf-8")


def eot_pieces(text, drop_first=False, drop_last=True):
    """Split on <|endoftext|>; the piece after the last marker is unterminated (empty or cut off)."""
    pieces = text.split(EOT)
    if drop_last:
        pieces = pieces[:-1]
    if drop_first:
        pieces = pieces[1:]
    return pieces


def clean(story):
    lines = [ln.rstrip() for ln in story.split("\n")]
    return "\n".join(ln for ln in lines if ln).strip()


def collapsed(s):
    return " ".join(s.split())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--mirror-root", help="folder of bare git mirrors (owner+name/repo), as the fetch tool makes")
    src.add_argument("--cache-dir", help="folder with the extracted source files: " + ", ".join(CACHE_NAMES))
    ap.add_argument("--save-cache", help="also write the extracted source files into this folder")
    ap.add_argument("--eval", required=True, help="tinystories-eval.txt")
    ap.add_argument("--calib", required=True, help="tinystories-calib.txt")
    ap.add_argument("--out", required=True, help="output text file")
    args = ap.parse_args()

    raw = {}
    for name, (repo, commit, path) in FILES.items():
        if args.cache_dir:
            with open(os.path.join(args.cache_dir, name), "rb") as f:
                raw[name] = f.read()
        else:
            raw[name] = read_from_mirror(args.mirror_root, repo, commit, path)
        if args.save_cache:
            os.makedirs(args.save_cache, exist_ok=True)
            with open(os.path.join(args.save_cache, name), "wb") as f:
                f.write(raw[name])

    niu_vocab = NoClassUnpickler(io.BytesIO(raw["niu_vocab.pkl"])).load()
    niu_ids = np.load(io.BytesIO(raw["niu_ids.npy"]), allow_pickle=False)
    u2b = gpt2_byte_decoder()
    gpt2 = {i: bytes(u2b[c] for c in tok) for tok, i in json.loads(raw["gpt2_vocab.json"]).items()}

    sources = [
        ("gusjengis/toy-RNN tinystories_sample.txt", eot_pieces(raw["toyrnn_sample.txt"].decode("utf-8"))),
        ("maxme1/tiny-stories tiny-stories.json", json.loads(raw["maxme1.json"])["texts"]),
        ("NiuHuangxiaozi/assignment1-basics tiny_story_train_ids.npy",
         eot_pieces(decode_ids(niu_ids, niu_vocab), drop_first=True)),
        ("czhou578/train-gpt2 val.bin",
         eot_pieces(decode_ids(np.frombuffer(raw["czhou_val.bin"], dtype="<u2"), gpt2))),
        ("czhou578/train-gpt2 test.bin",
         eot_pieces(decode_ids(np.frombuffer(raw["czhou_test.bin"], dtype="<u2"), gpt2))),
    ]

    held = ""
    for p in (args.eval, args.calib):
        with open(p, encoding="utf-8") as f:
            held += f.read() + "\n"
    held_collapsed = collapsed(held)
    held_lines = {ln.strip() for ln in held.split("\n") if len(ln.strip()) >= 40}

    seen = set()
    out = []
    total_dup = total_held = 0
    for name, pieces in sources:
        kept = dup = overlap = 0
        for piece in pieces:
            s = clean(piece)
            if not s:
                continue
            key = collapsed(s)
            if key in seen:
                dup += 1
                continue
            seen.add(key)
            if key in held_collapsed or any(ln.strip() in held_lines for ln in s.split("\n")):
                overlap += 1
                continue
            out.append(s)
            kept += 1
        total_dup += dup
        total_held += overlap
        print(f"{name}: {len(pieces)} stories read, {kept} kept, {dup} duplicates, {overlap} in eval/calib")

    data = ("\n\n".join(out) + "\n").encode("utf-8")
    with open(args.out, "wb") as f:
        f.write(data)
    sha = hashlib.sha256(data).hexdigest()
    print(f"dropped: {total_dup} duplicates, {total_held} sharing text with eval/calib")
    print(f"{len(out)} stories, {len(data)} bytes, sha256 {sha} -> {args.out}")
    ok = sha == EXPECTED_SHA256
    print("matches the README" if ok else
          f"differs from the README ({EXPECTED_STORIES} stories, {EXPECTED_BYTES} bytes, sha256 {EXPECTED_SHA256})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
