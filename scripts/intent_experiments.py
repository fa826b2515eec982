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
With --issue11, the methods tried for issue 11 (beyond the frozen en model) instead:
  - the en model with multilingual-e5-small as companion: vectors joined (what
    `[inference] companion_model` does in the engine), or one blend per model averaged;
  - on the en vectors alone: PCA whitening, an MLP head, a learned residual linear adapter with
    class proxies (normalised softmax, Adam), pseudo-relevance feedback on the query.
With --cascade, the companion cascade (what `[inference] companion_below` does): the en blend
first, the joined vectors' blend only for queries whose en score is below a threshold; accuracy
and share of queries escalated per threshold, in cross-validation and on the hold-out.
Usage: scripts/intent_experiments.py [--folds 5] [--issue11 | --cascade]
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


# (model file, tokenizer file, text prefix) of the two profiles (models/README.md).
PROFILES = {
    "en": ("model.onnx", "tokenizer.json", ""),
    "multilingual": ("multilingual-e5-small.onnx", "multilingual-e5-small.tokenizer.json", "query: "),
}


class ProfileEncoder(py_baseline.Encoder):
    """py_baseline.Encoder for either profile (model and tokenizer file names, text prefix)."""

    def __init__(self, directory, profile, threads=1, max_seq=256):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        model, tokenizer, self.prefix = PROFILES[profile]
        self.tokenizer = Tokenizer.from_file(os.path.join(directory, tokenizer))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_seq)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.path.join(directory, model), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def encode(self, texts):
        return super().encode([self.prefix + t for t in texts])


