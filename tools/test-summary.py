#!/usr/bin/python3
"""Sum test results over meson test logs.

Usage: test-summary.py BUILD_DIR...

For each build dir, reads meson-logs/testlog*.json (one per meson test
run; tools/test names extra runs with --logbase). A TAP test (Criterion
with --tap) counts each of its subtests ("ok", "not ok", "# SKIP"); any
other test counts once by its meson result. Prints per-suite lines, then the
closing line `N passed, N failed[, N skipped]`. Exit 1 if anything failed or
if no test ran at all.
"""
import glob
import json
import re
import sys
from collections import defaultdict

# "ok 3 - name", "not ok 4", "ok - name": not a script's "ok: ..." line.
TAP_LINE = re.compile(r"^(not ok|ok)((?:\s+\d+|\s+-|\s*$).*)$")


def tap_counts(text):
    p = f = s = 0
    for line in text.splitlines():
        m = TAP_LINE.match(line.strip())
        if not m:
            continue
        rest = m.group(2)
        if re.search(r"#\s*skip", rest, re.I):
            s += 1
        elif m.group(1) == "ok":
            p += 1
        else:
            f += 1
    return p, f, s


def main(dirs):
    per_suite = defaultdict(lambda: [0, 0, 0])
    failed_names = []
    for d in dirs:
        # testlog.json, and testlog-NAME.json from runs with --logbase.
        logs = sorted(glob.glob(f"{d}/meson-logs/testlog*.json"))
        if not logs:
            print(f"test-summary: {d}: no meson-logs/testlog*.json",
                  file=sys.stderr)
            per_suite[f"{d}:missing"][1] += 1
            continue
        lines = []
        for log in logs:
            with open(log) as fh:
                lines += fh.readlines()
        for line in lines:
            t = json.loads(line)
            # name is "project:suite / test" (meson's testlog.json)
            head = t.get("name", "?").split(" / ")[0]
            suite = f"{d.rstrip('/').split('/')[-1]}:{head.split(':')[-1]}"
            res = t.get("result")
            out = t.get("stdout") or ""
            counted = False
            if any(TAP_LINE.match(l.strip()) for l in out.splitlines()):
                p, f, s = tap_counts(out)
                if p + f + s:
                    # A crash after some subtests still fails the test.
                    if res not in ("OK", "SKIP", "EXPECTEDFAIL") and f == 0:
                        f = 1
                    counted = True
            if not counted:
                p = 1 if res in ("OK", "EXPECTEDFAIL") else 0
                s = 1 if res == "SKIP" else 0
                f = 0 if (p or s) else 1
            if f:
                failed_names.append(f"{suite}/{t.get('name')}")
            ps = per_suite[suite]
            ps[0] += p
            ps[1] += f
            ps[2] += s
    tp = tf = ts = 0
    for suite in sorted(per_suite):
        p, f, s = per_suite[suite]
        tp, tf, ts = tp + p, tf + f, ts + s
        print(f"  {suite:32} {p:5} passed {f:4} failed {s:4} skipped")
    for n in failed_names:
        print(f"  FAILED: {n}")
    line = f"{tp} passed, {tf} failed"
    if ts:
        line += f", {ts} skipped"
    print(line)
    return 1 if tf or tp == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
