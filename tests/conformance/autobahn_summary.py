#!/usr/bin/env python
"""Summarize an Autobahn|Testsuite fuzzingclient report (reports/index.json).

Usage: autobahn_summary.py INDEX_JSON [REQUIRED_CASE_PREFIX ...]

Every case's `behavior` and `behaviorClose` must be OK, NON-STRICT or
INFORMATIONAL. Prints the counts per behaviour, lists every case that is not
(FAILED, UNCLEAN, UNIMPLEMENTED, ...), and exits 1 if there is any such case,
if the report holds no case at all, or if a required case group (for example
"9." for "9.*") has no case in it: an empty or truncated run never passes.
Exit code 2 means the report could not be read.

Runs on Python 2.7 (the Autobahn venv) and Python 3 alike.
"""
from __future__ import print_function

import json
import sys

ACCEPTED = ("OK", "NON-STRICT", "INFORMATIONAL")


def case_sort_key(case_id):
    """'9.10.2' sorts after '9.2.1': compare the dotted parts as numbers."""
    parts = []
    for part in case_id.split("."):
        try:
            parts.append((0, int(part), ""))
        except ValueError:
            parts.append((1, 0, part))
    return parts


def summarize(index, required_prefixes):
    """Return (lines to print, ok flag) for a parsed index.json."""
    lines = []
    ok = True
    if not index:
        return ["no agent in the report"], False
    for agent in sorted(index):
        cases = index[agent]
        counts = {}
        bad = []
        for case_id in sorted(cases, key=case_sort_key):
            result = cases[case_id]
            behavior = result.get("behavior", "MISSING")
            close = result.get("behaviorClose", "MISSING")
            counts[behavior] = counts.get(behavior, 0) + 1
            if behavior not in ACCEPTED or close not in ACCEPTED:
                bad.append(
                    "  %-10s behavior=%s behaviorClose=%s remoteCloseCode=%s report=%s"
                    % (case_id, behavior, close, result.get("remoteCloseCode"),
                       result.get("reportfile", "?"))
                )
        durations = [cases[c].get("duration", 0) or 0 for c in cases]
        lines.append(
            "agent %s: %d cases, %.1f s of case time" % (agent, len(cases), sum(durations) / 1000.0)
        )
        for behavior in sorted(counts):
            lines.append("  %-14s %d" % (behavior, counts[behavior]))
        groups = {}
        for case_id in cases:
            group = case_id.split(".")[0]
            groups[group] = groups.get(group, 0) + 1
        lines.append(
            "  per group: "
            + ", ".join("%s.*=%d" % (g, groups[g]) for g in sorted(groups, key=case_sort_key))
        )
        if not cases:
            lines.append("  ERROR: the report holds no case")
            ok = False
        for prefix in required_prefixes:
            if not any(c.startswith(prefix) for c in cases):
                lines.append("  ERROR: no case %s* in the report" % prefix)
                ok = False
        if bad:
            ok = False
            lines.append("  %d case(s) not OK/NON-STRICT/INFORMATIONAL:" % len(bad))
            lines.extend(bad)
    return lines, ok


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        with open(argv[1]) as handle:
            index = json.load(handle)
    except (IOError, OSError, ValueError) as error:
        print("cannot read Autobahn report %s: %s" % (argv[1], error), file=sys.stderr)
        return 2
    lines, ok = summarize(index, argv[2:])
    for line in lines:
        print(line)
    print("Autobahn result: %s" % ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
