#!/usr/bin/python3
"""finaldotctl against a fake control socket (no daemon): what the client
does with a daemon that misbehaves or answers oddly.

  - a daemon that takes the connection and never answers, or never takes
    it: finaldotctl gives up after --timeout, exit 3, and says that the
    outcome of an action is unknown; --timeout's syntax;
  - a final line that says ok without data (status --json and queue show
    --json printed from token -1, a heap overflow), or neither ok nor an
    error: an unexpected reply, exit 1;
  - the daemon's error message is printed escaped (\\xHH), as every other
    string from it: escape sequences in it cannot drive the terminal;
  - long strings: a sender, an address, a reason and a history text as
    long as the daemon sends them (1024 octets not UTF-8, \\u00HH each,
    2048 decoded) print in full; a longer one is cut with "..." (it came
    out empty);
  - a reply line over 16 MiB (the daemon's longest is a few MiB) is
    refused with a clear error, exit 1, where lines of up to 1 GiB were
    read, at about ten times their length in memory; a 12 MiB one reads;
  - which socket: when neither default exists, "not running" names both
    paths tried (it named ./var/control.sock alone); --control without a
    value, or with an empty one, is a usage error (it was "unknown
    option", or the default silently);
  - spool scan and export (no socket) warn on stderr when a segment could
    not be read whole: its messages are missing from their output.
"""
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import FINALDOTCTL, check  # noqa: E402

ID = "0006475E1C3B2A00"
# Generous: a test waits this long for finaldotctl to give up by itself
# (its own --timeout is 1 s), and it is no measure of speed.
PATIENCE = 60


class Fake:
    """A control socket that answers each connection with script(conn,
    request line). Stops (and lets any waiting script go) on exit."""

    def __init__(self, script, backlog=8, accept=True):
        self.tmp = tempfile.TemporaryDirectory(prefix="fd-ctl-client-")
        self.path = os.path.join(self.tmp.name, "c.sock")
        self.script = script
        self.done = threading.Event()
        self.requests = []
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(self.path)
        self.srv.listen(backlog)
        self.srv.settimeout(0.2)
        self.thread = None
        if accept:
            self.thread = threading.Thread(target=self.serve, daemon=True)
            self.thread.start()

    def serve(self):
        while not self.done.is_set():
            try:
                c, _ = self.srv.accept()
            except (socket.timeout, OSError):
                continue
            with c:
                req = c.makefile("rb").readline()
                self.requests.append(req)
                try:
                    self.script(self, c, req)
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.done.set()
        if self.thread:
            self.thread.join(5)
        self.srv.close()
        self.tmp.cleanup()


def reply(*lines):
    def script(fake, c, req):
        for line in lines:
            c.sendall(line)
    return script


def hang(fake, c, req):
    fake.done.wait(PATIENCE)


def run(fake, *args, timeout="1"):
    argv = [FINALDOTCTL, "--control", fake.path]
    if timeout is not None:
        argv += ["--timeout", timeout]
    try:
        r = subprocess.run(argv + list(args), capture_output=True,
                           timeout=PATIENCE)
    except subprocess.TimeoutExpired:
        check(False, f"finaldotctl {' '.join(args)}: still waiting after "
              f"{PATIENCE} s")
    return r.returncode, r.stdout, r.stderr.decode(errors="replace")


def one_line(err, pattern, what):
    lines = err.strip().splitlines()
    check(len(lines) == 1 and re.search(pattern, lines[0]),
          f"{what}: stderr {err!r}, want one line /{pattern}/")


def no_sanitizer(err, what):
    check("Sanitizer" not in err and "runtime error" not in err,
          f"{what}: {err[:1500]}")


