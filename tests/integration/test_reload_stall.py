#!/usr/bin/python3
"""A worker that stalls across reloads (descheduled for seconds, CPU
throttled: here its thread alone is stopped with ptrace) must not find the
SMTP policy it applied freed when it runs again. main freed the policy of
two reloads back, assuming every worker had polled since; the stalled
worker's server still pointed into it, and its next RCPT read freed
memory (an AddressSanitizer report under the sanitizer build, garbage
domains otherwise). Now a policy is freed only once no worker names it.

Run in the sanitizer build too (tools/test does): there the read of freed
memory aborts the daemon and this test fails.
Exits 0 pass, 1 fail, 77 skip (no ptrace here)."""
import ctypes
import os
import re
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import Daemon, check, skip  # noqa: E402

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                        ctypes.c_void_p]
PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_DETACH = 0x4206, 0x4207, 17
WALL = 0x40000000


def wait_count(d, pattern, n, timeout=10):
    end = time.time() + timeout
    while len(re.findall(pattern, d.read_run_log())) < n:
        check(time.time() < end, f"no {n} x /{pattern}/ in {timeout} s")
        time.sleep(0.005)


def main():
    tmp = tempfile.mkdtemp(prefix="fdstall-")
    try:
        stalled(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("ok: a worker stalled across three reloads applies a live policy")


def stalled(tmp):
    conf = os.path.join(tmp, "finaldot.conf")
    with open(conf, "w") as f:
        f.write("accept_domain = example.com\naccept_domain = new.test\n")
    with Daemon("--config", conf, domains=()) as d:
        task = f"/proc/{d.proc.pid}/task"
        tid = next(int(t) for t in os.listdir(task)
                   if open(f"{task}/{t}/comm").read().strip() ==
                   "fd-worker0")
        c = d.connect(timeout=30)
        c.expect(220)
        c.cmd("EHLO client.test", 250)
        c.cmd("MAIL FROM:<a@client.test>", 250)
        os.kill(d.proc.pid, signal.SIGHUP)  # policy A, applied
        wait_count(d, r"event=policy_reloaded", 1)
        if libc.ptrace(PTRACE_SEIZE, tid, None, None) != 0:
            skip(f"ptrace not permitted here (errno {ctypes.get_errno()})")
        try:
            check(libc.ptrace(PTRACE_INTERRUPT, tid, None, None) == 0,
                  "PTRACE_INTERRUPT")
            os.waitpid(tid, WALL)  # the worker stands still
            os.kill(d.proc.pid, signal.SIGHUP)  # B: A retired
            wait_count(d, r"route_gen=2", 1)
            time.sleep(0.1)
            os.kill(d.proc.pid, signal.SIGHUP)  # C: A freed, before
            wait_count(d, r"route_gen=3", 1)
            time.sleep(0.3)
            c.send("RCPT TO:<u@new.test>\r\n")  # waits for the worker
            time.sleep(0.1)
        finally:
            libc.ptrace(PTRACE_DETACH, tid, None, None)
        code, lines = c.reply()
        check(code == 250, f"RCPT after the stall: {lines}")
        c.cmd("QUIT", 221)
        check("AddressSanitizer" not in d.read_log(),
              "a freed policy was read")


main()
