#!/usr/bin/python3
"""Power cuts while deferred messages are moved out of their segments
(docs/delivery.md, "Moved messages"): the spool and its Maildir route on
fdpowerfs (docs/powercut.md), one message in three for a next hop that is
down, --move-after 1s. Each round: send, wait until messages were moved
and their segments handed back (reclaimed: the old copies are stale from
then on), kill -9, cut the power (drop, or keep a random subset of the
unflushed sectors), mount what survived, restart. At the end the next
hop comes up and every acknowledged message for it must arrive exactly
once (a message moved but not durable, its segment reused, is lost).

Usage: test_powercut_moved.py [ROUNDS] [SEED] [--mutant SPEC]
  --mutant SPEC   FINALDOT_DELIVERY_FAULT=SPEC (no-moved-fsync,
                  no-moved-dirsync): PASS only if the loop catches it.
Exits 0 pass, 1 fail, 77 skip (no FUSE, no simulator, no seam)."""
import json
import os
import random
import re
import shutil
import smtplib
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                "integration"))
from fdtest import Daemon, check, fail, free_port  # noqa: E402
from delivtest import message, wait  # noqa: E402
from peers import ScriptedHop, Script  # noqa: E402
from powerfs import PowerFS, loop_args, need_powerfs  # noqa: E402

ROUNDS, SEED, MUTANT = loop_args()
MODES = ("drop", "torn512", "torn4k")
TAG = re.compile(rb"Subject: (p\d+-\d+)")


def send(port, to, body):
    """One message; True once it got its 250 (452s retried: the spool at
    its limit until a segment is emptied, as a client would)."""
    for _ in range(60):
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                s.sendmail("a@example.com", [to], body)
            return True
        except smtplib.SMTPDataError as e:
            if e.smtp_code != 452:
                fail(f"DATA: {e}")
            time.sleep(0.5)
    fail("452 for 30 s")


def status(d):
    return json.loads(d.ctl("status", "--json")[1])["delivery"]


def main():
    need_powerfs(MUTANT)
    rng = random.Random(SEED)
    print(f"powercut moved: {ROUNDS} rounds, seed {SEED}, "
          f"mutant {MUTANT or 'none'}", flush=True)
    work = tempfile.mkdtemp(prefix="fdpowercut-mv-")
    fs = PowerFS(work)
    ctl = os.path.join(work, "ctl.sock")
    port = free_port()
    env = {"FINALDOT_DELIVERY_FAULT": MUTANT} if MUTANT else None
    acked = []  # tags of acknowledged messages for the dead next hop
    try:
        fs.mount()
        root = os.path.join(fs.mnt, "maildir")
        os.mkdir(root)
        with Daemon("--segment-size", "1M", "--spare-segments", "0",
                    "--move-after", "1s", "--retry-min", "300s",
                    "--retry-max", "300s", "--smtp-connect-timeout", "2s",
                    "--control", ctl, "--relay", f"maildir:{root}",
                    "--route", f"dead.test=smtp:127.0.0.1:{port}",
                    spool=os.path.join(fs.mnt, "spool"), delivery=True,
                    domains=("example.com", "dead.test"), env=env) as d:
            for rnd in range(ROUNDS):
                st0 = status(d)
                for i in range(90):
                    tag = f"p{rnd}-{i}"
                    dead = i % 3 == 0
                    body = message(i, size=20000, subject=tag)
                    send(d.port, "b@dead.test" if dead else
                         "u@example.com", body)
                    if dead:
                        acked.append(tag)
                # Moved, and segments handed back since: the old copies
                # of moved messages may be overwritten from now on.
                wait(lambda: status(d)["moved_total"] >
                     st0["moved_total"] and status(d)["reclaimed_total"] >
                     st0["reclaimed_total"], 30, "moves and a reclaim")
                time.sleep(rng.uniform(0, 1.0))
                d.kill9()
                mode = "drop" if rnd == 0 else rng.choice(MODES)
                fs.cut(mode, rng.randrange(1 << 32))
                fs.mount()
                d.start()
                log = d.read_run_log()
                m = re.findall(r"event=moved_recovered .*", log)
                print(f"round {rnd}: cut={mode} acknowledged={len(acked)} "
                      f"{m[-1] if m else 'no moved files'}", flush=True)
            with ScriptedHop(port=port, script=Script()) as hop:
                d.ctl("queue", "flush")
                try:
                    # (a mutant loses messages: no use waiting long)
                    hop.wait_for(len(acked), 10 if MUTANT else 60)
                except SystemExit:
                    pass  # counted below
                time.sleep(2)  # anything sent twice has arrived too
                got = [TAG.search(t.body).group(1).decode()
                       for t in hop.completed() if TAG.search(t.body)]
            lost = sorted(set(acked) - set(got))
            twice = sorted({t for t in got if got.count(t) > 1})
            print(f"acknowledged={len(acked)} arrived={len(got)} "
                  f"lost={len(lost)} twice={len(twice)}", flush=True)
            if MUTANT:
                check(lost or twice, f"mutant {MUTANT}: nothing lost "
                      f"after {ROUNDS} power cuts: the loop did not catch "
                      "the missing durability")
                print(f"ok: mutant {MUTANT} caught: {len(lost)} lost")
                return
            check(not lost, f"{len(lost)} acknowledged messages lost, "
                  f"e.g. {lost[:5]}")
            check(not twice, f"delivered twice: {twice[:5]}")
            check(d.stop() == 0, "clean stop")
        fs.unmount()
    finally:
        fs.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print(f"ok: rounds={ROUNDS} acknowledged={len(acked)} lost=0 twice=0")


if __name__ == "__main__":
    main()
