#!/usr/bin/env python3
"""Intent-recognition experiments on the BANKING77 hold-out split (numpy only).

Embeds tests/data/banking77/{kb,holdout}.csv with the shipped encoder (scripts/py_baseline.py,
cached as .npz next to the model files), then compares, on 5-fold cross-validation inside the
knowledge base (for choosing) and on the hold-out (for reporting):
  - nearest question (top-1 cosine), kNN majority vote, softmax-weighted kNN vote (k, T),
    class centroids, kNN after centring;
  - multinomial logistic regression (L-BFGS from zero, the same algorithm as
    src/engine/classifier.rs) for several L2 penalties;
  - blends  w * head + (1 - w) * weighted vote.
Usage: scripts/intent_experiments.py [--folds 5]
"""

import argparse
import hashlib
import os
import sys
import time
from collections import deque

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import py_baseline  # noqa: E402

REPO = py_baseline.REPO


def embeddings(split, models):
    path = os.path.join(REPO, "tests", "data", "banking77", f"{split}.csv")
    rows = py_baseline.read_csv(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    cache = os.path.join(models, f".embeddings-{split}-{digest}.npz")
    if os.path.exists(cache):
        data = np.load(cache)
        return data["vectors"], [c for _, c in rows]
    encoder = py_baseline.Encoder(models, threads=1)
    start = time.perf_counter()
    vectors = encoder.encode_many([t for t, _ in rows]).astype(np.float32)
    print(f"embedded {split} ({len(rows)}) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    np.savez(cache, vectors=vectors)
    return vectors, [c for _, c in rows]


def vote(queries, kb, labels, classes, k, temperature=None):
    """Class scores from the k most similar rows (uniform votes, or exp((s - best) / T))."""
    sims = queries @ kb.T
    idx = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < kb.shape[0] else np.argsort(-sims, 1)
    top = np.take_along_axis(sims, idx, 1)
    weights = np.ones_like(top) if temperature is None else np.exp((top - top.max(1, keepdims=True)) / temperature)
    scores = np.zeros((len(queries), classes), np.float32)
    np.add.at(scores, (np.repeat(np.arange(len(queries)), idx.shape[1]), labels[idx].ravel()), weights.ravel())
    return scores / scores.sum(1, keepdims=True)


def train_softmax(x, y, classes, l2, max_iterations=100, tolerance=1e-4, memory=10):
    """Multinomial logistic regression, L-BFGS with Armijo backtracking, from zero (as in Rust)."""
    n, d = x.shape
    onehot = np.eye(classes, dtype=np.float32)[y]

    def evaluate(theta):
        w = theta[: classes * d].reshape(classes, d)
        b = theta[classes * d :]
        z = x @ w.T + b
        z -= z.max(1, keepdims=True)
        lse = np.log(np.exp(z).sum(1))
        p = np.exp(z - lse[:, None])
        loss = float(np.mean(lse - z[np.arange(n), y])) + 0.5 * l2 * float((w.astype(np.float64) ** 2).sum())
        g = (p - onehot) / n
        return loss, np.concatenate([(g.T @ x + l2 * w).ravel(), g.sum(0)]).astype(np.float32)

    theta = np.zeros(classes * d + classes, np.float32)
    loss, grad = evaluate(theta)
    history = deque()
    for _ in range(max_iterations):
        gnorm = float(np.sqrt(np.dot(grad.astype(np.float64), grad)))
        if gnorm < tolerance:
            break
        q = grad.astype(np.float64)
        alphas = []
        for s, yv, rho in reversed(history):
            a = rho * np.dot(s, q)
            alphas.append(a)
            q -= a * yv
        if history:
            s, yv, _ = history[-1]
            q *= np.dot(s, yv) / np.dot(yv, yv)
        else:
            q /= gnorm
        for (s, yv, rho), a in zip(history, reversed(alphas)):
            q += s * (a - rho * np.dot(yv, q))
        direction = -q
        slope = float(np.dot(grad, direction))
        if slope >= 0:
            history.clear()
            direction = -grad / gnorm
            slope = -gnorm
        step = 1.0
        for _ in range(40):
            candidate = (theta + step * direction).astype(np.float32)
            new_loss, new_grad = evaluate(candidate)
            if new_loss <= loss + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break
        s = (candidate - theta).astype(np.float64)
        yv = (new_grad - grad).astype(np.float64)
        if np.dot(s, yv) > 1e-10:
            history.append((s, yv, 1.0 / np.dot(s, yv)))
            if len(history) > memory:
                history.popleft()
        theta, loss, grad = candidate, new_loss, new_grad
    w = theta[: classes * d].reshape(classes, d)
    return w, theta[classes * d :]


def softmax_scores(queries, w, b):
    z = queries @ w.T + b
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def methods(kb, labels, queries, classes):
    """Every method's class scores for `queries`, given a knowledge base."""
    out = {"nearest question": vote(queries, kb, labels, classes, 1)}
    for k in (5, 10):
        out[f"kNN majority k={k}"] = vote(queries, kb, labels, classes, k)
    for k in (5, 10, 20):
        for t in (0.02, 0.05, 0.1):
            out[f"kNN weighted k={k} T={t}"] = vote(queries, kb, labels, classes, k, t)
    centroids = np.stack([kb[labels == c].mean(0) for c in range(classes)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    out["class centroid"] = queries @ centroids.T
    mean = kb.mean(0)
    centred = kb - mean
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    cq = queries - mean
    cq /= np.linalg.norm(cq, axis=1, keepdims=True)
    out["kNN weighted k=10 T=0.05, centred"] = vote(cq, centred, labels, classes, 10, 0.05)
    weighted = out["kNN weighted k=10 T=0.05"]
    for l2 in (1e-4, 1e-5, 1e-6):
        w, b = train_softmax(kb, labels, classes, l2)
        head = softmax_scores(queries, w, b)
        out[f"softmax regression l2={l2:g}"] = head
        if l2 == 1e-5:
            for hw in (0.3, 0.5, 0.7):
                out[f"blend {hw} head(l2=1e-5) + {1 - hw:.1f} kNN(k=10,T=0.05)"] = hw * head + (1 - hw) * weighted
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=py_baseline.models_dir())
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    kb, kb_intents = embeddings("kb", args.models)
    holdout, holdout_intents = embeddings("holdout", args.models)
    names = sorted(set(kb_intents))
    index = {n: i for i, n in enumerate(names)}
    labels = np.array([index[c] for c in kb_intents])
    truth = np.array([index[c] for c in holdout_intents])
    classes = len(names)

    # Folds: row i goes to fold (position of i in a fixed permutation) mod folds.
    folds = np.empty(len(kb), int)
    folds[np.random.default_rng(1).permutation(len(kb))] = np.arange(len(kb)) % args.folds
    cv = {}
    for f in range(args.folds):
        train, test = folds != f, folds == f
        for name, scores in methods(kb[train], labels[train], kb[test], classes).items():
            cv.setdefault(name, []).append(float((scores.argmax(1) == labels[test]).mean()))
    held = methods(kb, labels, holdout, classes)
    print(f"{'method':<58} {args.folds}-fold CV (kb)  hold-out ({len(holdout)})")
    for name, scores in held.items():
        accuracy = float((scores.argmax(1) == truth).mean())
        print(f"{name:<58} {100 * np.mean(cv[name]):6.2f}%          {100 * accuracy:6.2f}%")


if __name__ == "__main__":
    main()
