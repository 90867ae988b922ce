#!/usr/bin/python3
"""The kernel-bypass path end to end: finaldot on a DPDK net_tap vdev (and
net_af_packet on a veth pair) inside a network namespace this test creates,
Linux's own TCP as the client. smtplib (plain and pipelined), swaks and
Postfix's smtp-source deliver messages that `finaldotctl spool scan` finds
byte-identical; then the same with 5% of frames dropped at random in both
directions (iptables -m statistic); every mbuf is back in the pool at exit.

Usage: test_dpdk_tap.py [tap|af_packet] [LCORES] [OFFLOADS]
OFFLOADS: --dpdk-offloads value; "none" computes every checksum in software."""
import base64
import json
import os
import shutil
import subprocess
import sys

from fdnet import DPDK_IP, DpdkDaemon, Netns, need_root_netns
from fdtest import check, strip_received

HERE = os.path.dirname(os.path.abspath(__file__))
VDEV = sys.argv[1] if len(sys.argv) > 1 else "tap"
LCORES = sys.argv[2] if len(sys.argv) > 2 else "0"
OFFLOADS = sys.argv[3] if len(sys.argv) > 3 else "auto"


def run_clients(ns, d, count, sessions, pipeline):
    argv = ["/usr/bin/python3", os.path.join(HERE, "smtpclient.py"), DPDK_IP,
            "25", str(count), "--sessions", str(sessions), "--size", "3000"]
    if pipeline:
        argv.append("--pipeline")
    r = subprocess.run(ns.argv(argv), capture_output=True, text=True,
                       timeout=600)
    res = json.loads(r.stdout) if r.stdout.strip() else {}
    check(r.returncode == 0 and not res.get("errors"),
          f"clients failed: {res.get('errors')} {r.stderr[-2000:]}")
    return res["sent"]


def verify(d, sent):
    ids = {m["id"] for m in d.scan()["messages"]}
    for mid, b64 in sent:
        check(mid in ids, f"{mid} missing from the spool")
    for mid, b64 in sent[:: max(1, len(sent) // 40)]:
        got = strip_received(d.cat(mid))
        check(got == base64.b64decode(b64), f"{mid} differs")


def smtp_source(ns, d, n):
    src = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not os.access(src, os.X_OK):
        print("smtp-source not installed: that part skipped")
        return 0
    r = subprocess.run(ns.argv([src, "-s", "32", "-m", str(n), "-d", "-l",
                                "2000", "-f", "a@ns.test", "-t",
                                "u@example.com", f"{DPDK_IP}:25"]),
                       capture_output=True, timeout=600)
    check(r.returncode == 0, f"smtp-source: {r.stderr.decode()[-2000:]}")
    return n


def main():
    need_root_netns()
    with Netns() as ns:
        with DpdkDaemon(ns, "--dpdk-offloads", OFFLOADS, vdev=VDEV,
                        lcores=LCORES) as d:
            sent = run_clients(ns, d, 40, 1, False)
            sent += run_clients(ns, d, 40, 4, True)
            if shutil.which("swaks"):
                r = subprocess.run(ns.argv([
                    "swaks", "--server", f"{DPDK_IP}:25", "--to",
                    "u@example.com", "--from", "s@ns.test", "--pipeline"]),
                    capture_output=True, text=True, timeout=60)
                check(r.returncode == 0 and "queued as" in r.stdout,
                      f"swaks over DPDK:\n{r.stdout[-2000:]}")
            n_src = smtp_source(ns, d, 320)
            verify(d, sent)
            total = len(d.scan()["messages"])
            check(total >= len(sent) + n_src,
                  f"spool has {total} messages, sent {len(sent) + n_src}")
            # 5% loss in both directions on the kernel side.
            ns.sh("iptables -A INPUT -m statistic --mode random "
                  "--probability 0.05 -j DROP && iptables -A OUTPUT -m "
                  "statistic --mode random --probability 0.05 -j DROP")
            lossy = run_clients(ns, d, 60, 6, True)
            n_src2 = smtp_source(ns, d, 96)
            verify(d, lossy)
            total2 = len(d.scan()["messages"])
            check(total2 >= total + len(lossy) + n_src2,
                  f"lossy phase: {total2 - total} of "
                  f"{len(lossy) + n_src2} in the spool")
            ns.sh("iptables -F")
            check(d.stop() == 0, "clean exit")
            mb = d.stats_mbufs()
            check(mb and int(mb["leaked"]) == 0 and
                  int(mb["in_use_end"]) <= int(mb["in_use_start"]),
                  f"mbufs not all returned: {mb}")
            # The final stats line has the kernel transport's fields.
            st = [l for l in d.read_log().splitlines()
                  if "main event=stats" in l]
            kv = dict(f.split("=", 1) for f in st[-1].split()
                      if "=" in f) if st else {}
            check(all(k in kv for k in ("sessions", "messages", "failed",
                                        "rejected", "flushes", "batches",
                                        "bytes")) and
                  int(kv["messages"]) > 0 and int(kv["bytes"]) > 0,
                  f"stats line: {st[-1:]}")
            # The shards' exit lines: frames and the bursts that carried
            # them (a burst holds at least one frame; summed, as a shard
            # may poll frames that it hands to another).
            ns_lines = [l for l in d.read_log().splitlines()
                        if "event=net_stats" in l]
            tot = {"rx_bursts": 0, "tx_bursts": 0, "rx_frames": 0,
                   "tx_frames": 0}
            for l in ns_lines:
                f = dict(x.split("=", 1) for x in l.split() if "=" in x)
                for k in tot:
                    tot[k] += int(f[k])
            check(ns_lines and 0 < tot["rx_bursts"] <= tot["rx_frames"] and
                  0 < tot["tx_bursts"] <= tot["tx_frames"],
                  f"bursts against frames: {ns_lines}")
            port = [l for l in d.read_log().splitlines()
                    if "event=port_ready" in l]
            # What --dpdk-offloads leaves out is computed and checked in
            # software, on receive too (a port may advertise a kind it
            # gets wrong: the option's reason). net_tap offers both kinds.
            want = {"none": ("no", "no"), "ip": ("ip", "ip"),
                    "l4": ("l4", "l4")}.get(OFFLOADS)
            if want:
                check(port and f"tx_offload={want[0]} " in port[-1] and
                      f"rx_cksum={want[1]} " in port[-1],
                      f"offloads {OFFLOADS}: {port}")
            print(f"ok: {VDEV} lcores={LCORES} offloads={OFFLOADS}: "
                  f"{total2} messages, "
                  f"mbufs {mb}")


main()