def embeddings(split, models, profile="en"):
    path = os.path.join(REPO, "tests", "data", "banking77", f"{split}.csv")
    rows = py_baseline.read_csv(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    tag = "" if profile == "en" else f"{profile}-"
    cache = os.path.join(models, f".embeddings-{tag}{split}-{digest}.npz")
    if os.path.exists(cache):
        data = np.load(cache)
        return data["vectors"], [c for _, c in rows]
    encoder = py_baseline.Encoder(models, threads=1) if profile == "en" else ProfileEncoder(models, profile)
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


def normalised(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def softmax_rows(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


class Adam:
    def __init__(self, params, lr):
        self.params, self.lr, self.t = params, lr, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, grads):
        self.t += 1
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            p -= self.lr * (m / (1 - 0.9**self.t)) / (np.sqrt(v / (1 - 0.999**self.t)) + 1e-8)


def train_mlp(x, y, classes, hidden=512, epochs=30, lr=1e-3, wd=1e-4, batch=64, seed=0):
    """One ReLU hidden layer, softmax output, Adam on minibatches; returns a scoring function."""
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    w1 = (rng.standard_normal((d, hidden)) * np.sqrt(2 / d)).astype(np.float32)
    b1 = np.zeros(hidden, np.float32)
    w2 = np.zeros((hidden, classes), np.float32)
    b2 = np.zeros(classes, np.float32)
    opt = Adam([w1, b1, w2, b2], lr)
    onehot = np.eye(classes, dtype=np.float32)[y]
    for _ in range(epochs):
        perm = rng.permutation(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            xb = x[idx]
            a = xb @ w1 + b1
            h = np.maximum(a, 0)
            g = (softmax_rows(h @ w2 + b2) - onehot[idx]) / len(idx)
            da = (g @ w2.T) * (a > 0)
            opt.step([xb.T @ da + wd * w1, da.sum(0), h.T @ g + wd * w2, g.sum(0)])
    return lambda q: softmax_rows(np.maximum(q @ w1 + b1, 0) @ w2 + b2)


def train_adapter(x, y, classes, scale=20.0, epochs=20, lr=1e-3, batch=64, seed=0):
    """z = normalise(x + x A), A from zero, trained with a normalised softmax over class proxies
    (initialised at the class centroids); returns (projection, proxy-softmax head)."""
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    adapter = np.zeros((d, d), np.float32)
    proxies = normalised(np.stack([x[y == c].mean(0) for c in range(classes)])).astype(np.float32)
    opt = Adam([adapter, proxies], lr)
    onehot = np.eye(classes, dtype=np.float32)[y]
    for _ in range(epochs):
        perm = rng.permutation(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            xb = x[idx]
            u = xb + xb @ adapter
            n = np.linalg.norm(u, axis=1, keepdims=True)
            z = u / n
            pnorm = np.linalg.norm(proxies, axis=1, keepdims=True)
            pn = proxies / pnorm
            g = (softmax_rows(scale * z @ pn.T) - onehot[idx]) / len(idx)
            dz, dpn = scale * g @ pn, scale * g.T @ z
            du = (dz - z * (dz * z).sum(1, keepdims=True)) / n
            opt.step([xb.T @ du, (dpn - pn * (dpn * pn).sum(1, keepdims=True)) / pnorm])
    project = lambda q: normalised(q + q @ adapter)  # noqa: E731
    pn = normalised(proxies)
    return project, (lambda q: softmax_rows(scale * project(q) @ pn.T))


def blend_parts(kb, labels, queries, classes, temperature=0.05):
    w, b = train_softmax(kb, labels, classes, 1e-5)
    return softmax_scores(queries, w, b), vote(queries, kb, labels, classes, 10, temperature)


def issue11_methods(kbs, labels, queries, classes):
    """kbs / queries: [en vectors, multilingual vectors]."""
    (kb, ml_kb), (q, ml_q) = kbs, queries
    head, weighted = blend_parts(kb, labels, q, classes)
    out = {"shipped: blend 0.5 head + 0.5 kNN (en)": 0.5 * head + 0.5 * weighted}
    ml_head, ml_vote = blend_parts(ml_kb, labels, ml_q, classes)
    out["same, multilingual model"] = 0.5 * ml_head + 0.5 * ml_vote
    for share in (0.5, 0.6):
        out[f"one blend per model, averaged ({share} en)"] = share * out["shipped: blend 0.5 head + 0.5 kNN (en)"] + (
            1 - share
        ) * out["same, multilingual model"]
    joined_kb, joined_q = np.hstack(kbs) / np.sqrt(2), np.hstack(queries) / np.sqrt(2)
    joined_head, joined_vote = blend_parts(joined_kb, labels, joined_q, classes)
    out["vectors joined (companion), blend, T=0.05 (engine)"] = 0.5 * joined_head + 0.5 * joined_vote
    out["vectors joined (companion), blend, T=0.03"] = 0.5 * joined_head + 0.5 * vote(
        joined_q, joined_kb, labels, classes, 10, 0.03
    )
    mean = kb.mean(0)
    centred = kb - mean
    values, vectors = np.linalg.eigh(centred.T @ centred / len(kb))
    whiten = vectors @ np.diag(1 / np.sqrt(values + 0.3 * values.mean())) @ vectors.T
    white_kb, white_q = normalised(centred @ whiten), normalised((q - mean) @ whiten)
    white_head, white_vote = blend_parts(white_kb, labels, white_q, classes, temperature=0.1)
    out["en, PCA-whitened (eps 0.3), blend, T=0.1"] = 0.5 * white_head + 0.5 * white_vote
    mlp = train_mlp(kb, labels, classes)(q)
    out["en, MLP head (512 ReLU) + kNN"] = 0.5 * mlp + 0.5 * weighted
    project, proxy_head = train_adapter(kb, labels, classes)
    adapted_vote = vote(project(q), project(kb), labels, classes, 10, 0.1)
    out["en, linear adapter + proxies: kNN in adapted space, T=0.1"] = adapted_vote
    out["en, linear adapter: proxy head + adapted kNN"] = 0.5 * proxy_head(q) + 0.5 * adapted_vote
    sims = q @ kb.T
    nearest = np.argpartition(-sims, 5, axis=1)[:, :5]
    expanded = normalised(q + 0.5 * kb[nearest].mean(1))
    w, b = train_softmax(kb, labels, classes, 1e-5)
    out["en, query + 0.5 x mean of its 5 nearest questions, blend"] = 0.5 * softmax_scores(
        expanded, w, b
    ) + 0.5 * vote(expanded, kb, labels, classes, 10, 0.05)
    return out


CASCADE_THRESHOLDS = [round(0.3 + 0.025 * i, 3) for i in range(17)] + [0.8, 0.9, 1.01]


def cascade_parts(kbs, labels, queries, classes):
    """The en blend and the joined vectors' blend (kbs / queries: [en, multilingual])."""
    head, weighted = blend_parts(kbs[0], labels, queries[0], classes)
    joined_kb, joined_q = np.hstack(kbs) / np.sqrt(2), np.hstack(queries) / np.sqrt(2)
    joined_head, joined_vote = blend_parts(joined_kb, labels, joined_q, classes)
    return 0.5 * head + 0.5 * weighted, 0.5 * joined_head + 0.5 * joined_vote


def cascade(primary, joined, truth, threshold):
    """(right answers, share escalated) when scores below `threshold` escalate."""
    escalate = primary.max(1) < threshold
    predicted = np.where(escalate, joined.argmax(1), primary.argmax(1))
    return int((predicted == truth).sum()), float(escalate.mean())


def main_cascade(kb, holdout, labels, truth, classes, folds, count):
    per_fold = []
    for f in range(count):
        train, test = folds != f, folds == f
        parts = cascade_parts([v[train] for v in kb], labels[train], [v[test] for v in kb], classes)
        per_fold.append(parts + (labels[test],))
    held = cascade_parts(kb, labels, holdout, classes)
    print(f"{'companion_below':<16} {count}-fold CV (kb): right, escalated   hold-out ({len(truth)}): top-1, escalated")
    for threshold in CASCADE_THRESHOLDS:
        cv = [cascade(p, j, t, threshold) for p, j, t in per_fold]
        right = sum(r for r, _ in cv)
        escalated = np.mean([e for _, e in cv])
        h_right, h_escalated = cascade(held[0], held[1], truth, threshold)
        print(
            f"{threshold:<16} {100 * right / len(labels):6.2f}% ({right}) {100 * escalated:5.1f}%"
            f"             {100 * h_right / len(truth):6.2f}% {100 * h_escalated:5.1f}%"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=py_baseline.models_dir())
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--issue11", action="store_true", help="the issue-11 methods (needs both profiles)")
    parser.add_argument("--cascade", action="store_true", help="the companion cascade per threshold (needs both profiles)")
    args = parser.parse_args()
    kb, kb_intents = embeddings("kb", args.models)
    holdout, holdout_intents = embeddings("holdout", args.models)
    if args.issue11 or args.cascade:
        kb = [kb, embeddings("kb", args.models, "multilingual")[0]]
        holdout = [holdout, embeddings("holdout", args.models, "multilingual")[0]]
        evaluate = issue11_methods
    else:
        evaluate = methods
    names = sorted(set(kb_intents))
    index = {n: i for i, n in enumerate(names)}
    labels = np.array([index[c] for c in kb_intents])
    truth = np.array([index[c] for c in holdout_intents])
    classes = len(names)

    # Folds: row i goes to fold (position of i in a fixed permutation) mod folds.
    rows = len(labels)
    folds = np.empty(rows, int)
    folds[np.random.default_rng(1).permutation(rows)] = np.arange(rows) % args.folds
    if args.cascade:
        main_cascade(kb, holdout, labels, truth, classes, folds, args.folds)
        return
    cv = {}
    for f in range(args.folds):
        train, test = folds != f, folds == f
        pick = (lambda x, rows: [v[rows] for v in x]) if args.issue11 else (lambda x, rows: x[rows])
        for name, scores in evaluate(pick(kb, train), labels[train], pick(kb, test), classes).items():
            cv.setdefault(name, []).append(float((scores.argmax(1) == labels[test]).mean()))
    held = evaluate(kb, labels, holdout, classes)
    print(f"{'method':<58} {args.folds}-fold CV (kb)  hold-out ({len(truth)})")
    for name, scores in held.items():
        accuracy = float((scores.argmax(1) == truth).mean())
        print(f"{name:<58} {100 * np.mean(cv[name]):6.2f}%          {100 * accuracy:6.2f}%")


if __name__ == "__main__":
    main()
