#!/usr/bin/python3
"""Issue 10: SIGTERM is bounded by --shutdown-timeout even when the spool's
writes cannot finish, and no client whose message was committed is left
with a bare close.

  - writes held (fault seam hold:PATH) and never released: SIGTERM with
    --shutdown-timeout 2s; every session with a final dot in flight is
    answered 421 4.3.2 (its message may or may not become durable: the
    client retries, a duplicate is allowed, a loss is not) and the daemon
    exits 0, well before the 20 s the old code needed (it never did);
  - writes held past the deadline, then released: the same 421 before the
    close, never an EOF without a reply;
  - writes released before the deadline: each waiting session gets its 250,
    then 421 4.3.2, and the message is in the spool.
Needs the fault seam (a test build).

Usage: test_shutdown.py [kernel|dpdk]: dpdk runs the same on the DPDK
transport (net_tap in a namespace the test makes; root), where the shard
used to wait for the held writes however long they took."""
import ctypes
import os
import signal
import sys
import tempfile
import threading
import time

from fdtest import Daemon, check, queued_id, skip

TRANSPORT = sys.argv[1] if len(sys.argv) > 1 else "kernel"
HOST = "127.0.0.1"
NS = None

SESSIONS = 6


def start(d, n):
    c = d.connect(timeout=30, host=HOST)
    c.expect(220)
    c.cmd("EHLO stop.test", 250)
    c.cmd(f"MAIL FROM:<s{n}@stop.test>", 250)
    c.cmd("RCPT TO:<u@example.com>", 250)
    c.cmd("DATA", 354)
    c.send(f"Subject: stop {n}\r\n\r\nbody {n}\r\n.\r\n")
    return c


def replies_until_close(c):
    """Every reply line until EOF: a bare close gives []."""
    out = []
    try:
        while True:
            out.append(c.reply())
    except (ConnectionError, OSError):
        pass
    return out


def run(release_at):
    """release_at: seconds after SIGTERM to release the hold (None: never)."""
    hold = tempfile.mktemp(prefix="fdhold-")
    open(hold, "w").close()
    try:
        with daemon("--shutdown-timeout", "2s",
                    env={"FINALDOT_SPOOL_FAULT": f"hold:{hold}"}) as d:
            clients = [start(d, n) for n in range(SESSIONS)]
            time.sleep(0.3)  # every final dot is in: commits held
            t0 = time.monotonic()
            os.kill(d.proc.pid, signal.SIGTERM)
            got = [None] * SESSIONS

            def collect(i):
                got[i] = replies_until_close(clients[i])

            threads = [threading.Thread(target=collect, args=(i,))
                       for i in range(SESSIONS)]
            for t in threads:
                t.start()
            if release_at is not None:
                time.sleep(release_at)
                os.unlink(hold)
            try:
                rc = d.proc.wait(15)
            except Exception:
                check(False, f"release_at={release_at}: still running 15 s "
                      f"after SIGTERM with --shutdown-timeout 2s")
            took = time.monotonic() - t0
            for t in threads:
                t.join(10)
            check(rc == 0, f"exit status {rc}")
            ids = {m["id"] for m in d.scan()["messages"]}
            for i, rs in enumerate(got):
                codes = [r[0] for r in rs]
                check(rs, f"release_at={release_at}: session {i} was "
                      f"closed without a reply")
                check(codes[-1] == 421 and "4.3.2" in rs[-1][1][0],
                      f"session {i}: last reply {rs[-1]}, want 421 4.3.2")
                if codes[0] == 250:
                    check(queued_id(rs[0][1]) in ids,
                          f"session {i}: a 250 for a message not stored")
                else:
                    check(codes == [421], f"session {i}: replies {rs}")
                if release_at is not None and release_at < 1:
                    check(codes == [250, 421],
                          f"session {i}: released in time, want 250 then "
                          f"421, got {codes}")
            return took
    finally:
        if os.path.exists(hold):
            os.unlink(hold)


def daemon(*args, **kw):
    if TRANSPORT == "dpdk":
        from fdnet import DpdkDaemon
        return DpdkDaemon(NS, *args, **kw)
    return Daemon(*args, **kw)


def enter_netns(name):
    """This thread (and the ones it starts) joins the test's namespace, so
    that the clients reach the DPDK port's address; the daemon itself is
    started there by `ip netns exec`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            skip(f"setns: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def main():
    global HOST, NS
    if TRANSPORT == "dpdk":
        from fdnet import DPDK_IP, Netns, need_root_netns
        if os.geteuid() != 0:
            skip("needs root (network namespace)")
        need_root_netns()
        with Netns() as ns:
            NS, HOST = ns, DPDK_IP
            enter_netns(ns.name)
            took = run(None)
            run(0.5)
    else:
        took = run(None)
        run(4.0)
        run(0.5)
    print(f"ok: {TRANSPORT}: SIGTERM with writes held exits in {took:.1f}s "
          f"(timeout 2s) after a 421 4.3.2 to every waiting client; released "
          f"in time, each gets its 250 first")


main()
