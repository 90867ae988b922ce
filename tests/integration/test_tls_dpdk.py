#!/usr/bin/python3
"""STARTTLS on the kernel-bypass path: finaldot on a DPDK net_tap vdev in a
namespace this test creates (as test_dpdk_tap.py), Linux's TCP and Python's
ssl as the client, the same TLS layer as the kernel transport. Messages sent
inside TLS (pipelined) are byte-identical in the spool with ESMTPS and the
cipher in their Received header; the STARTTLS injection is never answered;
a garbage handshake ends the session; then the same messages with 5% of
frames dropped both ways (replies lost and repaired under TLS)."""
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile

from fdnet import DPDK_IP, DpdkDaemon, Netns, need_root_netns
from fdtest import check, strip_received

HERE = os.path.dirname(os.path.abspath(__file__))


def client(ns, mode, n=1):
    r = subprocess.run(ns.argv(["/usr/bin/python3",
                                os.path.join(HERE, "tlsclient.py"), DPDK_IP,
                                "25", mode, str(n)]),
                       capture_output=True, text=True, timeout=300)
    check(r.returncode == 0, f"tlsclient {mode}: {r.stderr[-2000:]}")
    return r.stdout


def verify(d, res):
    stored = d.export()
    for mid, b64 in res["sent"]:
        check(mid in stored, f"{mid} missing from the spool")
        check(strip_received(stored[mid]) == base64.b64decode(b64),
              f"{mid} differs")
        head = stored[mid][:600].decode()
        check(" with ESMTPS id " in head and "(using TLSv1." in head,
              f"{mid}: Received without TLS: {head}")


def main():
    need_root_netns()
    tmp = tempfile.mkdtemp(prefix="fdtlsd-")
    key, crt = f"{tmp}/ec.key", f"{tmp}/ec.crt"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
                        "-out", crt, "-days", "30", "-subj", "/CN=mx.test"],
                       capture_output=True)
    check(r.returncode == 0, f"openssl: {r.stderr}")
    with Netns() as ns:
        with DpdkDaemon(ns, "--tls-cert", crt, "--tls-key", key,
                        "--tls-handshake-timeout", "5s") as d:
            res = json.loads(client(ns, "messages", 4))
            verify(d, res)
            print(f"ok: {len(res['sent'])} messages over {res['tls'][0]} "
                  f"on DPDK, byte-identical, ESMTPS")
            check(client(ns, "inject").strip() == "ok", "inject")
            d.wait_log(r"event=starttls_pipelining discarded=30\b", 5)
            print("ok: injection after STARTTLS discarded on DPDK")
            check(client(ns, "garbage").strip() == "ok", "garbage")
            d.wait_log(r"event=tls_failed established=0", 5)
            print("ok: garbage handshake ends the session on DPDK")
            ns.sh("iptables -A INPUT -m statistic --mode random "
                  "--probability 0.05 -j DROP && iptables -A OUTPUT -m "
                  "statistic --mode random --probability 0.05 -j DROP")
            res = json.loads(client(ns, "messages", 6))
            verify(d, res)
            print(f"ok: {len(res['sent'])} messages over TLS with 5% loss "
                  f"both ways, byte-identical")
            # SIGHUP on DPDK: certificates, configuration and SMTP policy,
            # on a thread of its own (the shards keep polling).
            os.kill(d.proc.pid, signal.SIGHUP)
            d.wait_log(r"event=tls_reloaded", 10)
            d.wait_log(r"event=reloaded route_gen=1 ", 10)
            d.wait_log(r"event=policy_reloaded", 10)
            res = json.loads(client(ns, "messages", 1))
            verify(d, res)
            print("ok: SIGHUP reloads on DPDK; TLS sessions go on")
    subprocess.run(["rm", "-rf", tmp])


main()
