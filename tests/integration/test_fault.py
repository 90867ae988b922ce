#!/usr/bin/python3
"""The durability rule through the spool's fault seam (FINALDOT_SPOOL_FAULT):
  - flush held back: no 250 is sent; once released, the 250 arrives;
  - flush failing: the client gets 451 4.3.0, the message is not reported
    committed, and the session stays usable;
  - no space for a segment: 452 4.3.1 (to BDAT 0 LAST too);
  - a client that half-closes after its final dot gets its 250; one that
    resets the connection meanwhile leaves its message in doubt."""
import os
import socket
import tempfile
import time

from fdtest import Daemon, check, queued_id


def start_message(c, n=0):
    c.expect(220)
    c.cmd("EHLO f.test", 250)
    c.cmd(f"MAIL FROM:<f{n}@f.test>", 250)
    c.cmd("RCPT TO:<u@example.com>", 250)
    c.cmd("DATA", 354)
    c.send(f"Subject: fault {n}\r\n\r\nbody\r\n.\r\n")


class Held:
    """The spool's flushes held back while the file exists (the fault
    seam's hold:PATH); released at the latest when the with-block ends."""

    def __init__(self):
        self.path = tempfile.mktemp(prefix="fdhold-")
        open(self.path, "w").close()

    def release(self):
        if os.path.exists(self.path):
            os.unlink(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def held():
    with Held() as h, \
            Daemon(env={"FINALDOT_SPOOL_FAULT": f"hold:{h.path}"}) as d:
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
        h.release()
        c.sock.settimeout(10)
        mid = queued_id(c.expect(250))
        check(mid in {m["id"] for m in d.scan()["messages"]},
              "committed once released")


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
        # BDAT 0 LAST has no octets to wait on: answered at once too (it
        # waited for room that never came, until the idle timeout).
        c.cmd("MAIL FROM:<f@f.test>", 250)
        c.cmd("RCPT TO:<u@example.com>", 250)
        c.sock.settimeout(5)
        c.cmd("BDAT 0 LAST", 452, r"4\.3\.1")
        c.cmd("QUIT", 221)


def half_closed_after_the_dot():
    """A client that half-closes (SHUT_WR) right after its final dot still
    reads: the 250 reaches it once the message is durable. The connection
    was closed at the EOF, the message stored all the same, and the
    client, with no 250, sent it again."""
    with Held() as h, \
            Daemon(env={"FINALDOT_SPOOL_FAULT": f"hold:{h.path}"}) as d:
        c = d.connect()
        start_message(c)
        time.sleep(0.3)  # the commit is pending (held)
        c.sock.shutdown(socket.SHUT_WR)
        time.sleep(0.3)
        h.release()
        c.sock.settimeout(10)
        mid = queued_id(c.expect(250))
        check(c.closed(), "closed after the reply")
        check(mid in {m["id"] for m in d.scan()["messages"]},
              "the message is in the spool")


def reset_while_committing():
    """A connection reset while its commit is pending: the message becomes
    durable, its client got no reply and will send it again, so it is in
    doubt (docs/rfc1047.md) and the control plane remembers its
    fingerprint. It was not: the news came (if at all) before the message
    was queued, and a resend would be delivered twice."""
    import struct
    with Held() as h, \
            Daemon(env={"FINALDOT_SPOOL_FAULT": f"hold:{h.path}"}) as d:
        c = d.connect()
        start_message(c)
        time.sleep(0.3)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                          struct.pack("ii", 1, 0))
        c.sock.close()  # RST
        time.sleep(0.3)
        h.release()
        d.wait_log(r"event=reply_unacknowledged id=", 10)
        ids = [m["id"] for m in d.scan()["messages"]]
        check(len(ids) == 1, f"one message stored: {ids}")
        d.wait_log(rf"(?i){ids[0]} event=indoubt settle_s=", 10)
        check("fingerprint=unknown" not in d.read_run_log(),
              "the in-doubt message was not found by its id")


def sigterm_with_commit_in_flight():
    """SIGTERM while a flush is held: the commit in flight finishes first
    (its 250 goes out), then 421 4.3.2, then exit 0."""
    import signal
    with Held() as h, \
            Daemon(env={"FINALDOT_SPOOL_FAULT": f"hold:{h.path}"}) as d:
        c = d.connect()
        start_message(c)
        time.sleep(0.3)
        os.kill(d.proc.pid, signal.SIGTERM)
        d.wait_log("event=stopping", 5)
        h.release()
        mid = queued_id(c.expect(250))
        c.expect(421, r"4\.3\.2")
        check(c.closed(), "closed after 421")
        check(d.proc.wait(20) == 0, "exit 0")
        check(mid in {m["id"] for m in d.scan()["messages"]},
              "the message committed during shutdown is in the spool")


held()
failing()
full()
sigterm_with_commit_in_flight()
half_closed_after_the_dot()
reset_while_committing()
print("ok: held flush sends no 250; failed flush 451 4.3.0; full 452 4.3.1 "
      "(BDAT 0 LAST too); SIGTERM lets the commit in flight answer 250 "
      "before 421; a half-closed client gets its 250; a reset during the "
      "commit leaves the message in doubt")
