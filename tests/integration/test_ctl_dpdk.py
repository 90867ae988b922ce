#!/usr/bin/python3
"""The operator's surface on the DPDK transport (net_tap in a namespace
this test makes): finaldotctl status says transport dpdk; pause makes a new
connection through finaldot's own TCP stack get 421 4.3.2 and a FIN while
an open session still gets its 250, resume a 220; SIGHUP is logged and the
daemon goes on; /metrics (on the namespace's loopback) passes promtool and
carries the port's counters and the stack's drops by reason; the lcore's
time is split into busy (iterations that moved something) and idle
(polling that found nothing) in status and /metrics.
Root and a DPDK build; skipped (77) with the reason otherwise."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdnet import DPDK_IP, DpdkDaemon, Netns, need_root_netns  # noqa: E402
from fdtest import FINALDOTCTL, check  # noqa: E402
from delivtest import wait, log_count  # noqa: E402

CLIENT = r"""
import socket, sys
def reply(f):
    lines = []
    while True:
        l = f.readline()
        if not l:
            return "EOF"
        lines.append(l.decode().rstrip())
        if len(l) < 4 or l[3:4] != b"-":
            return lines[-1]
s = socket.create_connection((sys.argv[1], 25), timeout=10)
f = s.makefile("rb")
print(reply(f))
for cmd in sys.argv[2:]:
    s.sendall(cmd.encode().replace(b"\n", b"\r\n") + b"\r\n")
    print(reply(f))
print(reply(f) if sys.argv[2:] == [] else "")
"""


def client(ns, *cmds):
    r = subprocess.run(ns.argv(["/usr/bin/python3", "-c", CLIENT, DPDK_IP,
                                *cmds]), capture_output=True, text=True,
                       timeout=60)
    check(r.returncode == 0, f"client: {r.stderr[-1000:]}")
    return r.stdout.splitlines()


def ctl(d, *args):
    r = subprocess.run([FINALDOTCTL, "--control",
                        os.path.join(d.tmp, "control.sock"), *args],
                       capture_output=True, text=True, timeout=30)
    check(r.returncode == 0, f"finaldotctl {args}: {r.stderr}")
    return r.stdout


def main():
    need_root_netns()
    with Netns() as ns, DpdkDaemon(ns, "--metrics", "127.0.0.1:9125",
                                   "--dpdk-idle-sleep", "100us") as d:
        st = json.loads(ctl(d, "status", "--json"))
        check(st["transport"] == "dpdk" and st["listener"] == "accepting"
              and len(st["workers"]) == 1, f"status {st}")
        out = client(ns, "EHLO c.test", "MAIL FROM:<a@ns.test>",
                     "RCPT TO:<u@example.com>", "DATA",
                     "Subject: dpdk\n\nbody\n.", "QUIT")
        check(out[0].startswith("220 ") and
              re.match(r"250 2\.0\.0 Ok: queued as", out[5]), f"{out}")
        # The lcore's split: a session's work was busy time; a quiet
        # second after it is idle polling (between the back-off's
        # sleeps), with little busy (a margin for a preempted busy
        # iteration on a loaded machine).
        w0 = json.loads(ctl(d, "status", "--json"))["workers"][0]
        check(w0.get("lcore_busy_us", 0) > 0 and
              w0.get("lcore_idle_us", 0) > 0, f"lcore split {w0}")
        time.sleep(1.0)
        w1 = json.loads(ctl(d, "status", "--json"))["workers"][0]
        busy = w1["lcore_busy_us"] - w0["lcore_busy_us"]
        idle = w1["lcore_idle_us"] - w0["lcore_idle_us"]
        check(idle > 5000 and busy < idle / 2,
              f"a quiet second: busy {busy} us, idle {idle} us")
        check(re.search(r"^lcore of worker 0: busy \d+\.\d% of "
                        r"\d+\.\d s polled$", ctl(d, "status"), re.M),
              "the lcore line of finaldotctl status")
        ctl(d, "pause")
        out = client(ns)
        check(out[0].startswith("421 4.3.2 ") and out[1] == "EOF",
              f"paused: {out}")
        ctl(d, "resume")
        out = client(ns, "QUIT")
        check(out[0].startswith("220 "), f"resumed: {out}")
        os.kill(d.proc.pid, signal.SIGHUP)
        wait(lambda: log_count(d, r"event=reload_requested") == 1, 10,
             "SIGHUP logged")
        check(d.proc.poll() is None, "SIGHUP stopped the daemon")

        def metrics():
            r = subprocess.run(ns.argv(["/usr/bin/python3", "-c",
                                        "import urllib.request as u; print("
                                        "u.urlopen('http://127.0.0.1:9125/"
                                        "metrics').read().decode())"]),
                               capture_output=True, text=True, timeout=30)
            check(r.returncode == 0, f"scrape: {r.stderr}")
            return r.stdout
        text = wait(lambda: (lambda t: t if re.search(
            r"^finaldot_messages_accepted_total 1$", t, re.M) and
            re.search(r'^finaldot_connections_refused_total\{transport='
                      r'"dpdk",reason="paused"\} 1$', t, re.M) else None)(
            metrics()), 10, "the DPDK counters")
        rx = re.search(r'^finaldot_dpdk_port_packets_total\{direction="rx"\}'
                       r' (\d+)$', text, re.M)
        check(rx and int(rx.group(1)) > 10, "port rx packets")
        check(re.search(r'^finaldot_net_drops_total\{reason="tcp_no_port"\} '
                        r'\d+$', text, re.M), "stack drops by reason")
        lc = dict(re.findall(r'^finaldot_dpdk_lcore_seconds_total\{state='
                             r'"(busy|idle)"\} (\d+\.\d{9})$', text, re.M))
        check(float(lc.get("busy", 0)) > 0 and
              float(lc.get("idle", 0)) > 0.005,
              f"lcore seconds in /metrics: {lc}")
        check('finaldot_build_info{version="' in text and
              'transport="dpdk"} 1' in text, "build_info")
        if shutil.which("promtool"):
            r = subprocess.run(["promtool", "check", "metrics"], input=text,
                               capture_output=True, text=True)
            check(r.returncode == 0, f"promtool: {r.stdout} {r.stderr}")
        check(d.stop() == 0, "clean exit")
        check(not os.path.exists(os.path.join(d.tmp, "control.sock")),
              "the control socket outlived the daemon")
    print("ok: status, pause (421 4.3.2 + FIN through our TCP), resume, "
          "SIGHUP and /metrics with port and stack counters on DPDK")


main()