def timeouts():
    # The daemon takes the request and never answers: the action may or
    # may not have been done, and finaldotctl says so.
    for args, action in ((["queue", "hold", ID], "queue hold"),
                         (["queue", "delete", "ALL"], "queue delete"),
                         (["reload"], "reload"),
                         (["pause"], "pause")):
        with Fake(hang) as f:
            rc, out, err = run(f, *args)
        what = f"hang: {' '.join(args)}"
        check(rc == 3, f"{what}: exit {rc}, want 3: {err!r}")
        one_line(err, rf"no reply .* within 1s.*{action}.* unknown", what)
        check(out == b"", f"{what}: stdout {out!r}")
    # A query: no reply, nothing about an outcome.
    for args in (["status"], ["queue", "list"], ["queue", "cat", ID]):
        with Fake(hang) as f:
            rc, out, err = run(f, *args, timeout="700ms")
        what = f"hang: {' '.join(args)}"
        check(rc == 3, f"{what}: exit {rc}, want 3: {err!r}")
        one_line(err, r"no reply .* within 700ms\b", what)
        check("unknown" not in err, f"{what}: {err!r}")
    # A stream that stops halfway: the same, after what came.
    item = (b'{"item":{"id":"' + ID.encode() + b'","arrival_time":0,'
            b'"size":1,"sender":"a@x","state":"deferred","held":false,'
            b'"recipients":[]}}\n')

    def stall(fake, c, req):
        c.sendall(item)
        fake.done.wait(PATIENCE)
    with Fake(stall) as f:
        rc, out, err = run(f, "queue", "list", "--json")
    check(rc == 3 and out.count(b"\n") == 1,
          f"stalled list: exit {rc}, {out!r} {err!r}")
    # The daemon never takes the connection (its backlog is full): the
    # connect times out, and nothing was sent.
    with Fake(None, backlog=0, accept=False) as f:
        filler = []
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(f.path)
            except BlockingIOError:
                s.close()
                break
            filler.append(s)
        rc, out, err = run(f, "queue", "hold", ID)
        for s in filler:
            s.close()
    check(rc == 3, f"connect hang: exit {rc}, want 3: {err!r}")
    one_line(err, r"did not take the connection within 1s.*nothing was "
             r"sent", "connect hang")
    # An answer in time is not affected by the timeout.
    with Fake(reply(b'{"ok":true,"data":{"affected":1,"unknown":0}}\n')) \
            as f:
        rc, out, err = run(f, "queue", "hold", ID, timeout="0")
        check(rc == 0 and out == b"1 message held\n" and not err,
              f"--timeout 0: {rc} {out!r} {err!r}")
        rc, out, err = run(f, "queue", "hold", ID, timeout="1m")
        check(rc == 0 and out == b"1 message held\n",
              f"--timeout 1m: {rc} {out!r} {err!r}")
        r = subprocess.run([FINALDOTCTL, "--control", f.path,
                            "--timeout=2s", "queue", "hold", ID],
                           capture_output=True, timeout=PATIENCE)
        check(r.returncode == 0, f"--timeout=2s: {r.stderr!r}")
    # Its syntax is the daemon's DURATION's; anything else is a usage
    # error, and nothing is sent.
    with Fake(reply(b'{"ok":true,"data":{}}\n')) as f:
        for bad in ("", "x", "1x", "-1", "1.5s", "99999999999999999999"):
            rc, out, err = run(f, "reload", timeout=bad)
            check(rc == 2, f"--timeout {bad!r}: exit {rc}: {err!r}")
            one_line(err, r"--timeout", f"--timeout {bad!r}")
        r = subprocess.run([FINALDOTCTL, "--control", f.path, "--timeout"],
                           capture_output=True, timeout=PATIENCE)
        check(r.returncode == 2 and b"--timeout needs a value" in r.stderr,
              f"--timeout alone: {r.returncode} {r.stderr!r}")
        check(f.requests == [], f"sent despite a usage error: {f.requests}")


def no_data():
    for line in (b'{"ok":true}\n', b'{"ok":1,"data":{}}\n',
                 b'{"ok":false}\n', b'{"ok":false,"error":{}}\n'):
        for args in (["status", "--json"], ["status"],
                     ["queue", "show", ID, "--json"], ["queue", "show", ID],
                     ["queue", "hold", ID], ["queue", "list"],
                     ["queue", "cat", ID], ["reload"], ["pause"]):
            with Fake(reply(line)) as f:
                rc, out, err = run(f, *args)
            what = f"{line!r}: {' '.join(args)}"
            no_sanitizer(err, what)
            check(rc == 1, f"{what}: exit {rc}, want 1: {err!r}")
            one_line(err, r"^finaldotctl: unexpected reply from the daemon",
                     what)
            check(out == b"", f"{what}: stdout {out!r}")


