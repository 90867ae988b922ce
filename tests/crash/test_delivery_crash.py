#!/usr/bin/python3
"""Crash consistency of delivery: clients send while finaldot delivers to a
next hop that answers a little slowly (so deliveries are in flight), and
the delivery log is compacted every few hundred records (so compactions
are in flight too); kill -9 at a random moment, restart on the same spool,
repeat. At the end every acknowledged message has reached the next hop at
least once, and the copies beyond the first are no more than the attempts
the restarts reported as possibly in flight (event=queue_rebuilt
possible_duplicates=N): duplicates only for attempts in flight, counted.

Usage: test_delivery_crash.py [ROUNDS] [SEED]"""
import os
import random
import re
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                "integration"))
import crashload  # noqa: E402
from fdtest import CRLF, Daemon, check  # noqa: E402
from peers import ScriptedHop, Script, Delay  # noqa: E402

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
SEED = int(sys.argv[2]) if len(sys.argv) > 2 else int(time.time())
CLIENTS = 4
TAG = re.compile(rb"Subject: (r\d+c\d+-\d+)\r\n")


refused = []  # 5xx to a final dot: the test's own messages are valid


def client(port, tag, rng, acked, stop):
    def body(n):
        size = rng.choice([100, 3000, 20000])
        name = f"{tag}-{n}"
        return name, (f"Subject: {name}\r\n\r\n".encode() +
                      CRLF.join([name.encode() + b" " + b"x" * 60] *
                                (size // 70 + 1)) + CRLF)

    def seen(name, _, r):
        if r.startswith(b"250 "):
            acked.append(name)
        elif r.startswith(b"5"):
            refused.append(r)

    crashload.client(port, stop, body, seen, sender=b"c@example.com",
                     rcpt=b"u@dest.test")


def main():
    rng = random.Random(SEED)
    print(f"delivery crash test: {ROUNDS} rounds, seed {SEED}")
    acked = []
    possible = 0
    script = Script(dot=Delay(0.02, None))
    with ScriptedHop(script=script) as hop, \
            Daemon("--route", f"dest.test={hop.target}",
                   "--retry-min", "1s", "--retry-max", "1s",
                   "--dlog-rotate", "16k", "--segment-size", "1M",
                   "--batch-size", "64k", threads=2, delivery=True,
                   domains=("example.com", "dest.test")) as d:
        for rnd in range(ROUNDS):
            stop = threading.Event()
            threads = [threading.Thread(
                target=client,
                args=(d.port, f"r{rnd}c{i}", random.Random(rng.random()),
                      acked, stop), daemon=True) for i in range(CLIENTS)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.5, 2.0))
            d.kill9()
            stop.set()
            for t in threads:
                t.join(10)
            d.start()
            m = re.findall(r"event=queue_rebuilt .*possible_duplicates=(\d+)",
                           d.read_log())
            check(m, "no queue_rebuilt line after the restart")
            possible += int(m[-1])
            print(f"round {rnd}: {len(acked)} acknowledged, "
                  f"{len(hop.completed())} delivered so far, "
                  f"possible duplicates reported {m[-1]}", flush=True)
        # Let everything go out, then count what the next hop has.
        deadline = time.time() + 60
        while time.time() < deadline:
            got = {}
            for t in hop.completed():
                mt = TAG.search(t.body)
                if mt:
                    got[mt.group(1).decode()] = \
                        got.get(mt.group(1).decode(), 0) + 1
            if all(a in got for a in acked):
                break
            check(d.proc.poll() is None,
                  f"finaldot exited ({d.proc.returncode}) while delivering:"
                  f"\n{d.read_log()[-2000:]}")
            time.sleep(0.2)
        missing = [a for a in acked if a not in got]
        check(not missing, f"{len(missing)} acknowledged messages never "
              f"delivered, e.g. {missing[:5]}")
        dups = sum(c - 1 for c in got.values() if c > 1)
        print(f"delivered {len(got)} distinct, {dups} duplicates, "
              f"{possible} possible duplicates reported")
        check(dups <= possible, f"{dups} duplicates but only {possible} "
              "attempts in flight were reported")
        check(d.stop() == 0, "clean stop")
    check(len(acked) > 0, "some messages were acknowledged")
    check(not refused, f"{len(refused)} messages refused: {refused[:3]}")
    print(f"ok: {len(acked)} acknowledged messages, {ROUNDS} kill -9, "
          f"{dups} duplicates (<= {possible} reported)")


main()
