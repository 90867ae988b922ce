#!/usr/bin/python3
"""How delivery threads share a fast next hop's mail:

- case_fast_hop_batches: under a pipelining load, a next hop that answers
  fast (fd-sink, CHUNKING) gets its messages in batches: the threads
  working for it take what waited meanwhile, up to 16 at once, instead of
  one thread woken per message (attempts per batch from /metrics:
  finaldot_route_batches_total against the delivery histogram's count),
  and messages sent one at a time go over one connection (the thread
  woken for a next hop is one that holds a connection to it); every
  message arrives once;
- case_stuck_connection: one connection to that fast next hop stops
  answering (fd-sink --stall: a final reply held for seconds): mail queued
  behind it does not wait for it, another connection takes it.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import Daemon, check, free_port, skip, start_sink  # noqa
from delivtest import send, message, wait, log_count, run_cases  # noqa

SINK = os.environ.get("FD_SINK")
LOADGEN = os.environ.get("FD_LOADGEN")


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                timeout=10) as r:
        return r.read().decode()


def sample(text, name, route):
    m = re.search(rf'^{name}\{{route="{re.escape(route)}"\}} (\d+)$', text,
                  re.M)
    check(m, f"no {name} for {route} in /metrics")
    return int(m.group(1))


def need_tools():
    if not SINK or not LOADGEN or not os.access(SINK, os.X_OK):
        skip("FD_SINK/FD_LOADGEN not set (tools not built)")


def established_to(port):
    """TCP connections (IPv4) established to 127.0.0.1:port, as the
    kernel lists them."""
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            rem, st = fields[2], fields[3]
            if st == "01" and int(rem.split(":")[1], 16) == port:
                n += 1
    return n


def case_fast_hop_batches():
    need_tools()
    sink, sport = start_sink(SINK)
    try:
        mport = free_port()
        route = f"smtp:127.0.0.1:{sport}"
        with Daemon("--route", f"localhost={route}", "--metrics",
                    f"127.0.0.1:{mport}", delivery=True) as d:
            # Some alone first: the next hop shows it is fast (a moving
            # average that starts out slow).
            sent = r"event=delivery .*status=sent"
            for i in range(40):
                send(d, "a@example.com", ["user@localhost"],
                     message(500 + i, size=800))
                wait(lambda: log_count(d, sent) > i, 20,
                     f"message {i + 1} delivered")
            # One at a time, each delivered before the next: one
            # connection, the thread woken for a next hop being one that
            # holds a connection to it (with one condition for all, any of
            # the 32 threads woke, and each opened a connection of its own
            # and kept it: 14-25 here).
            conns = established_to(sport)
            check(conns <= 2, f"{conns} connections to the next hop for "
                  "40 messages one at a time: idle threads without one "
                  "were woken for it")
            n = 12000
            r = subprocess.run([LOADGEN, "--server", f"127.0.0.1:{d.port}",
                                "--connections", "32", "--messages", str(n),
                                "--pipelining", "--size", "4096", "--json"],
                               capture_output=True, text=True, timeout=240)
            check(r.returncode == 0, f"fd-loadgen: {r.returncode} "
                  f"{r.stderr[-500:]}")
            total = n + 40
            wait(lambda: log_count(d, r"event=delivery .*status=sent")
                 >= total, 120, f"{total} delivered")
            # /metrics is published four times a second.
            seen = {}

            def published():
                text = metrics(mport)
                seen["attempts"] = sample(
                    text, "finaldot_delivery_duration_seconds_count", route)
                seen["batches"] = sample(
                    text, "finaldot_route_batches_total", route)
                return seen["attempts"] >= total
            wait(published, 10, "/metrics with every attempt")
            attempts, batches = seen["attempts"], seen["batches"]
    finally:
        sink.send_signal(signal.SIGTERM)
        out, _ = sink.communicate(timeout=10)
    got = json.loads(out)
    check(got["messages"] == total, f"fd-sink got {got['messages']} of "
          f"{total} messages")
    check(attempts == total, f"{attempts} attempts for {total} messages")
    per = attempts / batches
    print(f"# {attempts} attempts in {batches} batches: {per:.1f} a batch; "
          f"{got['sessions']} connections", flush=True)
    # One thread woken per message and an even share per free connection
    # gave ~6 here; batches of what waited give ~15.
    check(per >= 9, f"{per:.1f} attempts per batch: a fast next hop's "
          "mail is not batched")


def case_stuck_connection():
    """fd-sink holds the reply to the 41st message, and that connection,
    for 8 s; three messages queued behind it are delivered meanwhile."""
    need_tools()
    sink, sport = start_sink(SINK, "--stall", "41:8000")
    try:
        # Two delivery threads: each keeps its connection while busy, so
        # the next hop shows itself fast.
        with Daemon("--route", f"localhost=smtp:127.0.0.1:{sport}",
                    "--delivery-threads", "2", delivery=True) as d:
            # Fast while it answers: 40 through, one at a time.
            for i in range(40):
                send(d, "a@example.com", ["user@localhost"],
                     message(600 + i, size=600))
            sent = r"event=delivery .*status=sent"
            wait(lambda: log_count(d, sent) >= 40, 20, "the first 40")
            # Idle connections close after 5 s: the thread not stuck then
            # holds none to this next hop, and takes its mail only if the
            # wait for the stuck one is bounded (without the bound, a
            # thread that kept a connection finds the mail within a
            # second anyway, its idle wait running out).
            time.sleep(6.5)
            send(d, "a@example.com", ["user@localhost"],
                 message(640, size=600))
            time.sleep(0.3)  # the 41st waits for its reply
            t0 = time.time()
            for i in range(3):
                send(d, "a@example.com", ["user@localhost"],
                     message(641 + i, size=600))
            # Delivered through another connection, long before the
            # stuck one answers (in ~10 ms).
            deadline = t0 + 4
            while log_count(d, sent) < 43 and time.time() < deadline:
                time.sleep(0.02)
            took = time.time() - t0
            check(log_count(d, sent) == 43, f"{log_count(d, sent) - 40} "
                  f"of 3 delivered in {took:.1f} s while one connection "
                  "is stuck: they wait for it")
            wait(lambda: log_count(d, sent) >= 44, 20, "all 44 in the end")
    finally:
        sink.send_signal(signal.SIGTERM)
        out, _ = sink.communicate(timeout=10)
    got = json.loads(out)
    check(got["messages"] == 44, f"fd-sink got {got['messages']} of 44")


CASES = [case_fast_hop_batches, case_stuck_connection]

if __name__ == "__main__":
    run_cases(CASES)