def error_message():
    msg = b'x\\u001b]0;pwned\\u0007\\u001b[2J\\r\\n\\u009b1m\\\\ \\u00ff'
    for line in (b'{"ok":false,"error":{"code":"failed","message":"' + msg +
                 b'"}}\n',
                 b'{"ok":false,"error":{"code":"' + msg + b'"}}\n'):
        with Fake(reply(line)) as f:
            rc, out, err = run(f, "queue", "hold", ID)
        what = f"error {line!r}"
        check(rc == 1, f"{what}: exit {rc}: {err!r}")
        check(err == "finaldotctl: x\\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x0a"
              "\\xc2\\x9b1m\\x5c \\xc3\\xbf\n", f"{what}: stderr {err!r}")


def long_strings():
    ff, c1 = "\\u00ff" * 1024, "\\u0080" * 1024
    ff_out, c1_out = "\\xc3\\xbf" * 1024, "\\xc2\\x80" * 1024
    rcpt = {"address": "b@" + ff, "status": "pending", "reason": c1,
            "attempts": 1}
    msg = ('{"id":"' + ID + '","arrival_time":0,"size":1,"sender":"' + ff +
           '","state":"deferred","held":false,"recipients":[' +
           json_obj(rcpt) + ']')
    item = ('{"item":' + msg + '}}\n').encode()
    end = b'{"ok":true,"data":{"count":1}}\n'
    with Fake(reply(item, end)) as f:
        rc, out, err = run(f, "queue", "list")
    out = out.decode()
    check(rc == 0 and not err, f"long list: {rc} {err!r}")
    check(f" {ff_out}\n({c1_out})\n" in out and f" b@{ff_out}\n" in out,
          f"long list: {out[:400]!r}")
    hist = ('"history":[{"time":"2026-12-02T22:14:56Z","event":"deferred",'
            '"rcpt":0,"attempts":1,"text":"' + c1 + '"}]')
    show = ('{"ok":true,"data":' + msg + ',' + hist + '}}\n').encode()
    with Fake(reply(show)) as f:
        rc, out, err = run(f, "queue", "show", ID)
    out = out.decode()
    check(rc == 0 and not err, f"long show: {rc} {err!r}")
    check(f"sender:   <{ff_out}>\n" in out and
          f"  <b@{ff_out}> pending" in out and f"\n      {c1_out}\n" in out
          and f"<b@{ff_out}> attempt 1 {c1_out}\n" in out,
          f"long show: {out[:400]!r}")
    # Longer than anything the daemon sends: the start, then "...".
    huge = "\\u00ff" * 5000
    item = ('{"item":{"id":"' + ID + '","arrival_time":0,"size":1,'
            '"sender":"' + huge + '","state":"deferred","held":false,'
            '"recipients":[]}}\n').encode()
    with Fake(reply(item, end)) as f:
        rc, out, err = run(f, "queue", "list")
    line = out.decode().splitlines()[1]
    check(rc == 0 and line.endswith("  " + "\\xc3\\xbf" * 2046 + "..."),
          f"huge sender: {rc} {line[-60:]!r} {err!r}")
    err_line = (b'{"ok":false,"error":{"code":"failed","message":"' +
                b"m" * 5000 + b'"}}\n')
    with Fake(reply(err_line)) as f:
        rc, out, err = run(f, "reload")
    check(rc == 1 and err == "finaldotctl: " + "m" * 4092 + "...\n",
          f"huge error: {rc} {err[-60:]!r}")


