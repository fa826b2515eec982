#!/usr/bin/env python3
"""Deterministic stratified hold-out split of the BANKING77 training data.

For every intent, the rows are ordered by sha256(text) (ties, which do not occur
in the shipped data, by line order) and the first round(10%) of them — at least
one — become the hold-out set; the rest form the knowledge base. No random
generator is involved, so any language can reproduce the split exactly.

Usage: scripts/split_banking77.py [SOURCE_CSV] [OUT_DIR]
  SOURCE_CSV defaults to ../shared/data/banking77/train.csv next to the repo,
  OUT_DIR    defaults to tests/data/banking77 in the repo.
Writes OUT_DIR/kb.csv and OUT_DIR/holdout.csv (header `text,category`, rows in
the source order) and prints the row counts.

Data: BANKING77 (Casanueva et al., 2020), CC BY 4.0.
"""

import csv
import hashlib
import os
import sys
from collections import defaultdict

HOLDOUT_FRACTION = 0.10


def split(rows):
    by_intent = defaultdict(list)
    for line_no, (text, category) in enumerate(rows):
        by_intent[category].append((hashlib.sha256(text.encode("utf-8")).hexdigest(), line_no))
    held = set()
    for members in by_intent.values():
        members.sort()
        count = max(1, round(len(members) * HOLDOUT_FRACTION))
        held.update(line_no for _, line_no in members[:count])
    kb = [row for i, row in enumerate(rows) if i not in held]
    holdout = [row for i, row in enumerate(rows) if i in held]
    return kb, holdout


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        if header[:2] != ["text", "category"]:
            sys.exit(f"{path}: expected header text,category, got {header}")
        return [(r[0], r[1]) for r in reader]


def write_rows(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["text", "category"])
        writer.writerows(rows)


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = sys.argv[1] if len(sys.argv) > 1 else os.path.join(repo, "..", "shared", "data", "banking77", "train.csv")
    out_dir = sys.argv[2] if len(sys.argv) > 2 else os.path.join(repo, "tests", "data", "banking77")
    rows = read_rows(source)
    kb, holdout = split(rows)
    os.makedirs(out_dir, exist_ok=True)
    write_rows(os.path.join(out_dir, "kb.csv"), kb)
    write_rows(os.path.join(out_dir, "holdout.csv"), holdout)
    print(f"source rows: {len(rows)}  kb: {len(kb)}  holdout: {len(holdout)}  intents: {len({c for _, c in rows})}")


if __name__ == "__main__":
    main()
