#!/usr/bin/python3
"""Session-level behaviour of the daemon: greeting delay and early talkers,
idle timeout, connection limit, SIGTERM with open sessions, --help."""
import os
import socket
import shutil
import subprocess
import tempfile
import time

from fdtest import FINALDOT, Daemon, check


def early_talker():
    with Daemon("--greet-delay", "400ms") as d:
        c = d.connect()
        c.send("EHLO impatient.test\r\n")
        c.expect(554, r"5\.5\.0")
        check(c.closed(), "early talker disconnected")
        c = d.connect()
        c.expect(220)  # a patient client is greeted after the delay
        c.cmd("QUIT", 221)


def idle_timeout():
    with Daemon("--idle-timeout", "1s") as d:
        c = d.connect()
        c.expect(220)
        t0 = time.time()
        c.expect(421, r"4\.4\.2")
        check(c.closed(), "closed after the idle timeout")
        check(0.8 < time.time() - t0 < 5, "timed out after about 1 s")
        # A client that talked, then went quiet: the timer re-armed by its
        # commands still fires (it once fell off the timer list when the
        # connection with the latest input got input again).
        c = d.connect()
        c.expect(220)
        c.cmd("EHLO idle.test", 250)
        c.cmd("NOOP", 250)
        t0 = time.time()
        c.expect(421, r"4\.4\.2")
        check(c.closed(), "closed after the idle timeout")
        check(0.8 < time.time() - t0 < 5, "timed out about 1 s after NOOP")


def connection_limit():
    with Daemon("--max-connections", "2") as d:
        a, b = d.connect(), d.connect()
        a.expect(220)
        b.expect(220)
        c = d.connect()
        c.expect(421, r"4\.7\.0")
        check(c.closed(), "third connection closed")
        a.cmd("QUIT", 221)
        a.closed()
        time.sleep(0.2)
        e = d.connect()
        e.expect(220)  # a slot came free


def fd_exhaustion():
    """Out of file descriptors (EMFILE) the kernel ends the multishot
    accept; once descriptors come back, the listener must accept again."""
    if not shutil.which("prlimit"):
        return
    with Daemon(wrap=["prlimit", "--nofile=64:64"]) as d:
        socks = [d.connect() for _ in range(80)]
        time.sleep(1)
        greeted = 0
        for c in socks:
            c.sock.setblocking(False)
            try:
                greeted += c.sock.recv(100).startswith(b"220")
            except BlockingIOError:
                pass
        check(0 < greeted < 80, f"{greeted} of 80 greeted under EMFILE")
        for c in socks:
            c.close()
        time.sleep(0.5)
        for _ in range(5):
            c = d.connect()
            c.expect(220)
            c.cmd("QUIT", 221)
        errors = d.read_log().count("event=accept_error")
        check(1 <= errors <= 4, f"{errors} accept_error lines (one a second)")


def sigterm():
    with Daemon() as d:
        c = d.connect()
        c.expect(220)
        c.cmd("EHLO t.test", 250)
        check(d.stop() == 0, "exit status 0 after SIGTERM")
        c.expect(421, r"4\.3\.2")
        check("event=exit status=0" in d.read_log(), "exit logged")


def cli():
    r = subprocess.run([FINALDOT, "--help"], capture_output=True, text=True)
    check(r.returncode == 0, "--help exits 0")
    for opt in ("--listen", "--spool", "--accept-domain", "--threads",
                "--config", "--max-message-size", "--idle-timeout"):
        check(opt in r.stdout, f"--help documents {opt}")
    r = subprocess.run([FINALDOT, "--no-such-option"], capture_output=True,
                       text=True)
    check(r.returncode == 2 and "unknown option" in r.stderr, "bad option")
    r = subprocess.run([FINALDOT, "--listen", "nonsense"],
                       capture_output=True, text=True)
    check(r.returncode == 2, "bad --listen value is a usage error")


def config_file():
    tmp = tempfile.mkdtemp(prefix="fdconf-")
    conf = os.path.join(tmp, "finaldot.conf")
    with open(conf, "w") as f:
        f.write("# test\nlisten = 127.0.0.1:2999\naccept_domain = a.test\n"
                "accept_domain = b.test\nmax_message_size = 10M\n"
                "idle_timeout = 2m\n")
    r = subprocess.run([FINALDOT, "--config", conf, "--threads", "3",
                        "--check-config"], capture_output=True, text=True)
    check(r.returncode == 0, f"--check-config: {r.stderr}")
    out = r.stdout
    for want in ('listen = "127.0.0.1:2999"', 'accept_domain = "a.test"',
                 'accept_domain = "b.test"', "max_message_size = 10485760",
                 "idle_timeout = 120000ms", "threads = 3"):
        check(want in out, f"{want!r} in effective config:\n{out}")
    with open(conf, "a") as f:
        f.write("no_such_key = 1\n")
    r = subprocess.run([FINALDOT, "--config", conf, "--check-config"],
                       capture_output=True, text=True)
    check(r.returncode == 2 and ":7: unknown setting" in r.stderr,
          f"bad key reported with its line: {r.stderr}")
    shutil.rmtree(tmp)


early_talker()
idle_timeout()
connection_limit()
fd_exhaustion()
sigterm()
cli()
config_file()
print("ok: early talker, idle timeout, connection limit, accept after "
      "EMFILE, SIGTERM, CLI, config")
