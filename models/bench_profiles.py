#!/usr/bin/env python3
"""Interleaved latency and cold start of the two encoder profiles (models/README.md).

Usage: bench_profiles.py [MODELS_DIR]   (default models/cache; needs numpy, onnxruntime, tokenizers)
Both models alternate on each of the same questions (the first 300 BANKING77 hold-out questions
and the Chinese FAQ hold-out), one intra-op thread, so both see the same machine load.
"""
import sys
MODELS = sys.argv[1] if len(sys.argv) > 1 else "models/cache"
import csv, time, numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
rows = list(csv.DictReader(open("tests/data/banking77/holdout.csv")))[:300]
zh = [r["text"] for r in csv.DictReader(open("tests/data/zh_faq/holdout.csv"))]
def mk(model, tok, prefix):
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
    t0 = time.perf_counter(); s = ort.InferenceSession(model, so); t = Tokenizer.from_file(tok); t.no_padding()
    names = [i.name for i in s.get_inputs()]
    def run(text):
        e = t.encode(prefix + text); ids = np.array([e.ids], np.int64); m = np.ones_like(ids)
        feed = {"input_ids": ids, "attention_mask": m}
        if "token_type_ids" in names: feed["token_type_ids"] = np.zeros_like(ids)
        h = s.run(None, feed)[0]; v = h.mean(1)[0]; return v / np.linalg.norm(v)
    run("warm up"); return run, time.perf_counter() - t0
en, en_cold = mk(MODELS + "/model.onnx", MODELS + "/tokenizer.json", "")
ml, ml_cold = mk(MODELS + "/multilingual-e5-small.onnx", MODELS + "/multilingual-e5-small.tokenizer.json", "query: ")
lat = {"en": [], "ml": []}
for text in [r["text"] for r in rows] + zh:
    for name, f in (("en", en), ("ml", ml)):
        t = time.perf_counter(); f(text); lat[name].append((time.perf_counter() - t) * 1e3)
import os
print("load avg", os.getloadavg())
print(f"cold (session+tokenizer+first query): en {en_cold*1e3:.0f} ms  ml {ml_cold*1e3:.0f} ms")
for k, v in lat.items():
    v = np.array(v); print(k, f"n={len(v)} p50 {np.percentile(v,50):.2f} ms p90 {np.percentile(v,90):.2f} p99 {np.percentile(v,99):.2f}")
