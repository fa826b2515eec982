#!/usr/bin/env python3
"""Issue 11, item 2: does a lexical classifier blended with the engine's scores beat the tuned
encoder alone? An experiment, not part of the product (see models/README.md, "A lexical head
beside the encoder").

What it does, on the files `examples/intent_cv.rs --export PREFIX` writes (PREFIX.tsv: row, fold,
label, intent, text of every question; PREFIX-tuned.f32: the engine's blended scores in the
shipped cell for every scored question, 77 little-endian f32 per row):
  1. For each fold (cross-validation: the 5 folds of intent_cv, seed 11; hold-out: the
     knowledge base against the hold-out), trains a multinomial logistic regression (sklearn,
     L-BFGS, L2 with inverse strength C) on TF-IDF features of the training questions: word
     1-2-grams (`w`), character 2-5-grams inside word boundaries (`c`), or both (`wc`), with
     sublinear term frequency.
  2. Scores each test question by (1 - w) * engine + w * lexical for w in 0.1-0.5, and
     reports top-1 against the engine's scores alone.

Needs a venv with numpy==2.4.6 scikit-learn==1.9.1 scipy==1.17.1.

Usage:
  cargo build --release --example intent_cv
  E=target/release/examples/intent_cv
  $E --states /tmp/kb.states --export /tmp/xp/cv                # 5-fold CV inside the kb
  $E --states /tmp/kbh.states --holdout tests/data/banking77/holdout.csv --export /tmp/xp/ho
  scripts/lexical_blend_experiment.py cv /tmp/xp/cv
  scripts/lexical_blend_experiment.py holdout /tmp/xp/ho
"""

import argparse
import sys

import numpy as np
from scipy.sparse import hstack
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression


def load(prefix, variant):
    """The exported questions and the engine's scores for them."""
    rows = [line.rstrip("\n").split("\t", 4) for line in open(prefix + ".tsv", encoding="utf-8")]
    folds = np.array([int(row[1]) for row in rows])
    labels = np.array([int(row[2]) for row in rows])
    texts = [row[4] for row in rows]
    scores = np.fromfile(f"{prefix}-{variant}.f32", dtype="<f4")
    if scores.size % len(rows) != 0:
        sys.exit(f"{prefix}-{variant}.f32: {scores.size} floats is not a multiple of {len(rows)} rows")
    return folds, labels, texts, scores.reshape(len(rows), -1)


def vectorisers(kind):
    chosen = []
    if "w" in kind:
        chosen.append(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True))
    if "c" in kind:
        chosen.append(TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2))
    return chosen


def lexical_probabilities(labels, texts, splits, kind, inverse_l2, classes):
    """Per test question of every split, the lexical classifier's probabilities."""
    probabilities = np.full((len(texts), classes), np.nan)
    for train, test in splits:
        chosen = vectorisers(kind)
        train_x = hstack([v.fit_transform([texts[i] for i in train]) for v in chosen]).tocsr()
        test_x = hstack([v.transform([texts[i] for i in test]) for v in chosen]).tocsr()
        model = LogisticRegression(C=inverse_l2, max_iter=2000).fit(train_x, labels[train])
        probabilities[np.ix_(test, model.classes_)] = model.predict_proba(test_x)
    return probabilities


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["cv", "holdout"])
    parser.add_argument("prefix", help="the PREFIX given to intent_cv --export")
    parser.add_argument("--variant", default="tuned", help="which exported variant (default tuned)")
    args = parser.parse_args()
    folds, labels, texts, engine = load(args.prefix, args.variant)
    if args.mode == "cv":
        splits = [(np.where(folds != f)[0], np.where(folds == f)[0]) for f in range(folds.max() + 1)]
    else:
        # intent_cv --holdout puts the knowledge base in fold 1 and the hold-out in fold 0.
        splits = [(np.where(folds == 1)[0], np.where(folds == 0)[0])]
    test = np.concatenate([t for _, t in splits])
    if np.isnan(engine[test]).any():
        sys.exit("some test question has no exported engine scores: was the export of this mode?")
    right = int((engine[test].argmax(1) == labels[test]).sum())
    print(f"engine alone: {right} of {len(test)} ({100 * right / len(test):.2f}%)")
    for kind in ["w", "c", "wc"]:
        for inverse_l2 in [3, 10, 30]:
            lexical = lexical_probabilities(labels, texts, splits, kind, inverse_l2, engine.shape[1])
            alone = int((lexical[test].argmax(1) == labels[test]).sum())
            cells = [f"{kind} C{inverse_l2}: lexical alone {100 * alone / len(test):.2f}%"]
            for weight in [0.1, 0.2, 0.3, 0.4, 0.5]:
                blended = (1 - weight) * engine[test] + weight * lexical[test]
                right = int((blended.argmax(1) == labels[test]).sum())
                cells.append(f"w{weight}: {right} ({100 * right / len(test):.2f}%)")
            print("  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
