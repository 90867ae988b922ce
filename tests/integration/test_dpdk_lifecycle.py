#!/usr/bin/python3
"""The DPDK transport's start and stop, on net_tap in a namespace this test
makes (root; skipped with the reason otherwise).

  shutdown_timewait  one message delivered and QUIT (we close first, so the
                     stack holds the connection in TIME_WAIT), then
                     SIGTERM with a long --shutdown-timeout: the daemon
                     exits at once, not at the deadline (TIME_WAIT is
                     nothing to wait for).

Usage: test_dpdk_lifecycle.py [CASE...]   (all cases when none is named)"""
import os
import subprocess
import sys
import time

from fdnet import DPDK_IP, DpdkDaemon, Netns, need_root_netns
from fdtest import check, fail

CLIENT = r'''
import smtplib, sys
s = smtplib.SMTP(sys.argv[1], 25, timeout=10)
s.sendmail("a@ns.test", ["u@example.com"], "Subject: x\r\n\r\nhello\r\n")
s.quit()
'''


def deliver_one(ns):
    r = subprocess.run(ns.argv(["/usr/bin/python3", "-c", CLIENT, DPDK_IP]),
                       capture_output=True, text=True, timeout=60)
    check(r.returncode == 0, f"one message over the tap: {r.stderr[-1500:]}")


def case_shutdown_timewait():
    timeout = 30
    with Netns() as ns:
        with DpdkDaemon(ns, "--shutdown-timeout", f"{timeout}s") as d:
            deliver_one(ns)
            # The client's FIN has reached us once its close returned;
            # give the stack a moment to take it (-> TIME_WAIT).
            time.sleep(0.3)
            t0 = time.time()
            rc = d.stop(timeout=timeout + 15)
            took = time.time() - t0
            check(rc == 0, f"exit status {rc} after SIGTERM")
            check(took < timeout / 3,
                  f"SIGTERM with every session ended took {took:.1f} s "
                  f"of the {timeout} s --shutdown-timeout: the stop "
                  f"waited for a TIME_WAIT entry")
            print(f"ok shutdown_timewait: exit 0 {took:.2f} s after SIGTERM "
                  f"(--shutdown-timeout {timeout}s)")


CASES = {
    "shutdown_timewait": case_shutdown_timewait,
}


def main():
    names = sys.argv[1:] or list(CASES)
    for n in names:
        if n not in CASES:
            fail(f"no case {n}; cases: {' '.join(CASES)}")
    need_root_netns()
    for n in names:
        CASES[n]()


main()
