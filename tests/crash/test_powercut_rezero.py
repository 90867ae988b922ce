#!/usr/bin/python3
"""A power cut while the preparer zeroes a leftover segment anew (issue 9,
docs/spool-format.md "Segment preparation"). A reclaimed spare keeps the
stale records of its earlier use behind its new header; started with
another --segment-size, the preparer makes it over to the new size. The
writes of that remake may reach the disk in any order before its fsync
(fdpowerfs's `keep` cut: every written sector lands, the truncate does
not), so block 0 must keep a valid header until the new one goes over it:
a header zeroed in front of those stale records read at the next start
as a damaged segment holding records, sealed for good (its space never
reused) and its long-delivered messages salvaged.

Each round: mail through 1 MiB segments, all of it delivered into a
Maildir off the simulator, segments reclaimed; a clean stop; a start with
2 MiB segments and the zeroing slowed by the fault seam (prep-slow), a
kill -9 in the middle of it; the cut; a start. Nothing may be damaged,
the remade file must be in use again, and no message delivered twice.

Usage: test_powercut_rezero.py [ROUNDS]
Exits 0 pass, 1 fail, 77 skip (no FUSE, no simulator, no fault seam)."""
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                "integration"))
from fdtest import Daemon, check, skip  # noqa: E402
from delivtest import message, wait  # noqa: E402
from powerfs import PowerFS, need_powerfs  # noqa: E402
import smtplib  # noqa: E402

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
DOMAIN = "example.com"
SLOW_MS = 400   # before each 256 KiB chunk of zeros
CHUNK = 256 << 10
BLOCK = 4096
TAG = re.compile(rb"Subject: (r\d+-\d+)")


def delivered(root):
    """Subject tags of every message in the Maildir, one per file."""
    tags = []
    for dirpath, _, files in os.walk(root):
        if os.path.basename(dirpath) != "new":
            continue
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                m = TAG.search(f.read())
            if m:
                tags.append(m.group(1).decode())
    return tags


def caught_mid_zeroing(spool):
    """(name, header_zero) of a segment the cut caught being zeroed over
    stale bytes: still its old size (1 MiB), the first chunk of zeros
    written, records left beyond them. None if the cut caught none."""
    for dirpath, _, files in os.walk(spool):
        for name in files:
            if not name.endswith(".seg"):
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                data = f.read()
            if len(data) != 1 << 20:
                continue
            first = data[BLOCK:BLOCK + CHUNK - BLOCK]
            if first.count(0) == len(first) and \
                    data[2 * CHUNK:].count(0) != len(data) - 2 * CHUNK:
                return name, data[:BLOCK].count(0) == BLOCK
    return None


def one_round(rnd, work):
    os.mkdir(os.path.join(work, f"r{rnd}"))
    fs = PowerFS(os.path.join(work, f"r{rnd}"))
    spool = os.path.join(fs.mnt, "spool")
    sent = []
    try:
        fs.mount()
        with Daemon("--segment-size", "1M", "--spare-segments", "2",
                    spool=spool, delivery=True, domains=(DOMAIN,)) as d:
            root = os.path.join(d.tmp, "maildir")
            with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
                for i in range(220):  # about 2.3 MiB: three segments
                    tag = f"r{rnd}-{i}"
                    s.sendmail("a@client.test", [f"u{i % 4}@{DOMAIN}"],
                               message(i, size=10000, subject=tag))
                    sent.append(tag)
            wait(lambda: len(delivered(root)) >= len(sent), 60,
                 "every message delivered")
            d.wait_log(r"event=segment_reclaimed .*kept=(ready|reserve)",
                       30)
            check(d.stop() == 0, "clean stop")
            # The remake: 2 MiB segments, eight chunks of zeros 400 ms
            # apart; the kill lands after the second or third.
            d.extra = ["--segment-size", "2M", "--spare-segments", "2"]
            d.env["FINALDOT_SPOOL_FAULT"] = f"prep-slow:{SLOW_MS}"
            d.start(wait_ready=False)
            time.sleep(SLOW_MS * 2.5 / 1000)
            d.kill9()
            fs.cut("keep", rnd)
            fs.mount()
            caught = caught_mid_zeroing(spool)
            if caught is None:
                print(f"round {rnd}: the cut caught no remake half-way",
                      flush=True)
                d.proc = None  # killed already: no clean stop to ask
                return None
            name, header_zero = caught
            print(f"round {rnd}: the cut caught {name} mid-zeroing "
                  f"(block 0 {'zeros' if header_zero else 'its header'})",
                  flush=True)
            del d.env["FINALDOT_SPOOL_FAULT"]
            d.start()
            time.sleep(2)  # the queue rebuilt; anything salvaged sent
            log = d.read_run_log()
            damaged = re.findall(r"event=segment_damaged .*", log)
            check(not damaged, f"a segment caught mid-zeroing was kept "
                  f"as damaged (block 0 zeroed before its records):\n"
                  f"{damaged}")
            got = delivered(root)
            twice = sorted({t for t in got if got.count(t) > 1})
            check(not twice, f"delivered twice (stale records salvaged): "
                  f"{twice[:5]}")
            check(sorted(got) == sorted(sent), "every message once")
            check(d.stop() == 0, "clean stop")
        fs.unmount()
    finally:
        fs.cleanup()
    return True


def main():
    need_powerfs("prep-slow")
    work = tempfile.mkdtemp(prefix="fdpowercut-rezero-")
    try:
        caught = 0
        for rnd in range(ROUNDS):
            if one_round(rnd, work):
                caught += 1
        if not caught:
            skip(f"in {ROUNDS} rounds the cut never caught the zeroing "
                 "half-way (the machine too slow for the seam's timing)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"ok: {caught} of {ROUNDS} cuts caught a remake half-way; no "
          "segment damaged, nothing delivered twice")


main()
