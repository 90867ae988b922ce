"""Helpers for finaldot's integration tests: start the real daemon on a free
loopback port with its own spool, talk to it, stop it by its PID, read its
spool with finaldotctl.

Each test script is run by meson with FINALDOT and FINALDOTCTL in the
environment. A test whose environment lacks something calls skip(), which
exits 77 (meson: SKIP) with the reason.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

FINALDOT = os.environ.get("FINALDOT", "build/dataplane/finaldot")
FINALDOTCTL = os.environ.get("FINALDOTCTL", "build/control/finaldotctl")
CRLF = b"\r\n"


def skip(reason):
    print(f"SKIP: {reason}")
    sys.exit(77)


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def free_port(family=socket.AF_INET, host="127.0.0.1"):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_sink(path, *extra):
    """tools/fd-sink (PATH) on a free loopback port, listening: (process,
    port). Its counts come on stdout after SIGTERM."""
    port = free_port()
    p = subprocess.Popen([path, "--listen", f"127.0.0.1:{port}", *extra],
                         stdout=subprocess.PIPE, text=True)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p, port
        except OSError:
            time.sleep(0.05)
    p.kill()
    p.wait()
    fail("fd-sink did not listen")


class Daemon:
    """A running finaldot. Use as a context manager: it is stopped (by PID)
    and its temp dir removed at exit, and its log printed on failure."""

    def __init__(self, *args, threads=1, env=None, spool=None, port=None,
                 listen=None, domains=("example.com", "localhost"),
                 wait_ready=True, wrap=(), delivery=False, relay=True,
                 cwd=None):
        # delivery=False: the acceptance tests read what the spool holds,
        # so the control plane only queues (--delivery off). Either way
        # nothing is written outside the test's temp dir: the default
        # route is a Maildir in it unless the test gives its own.
        self.delivery = delivery
        self.relay = relay  # False: the embedded default route (cwd!)
        self.cwd = cwd
        self.wrap = list(wrap)  # argv prefix, e.g. ip netns exec NS
        self.tmp = tempfile.mkdtemp(prefix="fdtest-")
        # A configured Maildir root must exist (finaldot never makes one:
        # a missing root may be an unmounted filesystem).
        os.makedirs(os.path.join(self.tmp, "maildir"))
        self.spool = spool or os.path.join(self.tmp, "spool")
        self.port = port or free_port()
        self.listen = listen or [f"127.0.0.1:{self.port}"]
        self.extra = list(args)
        self.threads = threads
        self.domains = domains
        self.env = dict(os.environ)
        if env:
            self.env.update(env)
        self.proc = None
        self.logpath = os.path.join(self.tmp, "finaldot.log")
        self.logs = []
        self.start(wait_ready)

    def start(self, wait_ready=True):
        argv = [FINALDOT, "--spool", self.spool, "--threads",
                str(self.threads), "--hostname", "mx.test"]
        for l in self.listen:
            argv += ["--listen", l]
        for d in self.domains:
            argv += ["--accept-domain", d]
        if not self.delivery:
            argv += ["--delivery", "off"]
        if self.relay and "--relay" not in self.extra:
            argv += ["--relay", f"maildir:{self.tmp}/maildir"]
        argv += self.extra
        self.log = open(self.logpath, "a+")
        self.log_start = self.log.tell()
        self.proc = subprocess.Popen(self.wrap + argv, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd,
                                     stdin=subprocess.DEVNULL)
        if wait_ready:
            self.wait_log("event=ready", 15)

    def read_log(self):
        with open(self.logpath, errors="replace") as f:
            return f.read()

    def read_run_log(self):
        """What the current run (since the last start) has logged."""
        with open(self.logpath, errors="replace") as f:
            f.seek(self.log_start)
            return f.read()

    def wait_log(self, pattern, timeout):
        """Wait for pattern in what this run logged (not an earlier run's
        lines: after a restart the old "event=ready" is still there)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(pattern, self.read_run_log()):
                return
            if self.proc.poll() is not None:
                fail(f"finaldot exited ({self.proc.returncode}) before "
                     f"'{pattern}':\n{self.read_log()[-3000:]}")
            time.sleep(0.02)
        fail(f"no '{pattern}' in the log after {timeout}s:\n"
             f"{self.read_log()[-3000:]}")

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Signal our own daemon by its PID; returns its exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            fail(f"finaldot did not exit within {timeout}s of signal {sig}")

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def connect(self, timeout=10, family=socket.AF_INET, host="127.0.0.1"):
        return Client(host, self.port, timeout, family)

    def scan(self):
        out = subprocess.run([FINALDOTCTL, "spool", "scan", self.spool,
                              "--json"], capture_output=True, timeout=60)
        check(out.returncode == 0,
              f"finaldotctl spool scan failed: {out.stderr.decode()}")
        return json.loads(out.stdout)

    def ctl(self, *args, ok=True):
        """finaldotctl against this daemon's control socket: (rc, stdout,
        stderr); with ok, a non-zero exit fails the test."""
        sock = os.path.join(self.tmp, "control.sock")
        if "--control" in self.extra:  # the test's own place for it
            sock = self.extra[self.extra.index("--control") + 1]
        r = subprocess.run([FINALDOTCTL, "--control", sock, *args],
                           capture_output=True, timeout=60)
        out, err = r.stdout.decode(errors="replace"), r.stderr.decode(
            errors="replace")
        if ok:
            check(r.returncode == 0,
                  f"finaldotctl {' '.join(args)}: exit {r.returncode}: {err}")
        return r.returncode, out, err

    def cat(self, msgid):
        out = subprocess.run([FINALDOTCTL, "spool", "cat", self.spool,
                              msgid], capture_output=True, timeout=60)
        check(out.returncode == 0,
              f"finaldotctl spool cat {msgid}: {out.stderr.decode()}")
        return out.stdout

    def export(self):
        """Every committed message, {id: stored bytes}, in one scan."""
        out = os.path.join(self.tmp, "export")
        shutil.rmtree(out, ignore_errors=True)
        os.mkdir(out)
        r = subprocess.run([FINALDOTCTL, "spool", "export", self.spool, out],
                           capture_output=True, timeout=120)
        check(r.returncode == 0, f"spool export: {r.stderr.decode()}")
        res = {}
        for name in os.listdir(out):
            with open(os.path.join(out, name), "rb") as f:
                res[name[:-4]] = f.read()
        shutil.rmtree(out)
        return res

    def stats(self):
        """key=value pairs of the last event=stats line of the main thread."""
        lines = [l for l in self.read_log().splitlines()
                 if "main event=stats" in l]
        if not lines:
            return {}
        return dict(kv.split("=", 1) for kv in lines[-1].split()
                    if "=" in kv)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        failed = exc_type is not None and exc_type is not SystemExit
        if exc_type is SystemExit and exc is not None and exc.code not in (
                0, None, 77):
            failed = True
        status = 0
        if self.proc and self.proc.poll() is None:
            status = self.stop()
        if status not in (0, None) and not failed:
            # A clean stop exits 0; anything else (an ASan report, a leak,
            # a crash at shutdown) fails the test that owned the daemon.
            print(f"FAIL: finaldot exited {status} at the end of the test")
            failed = True
        if failed:
            print("---- finaldot log (tail) ----")
            print(self.read_log()[-4000:])
        shutil.rmtree(self.tmp, ignore_errors=True)
        if status not in (0, None) and exc_type is None:
            sys.exit(1)
        return False


