#!/usr/bin/python3
"""The durability rule through the spool's fault seam (FINALDOT_SPOOL_FAULT):
  - flush held back: no 250 is sent; once released, the 250 arrives;
  - flush failing: the client gets 451 4.3.0, the message is not reported
    committed, and the session stays usable;
  - no space for a segment: 452 4.3.1."""
import os
import socket
import time

from fdtest import Daemon, check, queued_id


def start_message(c, n=0):
    c.expect(220)
    c.cmd("EHLO f.test", 250)
    c.cmd(f"MAIL FROM:<f{n}@f.test>", 250)
    c.cmd("RCPT TO:<u@example.com>", 250)
    c.cmd("DATA", 354)
    c.send(f"Subject: fault {n}\r\n\r\nbody\r\n.\r\n")


def held():
    import tempfile
    hold = tempfile.mktemp(prefix="fdhold-")
    open(hold, "w").close()
    try:
        with Daemon(env={"FINALDOT_SPOOL_FAULT": f"hold:{hold}"}) as d:
            c = d.connect()
            start_message(c)
            c.sock.settimeout(1.5)
            try:
                data = c.sock.recv(100)
                fail_msg = f"reply while the flush is held: {data!r}"
                check(False, fail_msg)
            except (socket.timeout, TimeoutError):
                pass
            check(d.scan()["messages"] == [],
                  "nothing committed while held")
            os.unlink(hold)
            c.sock.settimeout(10)
            mid = queued_id(c.expect(250))
            check(mid in {m["id"] for m in d.scan()["messages"]},
                  "committed once released")
    finally:
        if os.path.exists(hold):
            os.unlink(hold)


def failing():
    with Daemon(env={"FINALDOT_SPOOL_FAULT": "fail-write"}) as d:
        c = d.connect()
        start_message(c)
        c.expect(451, r"4\.3\.0")
        # Usable afterwards: the next transaction gets its own answer.
        c.cmd("MAIL FROM:<again@f.test>", 250)
        c.cmd("RCPT TO:<u@example.com>", 250)
        c.cmd("DATA", 354)
        c.send("Subject: again\r\n\r\nx\r\n.\r\n")
        c.expect(451, r"4\.3\.0")
        c.cmd("QUIT", 221)
        check(d.scan()["messages"] == [], "failed messages not committed")
    # fail-write:2 - the first batch lands, the second fails, and the first
    # message stays intact.
    with Daemon(env={"FINALDOT_SPOOL_FAULT": "fail-write:2"}) as d:
        c = d.connect()
        start_message(c, 1)
        first = queued_id(c.expect(250))
        c.cmd("MAIL FROM:<two@f.test>", 250)
        c.cmd("RCPT TO:<u@example.com>", 250)
        c.cmd("DATA", 354)
        c.send("Subject: two\r\n\r\nx\r\n.\r\n")
        c.expect(451, r"4\.3\.0")
        ids = [m["id"] for m in d.scan()["messages"]]
        check(ids == [first], f"only the first message committed: {ids}")


def full():
    with Daemon(env={"FINALDOT_SPOOL_FAULT": "enospc"}) as d:
        c = d.connect()
        c.expect(220)
        c.cmd("EHLO f.test", 250)
        c.cmd("MAIL FROM:<f@f.test>", 250)
        c.cmd("RCPT TO:<u@example.com>", 250)
        c.cmd("DATA", 452, r"4\.3\.1")
        c.cmd("QUIT", 221)


def sigterm_with_commit_in_flight():
    """SIGTERM while a flush is held: the commit in flight finishes first
    (its 250 goes out), then 421 4.3.2, then exit 0."""
    import signal
    import tempfile
    hold = tempfile.mktemp(prefix="fdhold-")
    open(hold, "w").close()
    try:
        with Daemon(env={"FINALDOT_SPOOL_FAULT": f"hold:{hold}"}) as d:
            c = d.connect()
            start_message(c)
            time.sleep(0.3)
            os.kill(d.proc.pid, signal.SIGTERM)
            d.wait_log("event=stopping", 5)
            os.unlink(hold)
            mid = queued_id(c.expect(250))
            c.expect(421, r"4\.3\.2")
            check(c.closed(), "closed after 421")
            check(d.proc.wait(20) == 0, "exit 0")
            check(mid in {m["id"] for m in d.scan()["messages"]},
                  "the message committed during shutdown is in the spool")
    finally:
        if os.path.exists(hold):
            os.unlink(hold)


held()
failing()
full()
sigterm_with_commit_in_flight()
print("ok: held flush sends no 250; failed flush 451 4.3.0; full 452 4.3.1; "
      "SIGTERM lets the commit in flight answer 250 before 421")
