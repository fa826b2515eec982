#!/usr/bin/env python3
"""Python onnxruntime baseline for the sentence encoder (same model, same pooling as the Rust
engine in src/engine/encoder.rs).

Embedding: tokenizer.json without its fixed padding, truncation to --max-seq tokens, batch padded
to its longest member, mean of last_hidden_state over attention_mask, L2-normalised.

Subcommands:
  latency   per-query p50/p99 on one thread (tokenise + run + pool), and batched throughput
  embed     embed a `text,category` CSV into an .npz (vectors, labels) for scripts/intent_experiments.py
  fixture   write the reference vectors the Rust encoder test compares against

Needs: pip install onnxruntime tokenizers numpy (versions: see models/README.md).
Models: models/fetch (default dir models/cache, or SWITCHBOARD_MODELS_DIR).
"""

import argparse
import csv
import json
import math
import os
import platform
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def models_dir():
    return os.environ.get("SWITCHBOARD_MODELS_DIR", os.path.join(REPO, "models", "cache"))


class Encoder:
    def __init__(self, directory, threads=1, max_seq=256):
        for name in ("model.onnx", "tokenizer.json"):
            if not os.path.isfile(os.path.join(directory, name)):
                sys.exit(f"{directory}/{name} missing: run models/fetch first")
        self.tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_seq)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            os.path.join(directory, "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name for i in self.session.get_inputs()}

    def encode(self, texts):
        encodings = [self.tokenizer.encode(t) for t in texts]
        length = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), length), np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n] = e.ids
            mask[row, :n] = e.attention_mask
            types[row, :n] = e.type_ids
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = types
        hidden = self.session.run(["last_hidden_state"], feed)[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def encode_many(self, texts, batch=32):
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
        chunks = []
        for start in range(0, len(order), batch):
            chunks.append(self.encode([texts[i] for i in order[start : start + batch]]))
        stacked = np.concatenate(chunks)
        out = np.zeros_like(stacked)
        out[order] = stacked
        return out


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return [(r["text"], r["category"]) for r in reader]


def percentile(sorted_values, p):
    """Nearest-rank percentile (the same definition as the Rust eval)."""
    rank = math.ceil(p / 100.0 * len(sorted_values))
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


def cmd_latency(args):
    start = time.perf_counter()
    encoder = Encoder(args.models, threads=1, max_seq=args.max_seq)
    encoder.encode(["warm-up"])
    cold = time.perf_counter() - start
    texts = [t for t, _ in read_csv(args.csv)][: args.queries]
    for t in texts[:20]:
        encoder.encode([t])
    times = []
    for t in texts:
        start = time.perf_counter()
        encoder.encode([t])
        times.append(time.perf_counter() - start)
    times.sort()
    single_qps = len(times) / sum(times)
    start = time.perf_counter()
    for i in range(0, len(texts), args.batch):
        encoder.encode(texts[i : i + args.batch])
    batched_qps = len(texts) / (time.perf_counter() - start)
    print(f"python onnxruntime {ort.__version__} ({platform.python_version()}), 1 intra-op thread, {len(texts)} queries")
    print(f"python cold start (session + tokenizer + first query): {cold * 1e3:.0f} ms")
    print(f"python single query: p50 {percentile(times, 50) * 1e3:.2f} ms  p99 {percentile(times, 99) * 1e3:.2f} ms  mean {1e3 / single_qps:.2f} ms  ({single_qps:.0f} queries/s)")
    print(f"python batched x{args.batch}: {batched_qps:.0f} queries/s ({batched_qps / single_qps:.2f}x one at a time)")


def cmd_embed(args):
    encoder = Encoder(args.models, threads=args.threads, max_seq=args.max_seq)
    rows = read_csv(args.csv)
    start = time.perf_counter()
    vectors = encoder.encode_many([t for t, _ in rows])
    print(f"embedded {len(rows)} texts in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    np.savez(args.out, vectors=vectors.astype(np.float32), labels=np.array([c for _, c in rows]))


FIXTURE_TEXTS = [
    "I am still waiting on my card?",
    "How do I top up with Apple Pay?",
    "",
    "Wie kann ich meine Karte sperren? Ça coûte combien ?  émojis 💳✨",
    "my card got declined at the shop, why??",
    # Long enough to be truncated at 256 tokens.
    " ".join(["why was my transfer to my landlord cancelled and when will the money come back"] * 20),
]


def cmd_fixture(args):
    encoder = Encoder(args.models, threads=1, max_seq=256)
    single = [encoder.encode([t])[0] for t in FIXTURE_TEXTS]
    batch = encoder.encode(FIXTURE_TEXTS)
    worst = float(np.abs(np.stack(single) - batch).max())
    print(f"python: max |single - batched| = {worst:.2e}", file=sys.stderr)
    fixture = {
        "description": "Reference embeddings from scripts/py_baseline.py fixture (Python onnxruntime, "
        "mean pooling over attention_mask, L2-normalised, max_sequence_length 256, each text embedded alone).",
        "onnxruntime": ort.__version__,
        "max_sequence_length": 256,
        "dim": int(batch.shape[1]),
        "texts": FIXTURE_TEXTS,
        "vectors": [[round(float(x), 7) for x in v] for v in single],
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False)
        f.write("\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=models_dir())
    parser.add_argument("--max-seq", type=int, default=256)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("latency")
    p.add_argument("--csv", default=os.path.join(REPO, "tests", "data", "banking77", "holdout.csv"))
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--batch", type=int, default=16)
    p = sub.add_parser("embed")
    p.add_argument("csv")
    p.add_argument("out")
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("fixture")
    p.add_argument("out")
    args = parser.parse_args()
    {"latency": cmd_latency, "embed": cmd_embed, "fixture": cmd_fixture}[args.command](args)


if __name__ == "__main__":
    main()
