#!/usr/bin/python3
"""Crash consistency: under load from several clients, kill -9 the daemon
at a random moment, restart it on the same spool, and check that every
message whose 250 a client saw is recovered intact (byte-identical after the
Received header). Messages without a 250 may or may not be there (RFC 1047:
a duplicate is allowed, a loss is not).

Usage: test_crash.py [ROUNDS] [SEED]   (CI runs a few rounds; tools/crash-soak
runs many)."""
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                "integration"))
import crashload  # noqa: E402
from fdtest import CRLF, Daemon, check, strip_received  # noqa: E402

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
SEED = int(sys.argv[2]) if len(sys.argv) > 2 else int(time.time())
CLIENTS = 8


refused = []  # 5xx to a final dot: the test's own messages are valid


def client(port, tag, rng, acked, stop):
    def body(n):
        size = rng.choice([10, 300, 5000, 70000])
        text = (f"{tag}-{n}-".encode() * (size // 10 + 1))[:size]
        return None, (f"Subject: {tag} {n}\r\n\r\n".encode() +
                      crashload.lines(text) + CRLF)

    def seen(_, b, r):
        if r.startswith(b"250 2.0.0 Ok: queued as "):
            acked.append((r.split()[-1].decode(), b))
        elif r.startswith(b"5"):
            refused.append(r)

    crashload.client(port, stop, body, seen)


def main():
    rng = random.Random(SEED)
    print(f"crash test: {ROUNDS} rounds, seed {SEED}")
    tmp_spool = None
    acked = []
    with Daemon(threads=2) as d:
        tmp_spool = d.spool
        for rnd in range(ROUNDS):
            stop = threading.Event()
            threads = [threading.Thread(
                target=client,
                args=(d.port, f"r{rnd}c{i}", random.Random(rng.random()),
                      acked, stop), daemon=True) for i in range(CLIENTS)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.3, 1.5))
            d.kill9()
            stop.set()
            for t in threads:
                t.join(10)
            d.start()  # same spool: recovery runs before "ready"
            d.wait_log(r"event=recovered .*messages=[1-9]", 5)
            present = {m["id"] for m in d.scan()["messages"]}
            missing = [mid for mid, _ in acked if mid not in present]
            check(not missing, f"round {rnd}: {len(missing)} acknowledged "
                  f"messages lost, e.g. {missing[:5]}")
            print(f"round {rnd}: {len(acked)} acknowledged so far, all present")
        # Byte-for-byte, every one, across all rounds (one export: a
        # "spool cat" per message is a process each, minutes under ASan).
        stored = d.export()
        for mid, body in acked:
            check(strip_received(stored.get(mid, b"")) == body,
                  f"{mid} corrupted")
        ids = [m["id"] for m in d.scan()["messages"]]
        check(len(ids) == len(set(ids)), "message ids are unique")
    check(len(acked) > 0, "some messages were acknowledged")
    check(not refused, f"{len(refused)} messages refused: {refused[:3]}")
    print(f"ok: {len(acked)} acknowledged messages survived {ROUNDS} kill -9")


main()
