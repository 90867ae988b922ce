#!/usr/bin/python3
"""finaldotctl and the control socket, beyond the queue (test_ctl_queue):

  - status (text and --json): version, transport, listener, per-worker
    counters, queue;
  - pause: a new connection gets 421 4.3.2 and is closed while an open
    session goes on to a 250; resume: 220 again;
  - reload and SIGHUP are logged (event=reload_requested) and the daemon
    keeps running and answering (SIGHUP used to kill it);
  - errors: daemon not running (no socket, a stale socket), unknown
    command, bad arguments: one line on stderr, a non-zero exit;
  - --help on every command, --version;
  - a listing longer than one chunk lists every message once, and a
    client that does not read its listing holds up nobody else;
  - the protocol itself, spoken without finaldotctl: pipelined requests,
    malformed JSON and bad requests answered with an error while the
    connection goes on, an over-long line answered and closed, a last
    request without a newline answered at EOF, a client past the limit
    told "busy".
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import Daemon, FINALDOT, FINALDOTCTL, check  # noqa: E402
from delivtest import send, message, wait, log_count  # noqa: E402


def run(*args, control=None):
    argv = [FINALDOTCTL]
    if control:
        argv += ["--control", control]
    r = subprocess.run(argv + list(args), capture_output=True, timeout=60)
    return (r.returncode, r.stdout.decode(errors="replace"),
            r.stderr.decode(errors="replace"))


def sock_path(d):
    return os.path.join(d.tmp, "control.sock")


def ctl(d, *args):
    rc, out, err = run(*args, control=sock_path(d))
    check(rc == 0, f"finaldotctl {' '.join(args)}: exit {rc}: {err}")
    return out


def failing(want_rc, pattern, *args, control=None):
    rc, out, err = run(*args, control=control)
    lines = err.strip().splitlines()
    check(rc == want_rc, f"finaldotctl {' '.join(args)}: exit {rc}, want "
          f"{want_rc}: {err!r}")
    check(len(lines) == 1 and re.search(pattern, lines[0]),
          f"finaldotctl {' '.join(args)}: stderr {err!r}, want one line "
          f"/{pattern}/")
    check(out == "", f"stdout {out!r}")


def help_and_version():
    for args in ([], ["status"], ["queue"], ["queue", "list"],
                 ["queue", "show"], ["queue", "cat"], ["queue", "hold"],
                 ["queue", "release"], ["queue", "delete"],
                 ["queue", "flush"], ["pause"], ["resume"], ["reload"],
                 ["spool"]):
        for h in ("--help", "-h"):
            rc, out, err = run(*args, h, control="/nonexistent/x.sock")
            check(rc == 0 and out.startswith("usage: finaldotctl") and
                  not err, f"finaldotctl {' '.join(args)} {h}: {rc} "
                  f"{out[:60]!r} {err!r}")
    v = subprocess.run([FINALDOT, "--version"], capture_output=True,
                       text=True).stdout.split()[-1]
    rc, out, _ = run("--version")
    check(rc == 0 and out == f"finaldotctl {v}\n", f"--version: {out!r}")


def status(d):
    # A published counter appears within milliseconds: wait for it.
    ids = [send(d, "a@example.com", ["u@localhost"], message(i))
           for i in range(3)]
    check(len(ids) == 3, "sent")
    st = wait(lambda: (lambda s: s if s["totals"]["messages"] == 3 and
                       s["queue"]["queued"] == 3 else None)(
        json.loads(ctl(d, "status", "--json"))), 10, "status counts 3")
    v = subprocess.run([FINALDOT, "--version"], capture_output=True,
                       text=True).stdout.split()[-1]
    check(st["version"] == v and st["transport"] == "kernel" and
          st["listener"] == "accepting" and st["pid"] == d.proc.pid and
          st["listen"] == [f"127.0.0.1:{d.port}"] and
          st["hostname"] == "mx.test", f"status {st}")
    check(len(st["workers"]) == 2 and
          sum(w["messages"] for w in st["workers"]) == 3 and
          st["totals"]["sessions_total"] == 3 and
          st["totals"]["flushes"] >= 1 and st["totals"]["bytes"] > 0 and
          st["totals"]["flush_mean_us"] > 0 and
          max(w["flush_mean_us"] for w in st["workers"]) >=
          st["totals"]["flush_mean_us"],
          f"workers {st['workers']} totals {st['totals']}")
    # The lcore split is the DPDK transport's: these workers sleep.
    check(not any("lcore_busy_us" in w for w in st["workers"]),
          f"lcore figures on the kernel transport: {st['workers']}")
    # Open sessions drop to 0 once the worker's loop publishes again.
    last = {}

    def text_ok():
        out = last["out"] = ctl(d, "status")
        return (re.search(r"^finaldot \S+, pid \d+, mx\.test, transport "
                          r"kernel", out, re.M) and
                f"listener: accepting on 127.0.0.1:{d.port}" in out and
                re.search(r"^queue: 3 messages \(0 active, 3 deferred, 0 "
                          r"held\)", out, re.M) and
                re.search(r"^total +0 +3 +3 +\d+ +[1-9]\d* +0 +0$", out,
                          re.M))
    deadline = time.time() + 10
    while not text_ok() and time.time() < deadline:
        time.sleep(0.05)
    check(text_ok(), f"status text:\n{last['out']}")
    check("lcore" not in last["out"], f"status text:\n{last['out']}")


def pause_resume(d):
    a = d.connect()
    a.expect(220)
    a.cmd("EHLO open.test", 250)
    check(ctl(d, "pause") == "listener paused\n", "pause")
    check(json.loads(ctl(d, "status", "--json"))["listener"] == "paused",
          "status says paused")
    for _ in range(3):
        b = d.connect()
        b.expect(421, r"^421 4\.3\.2 mx\.test ")
        check(b.closed(), "a refused connection stays open")
        b.close()
    # The session opened before the pause goes on to its 250.
    a.cmd("MAIL FROM:<a@example.com>", 250)
    a.cmd("RCPT TO:<u@localhost>", 250)
    a.cmd("DATA", 354)
    a.send("Subject: during pause\r\n\r\nstill here\r\n.\r\n")
    a.expect(250, r"queued as")
    a.cmd("QUIT", 221)
    a.close()
    check(ctl(d, "pause") == "listener paused\n", "pause twice is fine")
    check(ctl(d, "resume") == "listener accepting\n", "resume")
    c = d.connect()
    c.expect(220)
    c.cmd("QUIT", 221)
    c.close()
    # The log is written by its own thread: wait for the lines.
    wait(lambda: log_count(d, r"ctl event=paused uid=0") == 1 and
         log_count(d, r"ctl event=resumed uid=0") == 1, 10,
         "pause and resume logged once each")


def reload(d):
    check(ctl(d, "reload") == "reload requested\n", "reload")
    wait(lambda: log_count(d, r"main event=reload_requested") == 1, 10,
         "reload logged")
    os.kill(d.proc.pid, signal.SIGHUP)
    wait(lambda: log_count(d, r"main event=reload_requested") == 2, 10,
         "SIGHUP logged")
    check(d.proc.poll() is None, "SIGHUP stopped the daemon")
    c = d.connect()
    c.expect(220)
    c.close()


def errors(d):
    failing(3, r"not running \(no control socket at /nonexistent/x\.sock",
            "status", control="/nonexistent/x.sock")
    stale = os.path.join(d.tmp, "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()  # the file stays, nobody listens: a daemon that died
    failing(3, r"not running \(connection refused", "pause",
            control=stale)
    c = sock_path(d)
    failing(2, r"unknown command 'frobnicate'", "frobnicate", control=c)
    failing(2, r"unknown option '--bogus'", "--bogus", "status", control=c)
    failing(2, r"which command", control=c)
    failing(2, r"status: unknown argument '--yaml'", "status", "--yaml",
            control=c)
    failing(2, r"pause takes no arguments", "pause", "now", control=c)
    failing(2, r"queue: which command", "queue", control=c)


class Raw:
    """The protocol without finaldotctl."""

    def __init__(self, d):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(sock_path(d))
        self.buf = b""

    def send(self, b):
        self.s.sendall(b)

    def line(self):
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError(f"EOF; partial {self.buf[:200]!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def eof(self):
        try:
            while True:
                chunk = self.s.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (socket.timeout, TimeoutError):
            return False
        except ConnectionResetError:
            return True

    def close(self):
        self.s.close()


def err_code(reply):
    check(reply.get("ok") is False and "error" in reply,
          f"not an error reply: {reply}")
    check(reply["error"]["message"], f"no message: {reply}")
    return reply["error"]["code"]


def protocol(d):
    r = Raw(d)
    # Three requests in one write, answered in order.
    r.send(b'{"cmd":"status"}\n{"cmd":"queue.list","args":{"state":'
           b'"held"}}\n{"cmd":"queue.show","args":{"id":'
           b'"0000000000000001"}}\n')
    check(r.line()["data"]["transport"] == "kernel", "pipelined 1")
    check(r.line() == {"ok": True, "data": {"count": 0}}, "pipelined 2")
    check(err_code(r.line()) == "unknown_id", "pipelined 3")
    # Each bad request gets its error; the connection goes on.
    bad = [(b"{\"cmd\":\n", "bad_json"),
           (b"not json\n", "bad_json"),
           (b"[\"status\"]\n", "bad_request"),
           (b"{\"cmd\":\"status\",\"extra\":1}\n", "bad_request"),
           (b"{\"cmd\":7}\n", "bad_request"),
           (b"{\"args\":{}}\n", "bad_request"),
           (b"{\"cmd\":\"nope\"}\n", "unknown_command"),
           (b"{\"cmd\":\"queue.show\",\"args\":{\"id\":\"xyz\"}}\n",
            "bad_request"),
           (b"{\"cmd\":\"queue.show\",\"args\":{\"idd\":\"x\"}}\n",
            "bad_request"),
           (b"{\"cmd\":\"queue.hold\",\"args\":{}}\n", "bad_request"),
           (b"{\"cmd\":\"queue.hold\",\"args\":{\"ids\":[]}}\n",
            "bad_request"),
           (b"{\"cmd\":\"queue.hold\",\"args\":{\"ids\":[1]}}\n",
            "bad_request"),
           (b"{\"cmd\":\"queue.hold\",\"args\":{\"all\":false}}\n",
            "bad_request"),
           (b"{\"cmd\":\"queue.flush\",\"args\":{\"all\":true,"
            b"\"to_domain\":\"x\"}}\n", "bad_request"),
           (b"{\"cmd\":\"queue.list\",\"args\":{\"state\":\"x\"}}\n",
            "bad_request"),
           (b"{\"cmd\":\"queue.list\",\"args\":[]}\n", "bad_request"),
           (b"{\"cmd\":\"st\\u0000\"}\n", "bad_json"),
           (b"{\"cmd\":\"\xff\"}\n", "bad_json"),
           # a member twice: readers disagree on which counts
           (b"{\"cmd\":\"queue.delete\",\"cmd\":\"status\","
            b"\"args\":{\"all\":true}}\n", "bad_json"),
           (b"{\"cmd\":\"status\",\"\\u0063md\":\"queue.delete\"}\n",
            "bad_json")]
    for req, code in bad:
        r.send(req)
        got = err_code(r.line())
        check(got == code, f"{req!r}: {got}, want {code}")
    r.send(b"\r\n   \n{\"cmd\":\"status\"}\r\n")  # blank lines, CRLF
    check(r.line()["ok"] is True, "still answering after errors")
    # A request's text is escaped in the daemon's log: a newline in
    # to_domain wrote a forged audit line of its own.
    r.send(b'{"cmd":"queue.flush","args":{"to_domain":"x\\n2026-01-01T00:00:'
           b'00.000000Z info ctl event=command cmd=queue.delete uid=0"}}\n')
    check(r.line()["ok"] is True, "flush with an odd domain")
    wait(lambda: "to_domain=x\\x0a2026" in d.read_log(), 10,
         "the escaped to_domain in the log")
    check(not re.search(r"^2026-01-01T00:00:00", d.read_log(), re.M),
          "a forged log line")
    # A line over the limit: an error, then the connection is closed.
    r.send(b"{\"cmd\":\"status\",\"args\":{\"x\":\"" + b"a" * (1 << 20))
    check(err_code(r.line()) == "too_long", "too long")
    check(r.eof(), "not closed after a too-long line")
    r.close()
    # The last request without a newline, then EOF: answered.
    r = Raw(d)
    r.send(b'{"cmd":"status"}')
    r.s.shutdown(socket.SHUT_WR)
    check(r.line()["ok"] is True, "no answer to a request ended by EOF")
    check(r.eof(), "not closed after EOF")
    r.close()
    # More clients than the limit: the extra one is told, and closed.
    many = [Raw(d) for _ in range(32)]
    for m in many:  # each one answered: each holds a slot now
        m.send(b'{"cmd":"status"}\n')
        check(m.line()["ok"] is True, "one of 32 clients")
    extra = Raw(d)
    check(err_code(extra.line()) == "busy", "33rd client")
    check(extra.eof(), "busy client not closed")
    extra.close()
    for m in many:
        m.close()
    wait(lambda: run("status", control=sock_path(d))[0] == 0, 10,
         "a client slot after the others closed")


def bulk_list(d, n=600):
    """More messages than one listing chunk (256): every one is listed
    once; a client that stops reading its listing holds up nobody else."""
    import smtplib
    import threading
    errors = []

    def sender(k):
        try:
            s = smtplib.SMTP("127.0.0.1", d.port, timeout=60)
            for i in range(n // 8):
                s.sendmail(f"bulk{k}@example.com", ["u@localhost"],
                           f"Subject: bulk {k} {i}\r\n\r\nx\r\n")
            s.quit()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
    threads = [threading.Thread(target=sender, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(not errors, f"senders: {errors[:3]}")
    # A 250 means durable in the spool; the queue takes the message over
    # a moment later (the control plane follows the spool): list until
    # the last one is in, then every one exactly once.
    ids, err = [], ""

    def all_listed():
        nonlocal ids, err
        _, out, err = run("queue", "list", "--json", control=sock_path(d))
        ids = [json.loads(l)["id"] for l in out.splitlines()]
        return len(ids) >= n
    try:
        wait(all_listed, 10, "every message in the queue")
    except SystemExit:
        pass  # reported below, with the counts
    check(len(ids) == n and len(set(ids)) == n,
          f"listed {len(ids)} ({len(set(ids))} distinct) of {n}: {err}")
    _, out, _ = run("queue", "list", control=sock_path(d))
    check(out.rstrip().endswith(f"Kbytes in {n} Requests."),
          f"text listing: {out[-200:]!r}")
    # status reports counters the queue manager publishes a few times a
    # second (control/cplane.h, cp_get_stats): wait until they show the
    # whole queue, so what follows tests the waiting listing, not that lag.
    deadline = time.time() + 10
    while time.time() < deadline:
        rc, out, err = run("status", "--json", control=sock_path(d))
        if rc == 0 and json.loads(out)["queue"]["queued"] == n:
            break
        time.sleep(0.05)
    # A listing nobody reads: the daemon stops producing it (its output
    # buffer is bounded) and goes on answering others.
    slow = Raw(d)
    slow.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.send(b'{"cmd":"queue.list"}\n')
    time.sleep(0.2)
    for _ in range(3):
        rc, out, err = run("status", "--json", control=sock_path(d))
        check(rc == 0 and json.loads(out)["queue"]["queued"] == n,
              f"status while a listing waits: {rc} {err}")
    got = 0
    while True:
        r = slow.line()
        if "ok" in r:
            check(r["data"]["count"] == n, f"slow listing end {r}")
            break
        got += 1
    check(got == n, f"the slow client got {got} of {n}")
    slow.close()


def c1_controls(d):
    """A sender with a C1 control (U+009B, CSI: SMTPUTF8 takes it) comes
    out of every --json escaped, never raw at the operator's terminal:
    the queue's listing (the daemon's writer) and the spool scan (which
    had a writer of its own, and let it through)."""
    import smtplib
    sender = "csi\u009b2J@example.com"
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.ehlo("client.test")
        s.sendmail(sender, ["u@example.com"], b"Subject: c1\r\n\r\nx\r\n",
                   mail_options=["SMTPUTF8"])
    for args, what in ((["queue", "list", "--json"], "queue list"),
                       (["spool", "scan", d.spool, "--json"], "spool scan")):
        r = subprocess.run([FINALDOTCTL, "--control", sock_path(d), *args],
                           capture_output=True, timeout=60)
        check(r.returncode == 0, f"{what}: {r.stderr!r}")
        check(b"\xc2\x9b" not in r.stdout and b"csi\\u009b2J" in r.stdout,
              f"{what} --json: {r.stdout[:300]!r}")


def main():
    help_and_version()
    with Daemon(threads=2) as d:
        check(os.path.exists(sock_path(d)),
              "no control socket beside the spool")
        check(oct(os.stat(sock_path(d)).st_mode & 0o777) == "0o600",
              "control socket mode")
        status(d)
        pause_resume(d)
        reload(d)
        errors(d)
        protocol(d)
        c1_controls(d)
        check(d.stop() == 0, "exit status")
        check(not os.path.exists(sock_path(d)),
              "the control socket outlived the daemon")
    with Daemon(threads=2) as d:
        bulk_list(d)
    # A socket file left by a daemon killed with -9 is replaced.
    with Daemon() as d1:
        d1.kill9()
        check(os.path.exists(sock_path(d1)), "kill -9 removed the socket?")
        failing(3, r"connection refused", "status", control=sock_path(d1))
        with Daemon(spool=d1.spool) as d2:
            check(json.loads(ctl(d1, "status", "--json"))["pid"] ==
                  d2.proc.pid, "the new daemon answers on the old path")
    print("ok: status, pause/resume (421 4.3.2, open sessions finish), "
          "reload and SIGHUP, every error case, --help, and the protocol "
          "without finaldotctl")


if __name__ == "__main__":
    main()
