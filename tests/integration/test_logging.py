#!/usr/bin/python3
"""--log-file and SIGUSR1 (logrotate): lines go to the file; after the file
is renamed and SIGUSR1 sent, new lines go to a new file at the old path,
and nothing is lost: every line of the session is in one file or the
other. The log is written by a writer thread (buffered per thread), so
every line of a clean stop reaches the file."""
import os
import re
import signal
import smtplib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import Daemon, check  # noqa: E402


def send(port, n):
    s = smtplib.SMTP("127.0.0.1", port, timeout=10)
    s.sendmail("a@example.com", ["b@example.com"],
               f"Subject: log {n}\r\n\r\nhello\r\n".encode())
    s.quit()


def wait_for(path, pattern, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(path) as f:
                if re.search(pattern, f.read()):
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    check(False, f"no {pattern!r} in {path} after {timeout}s")


with Daemon(wait_ready=False) as d:
    path = os.path.join(d.tmp, "finaldot.file.log")
    d.stop()
    d.extra += ["--log-file", path]
    d.start(wait_ready=False)
    wait_for(path, r"event=ready")
    check("event=ready" not in d.read_log(),
          "lines still went to stderr with --log-file")
    send(d.port, 1)
    wait_for(path, r"event=queued")
    os.rename(path, path + ".1")
    os.kill(d.proc.pid, signal.SIGUSR1)
    wait_for(path, r"event=log_reopen")
    send(d.port, 2)
    wait_for(path, r"event=queued")
    check(d.stop() == 0, "clean stop")
    with open(path + ".1") as f:
        old = f.read()
    with open(path) as f:
        new = f.read()
    check(old.count("event=queued") == 1 and new.count("event=queued") == 1,
          f"queued lines: old {old.count('event=queued')}, "
          f"new {new.count('event=queued')}")
    check("event=exit status=0" in new, "the last line of a clean stop")
    check(all(line.endswith("\n") or not line
              for line in (old + new).splitlines(keepends=True)),
          "a partial line")
print("ok")