def long_lines():
    big = b"a" * (12 << 20)
    with Fake(reply(b'{"ok":true,"data":"' + big + b'"}\n')) as f:
        rc, out, err = run(f, "status", "--json")
    check(rc == 0 and out == b'"' + big + b'"\n' and not err,
          f"12 MiB line: {rc} {len(out)} {err[:300]!r}")
    over = b'{"ok":true,"data":"' + b"a" * (17 << 20) + b'"}'
    for line in (over + b"\n", over):
        with Fake(reply(line)) as f:
            rc, out, err = run(f, "status", "--json")
        what = f"{len(line)}-octet line"
        no_sanitizer(err, what)
        check(rc == 1 and out == b"", f"{what}: exit {rc}: {err[:300]!r}")
        one_line(err, r"a reply line from the daemon is over 16 MiB", what)


def socket_path():
    env = {k: v for k, v in os.environ.items() if k != "FINALDOT_CONTROL"}
    with tempfile.TemporaryDirectory(prefix="fd-ctl-client-") as cwd:
        r = subprocess.run([FINALDOTCTL, "status"], capture_output=True,
                           text=True, cwd=cwd, env=env, timeout=PATIENCE)
    if os.path.exists("/run/finaldot/control.sock"):
        print("# /run/finaldot/control.sock exists here: the message "
              "naming both defaults is not checked")
    else:
        check(r.returncode == 3, f"no socket: exit {r.returncode}")
        one_line(r.stderr, r"not running \(no control socket at "
                 r"\./var/control\.sock or /run/finaldot/control\.sock",
                 "no default socket")
    for argv in (["--control"], ["--control", "", "status"],
                 ["--control=", "status"]):
        r = subprocess.run([FINALDOTCTL] + argv, capture_output=True,
                           text=True, env=env, timeout=PATIENCE)
        check(r.returncode == 2, f"{argv}: exit {r.returncode}: {r.stderr}")
        one_line(r.stderr, r"--control needs a value", f"{argv}")
    # An explicit path is named alone.
    r = subprocess.run([FINALDOTCTL, "--control=/nonexistent/x.sock",
                        "status"], capture_output=True, text=True,
                       timeout=PATIENCE)
    check(r.returncode == 3, f"explicit: exit {r.returncode}")
    one_line(r.stderr, r"no control socket at /nonexistent/x\.sock; see",
             "explicit path")


def spool_warning():
    """spool scan and export on a spool with a segment nothing can be read
    from (a header of garbage): the messages in it are missing from the
    output, and stderr says so in a warning line (the summary alone said
    segments_bad=1); the summary names the damage."""
    with tempfile.TemporaryDirectory(prefix="fd-ctl-client-") as root:
        os.mkdir(os.path.join(root, "w00"))
        with open(os.path.join(root, "w00", "00000000.seg"), "wb") as f:
            f.write(b"\x5a" * 65536)
        for args in (["scan", root], ["scan", root, "--json"],
                     ["export", root, root]):
            r = subprocess.run([FINALDOTCTL, "spool", *args],
                               capture_output=True, text=True,
                               timeout=PATIENCE)
            check(r.returncode == 0, f"spool {args}: exit {r.returncode}: "
                  f"{r.stderr}")
            check(re.search(r"warning: 1 segment\(s\) could not be read "
                            r"whole", r.stderr),
                  f"spool {args}: no warning: {r.stderr!r}")
            if "--json" in args:
                check('"segments_damaged":1' in r.stdout,
                      f"spool {args}: {r.stdout!r}")


def json_obj(d):
    # The values above are JSON already (escapes the daemon writes).
    return "{" + ",".join(f'"{k}":' + (f'"{v}"' if isinstance(v, str)
                                       else str(v))
                          for k, v in d.items()) + "}"


def main():
    timeouts()
    no_data()
    error_message()
    long_strings()
    long_lines()
    socket_path()
    spool_warning()
    print("ok: --timeout (a daemon that never answers or never takes "
          "the connection: exit 3, an action's outcome said to be "
          "unknown); ok without data: exit 1; error messages escaped; "
          "long strings print; reply lines bounded; "
          "--control's errors; spool scan/export warn of unread "
          "segments")


if __name__ == "__main__":
    main()
