#!/usr/bin/python3
"""10,000 concurrent idle SMTP connections held on the DPDK tap path: every
one is greeted, the daemon stays responsive (a message still goes through),
and its memory is reported (resident set before and while holding them).

Usage: test_dpdk_idle.py [CONNECTIONS]"""
import json
import os
import subprocess
import sys
import time

from fdnet import DPDK_IP, DpdkDaemon, Netns, need_root_netns
from fdtest import check

HERE = os.path.dirname(os.path.abspath(__file__))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 10000


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    need_root_netns()
    with Netns() as ns:
        with DpdkDaemon(ns, "--max-connections", str(N + 100),
                        "--idle-timeout", "10m") as d:
            before = rss_kib(d.proc.pid)
            holder = subprocess.Popen(
                ns.argv(["/usr/bin/python3",
                         os.path.join(HERE, "smtpclient.py"), "--idle",
                         DPDK_IP, "25", str(N), "8"]),
                stdout=subprocess.PIPE, text=True)
            line = holder.stdout.readline()
            check(line, "the idle client reported nothing")
            res = json.loads(line)
            check(res["greeted"] == N, f"only {res['greeted']} of {N} greeted")
            during = rss_kib(d.proc.pid)
            # Still serving while holding them all.
            r = subprocess.run(ns.argv([
                "swaks", "--server", f"{DPDK_IP}:25", "--to",
                "u@example.com", "--from", "s@ns.test"]),
                capture_output=True, text=True, timeout=60)
            check(r.returncode == 0 and "queued as" in r.stdout,
                  f"a message while {N} connections are held:\n"
                  f"{r.stdout[-1500:]}")
            holder.wait(60)
            port = [l for l in d.read_log().splitlines()
                    if "event=port_ready" in l]
            per = (during - before) * 1024 / N
            print(f"ok: {N} idle connections greeted in "
                  f"{res['seconds_to_open']} s; daemon RSS {before} KiB "
                  f"before, {during} KiB holding them: {per:.0f} bytes per "
                  f"idle connection (stack + session + glue, measured)")
            if port:
                print("  " + port[-1].split(" info ")[-1])


main()
