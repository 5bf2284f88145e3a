#!/usr/bin/env python3
"""check.py — owns the pass/fail verdict of an Autobahn|Testsuite fuzzingclient run.

Usage: check.py REPORT_DIR_OR_INDEX_JSON

Reads index.json (as written by `wstest -m fuzzingclient`), prints

    autobahn: N cases, N OK, N NON-STRICT, N INFORMATIONAL, N FAILED

(", N UNIMPLEMENTED" is appended only when some case is UNIMPLEMENTED), then one line per
failed case with the result text from its per-case report, and exits 1 if any case failed.

A case passes when both `behavior` and `behaviorClose` are one of OK, NON-STRICT,
INFORMATIONAL or UNIMPLEMENTED. Anything else fails: FAILED, and also autobahn's other
failing verdicts (WRONG CODE, UNCLEAN, FAILED BY CLIENT, NO_CLOSE), which the summary
counts under FAILED and the per-case line names exactly.
Exit codes: 0 all passed, 1 some case failed, 2 report missing/unreadable/empty.
"""
import json
import os
import sys

PASS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED")


def case_key(case_id):
    parts = []
    for p in case_id.split("."):
        parts.append((0, int(p), "") if p.isdigit() else (1, 0, p))
    return parts


def case_text(report_dir, info):
    """Result text ("result" / "resultClose") from the per-case JSON report, if present."""
    name = info.get("reportfile")
    if not name:
        return "", ""
    try:
        with open(os.path.join(report_dir, name), encoding="utf-8", errors="replace") as f:
            rep = json.load(f)
    except (OSError, ValueError):
        return "", ""
    return str(rep.get("result") or ""), str(rep.get("resultClose") or "")


def main(argv):
    if len(argv) != 2:
        print("usage: check.py REPORT_DIR_OR_INDEX_JSON", file=sys.stderr)
        return 2
    path = argv[1]
    index = os.path.join(path, "index.json") if os.path.isdir(path) else path
    report_dir = os.path.dirname(os.path.abspath(index))
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        print("autobahn: cannot read %s: %s" % (index, e))
        return 2
    if not isinstance(data, dict) or not data:
        print("autobahn: %s has no agents (did wstest run any case?)" % index)
        return 2

    counts = {"OK": 0, "NON-STRICT": 0, "INFORMATIONAL": 0, "UNIMPLEMENTED": 0, "FAILED": 0}
    failed = []
    total = 0
    multi_agent = len(data) > 1
    for agent in sorted(data):
        cases = data[agent] or {}
        for case_id in sorted(cases, key=case_key):
            info = cases[case_id] or {}
            total += 1
            beh = info.get("behavior", "MISSING")
            beh_close = info.get("behaviorClose", "MISSING")
            if beh in PASS and beh_close in PASS:
                counts[beh] += 1
                continue
            counts["FAILED"] += 1
            label = ("%s/%s" % (agent, case_id)) if multi_agent else case_id
            failed.append((label, beh, beh_close, info, case_text(report_dir, info)))

    if total == 0:
        print("autobahn: %s lists no cases" % index)
        return 2

    summary = "autobahn: %d cases, %d OK, %d NON-STRICT, %d INFORMATIONAL, %d FAILED" % (
        total, counts["OK"], counts["NON-STRICT"], counts["INFORMATIONAL"], counts["FAILED"])
    if counts["UNIMPLEMENTED"]:
        summary += ", %d UNIMPLEMENTED" % counts["UNIMPLEMENTED"]
    print(summary)
    for label, beh, beh_close, info, (result, result_close) in failed:
        line = "  FAILED %s: behavior=%s behaviorClose=%s remoteCloseCode=%s" % (
            label, beh, beh_close, info.get("remoteCloseCode"))
        print(line)
        if result:
            print("    result: %s" % result)
        if result_close:
            print("    close:  %s" % result_close)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