class Client:
    """A raw SMTP client: exact bytes out, reply lines in."""

    def __init__(self, host, port, timeout=10, family=socket.AF_INET):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.buf = b""

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def reply(self):
        """One whole reply (multi-line joined): (code, [lines])."""
        lines = []
        while True:
            while CRLF not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(
                        f"connection closed; partial {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(CRLF, 1)
            text = line.decode("utf-8", "replace")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return int(text[:3]), lines

    def expect(self, code, pattern=None):
        c, lines = self.reply()
        check(c == code, f"expected {code}, got {lines}")
        if pattern:
            check(any(re.search(pattern, l) for l in lines),
                  f"expected /{pattern}/ in {lines}")
        return lines

    def cmd(self, line, code, pattern=None):
        self.send(line + "\r\n")
        return self.expect(code, pattern)

    def closed(self, timeout=5):
        """True if the server closed the connection (EOF) within timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (socket.timeout, TimeoutError):
            return False
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as ([0-9A-F]{16})$")


def queued_id(lines):
    m = QUEUED.match(lines[-1])
    check(m is not None, f"not a queued reply: {lines}")
    return m.group(1)


def strip_received(stored):
    """The stored bytes minus the Received header finaldot prepended."""
    check(stored.startswith(b"Received: "),
          f"stored message does not start with Received: {stored[:80]!r}")
    end = stored.index(CRLF)
    while stored[end + 2:end + 3] in (b" ", b"\t"):
        end = stored.index(CRLF, end + 2)
    return stored[end + 2:]


def smtplib_body(msg):
    """What smtplib puts on the wire for msg, un-stuffed: CRLF line ends and
    a final CRLF (RFC 5321 4.1.1.4)."""
    if isinstance(msg, str):
        msg = msg.encode()
    msg = re.sub(rb"(?:\r\n|\n|\r(?!\n))", CRLF, msg)
    if not msg.endswith(CRLF):
        msg += CRLF
    return msg


def by_id(scan):
    return {m["id"]: m for m in scan["messages"]}
