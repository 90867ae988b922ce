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


def real_clients(ns, d):
    """swaks --tls and openssl s_client -starttls smtp against the DPDK
    transport: each message stored once, its body as sent, with ESMTPS
    (the byte-for-byte checks over DPDK are tlsclient.py's, above)."""
    import shutil
    sent = []
    if shutil.which("swaks"):
        body = "Subject: swaks over dpdk tls\r\n\r\nhello from swaks\r\n"
        r = subprocess.run(ns.argv(["swaks", "--server", f"{DPDK_IP}:25",
                                    "--tls", "--from", "a@client.test",
                                    "--to", "u@example.com", "--data", body,
                                    "--h-Date", "", "--suppress-data"]),
                           capture_output=True, text=True, timeout=120)
        if "TLS not available" in r.stdout + r.stderr:
            print("swaks has no TLS here (Net::SSLeay): that part skipped")
        else:
            check(r.returncode == 0, f"swaks: {r.stdout[-1500:]}")
            check("TLS started" in r.stdout, f"swaks: {r.stdout[-800:]}")
            sent.append("swaks over dpdk tls")
    script = (b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n"
              b"RCPT TO:<u@example.com>\r\nDATA\r\n")
    r = subprocess.Popen(ns.argv(["openssl", "s_client", "-quiet",
                                  "-starttls", "smtp", "-connect",
                                  f"{DPDK_IP}:25"]),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    import time
    r.stdin.write(script)
    r.stdin.flush()
    time.sleep(1.0)
    r.stdin.write(b"Subject: s_client over dpdk tls\r\n\r\nhi\r\n.\r\n"
                  b"QUIT\r\n")
    r.stdin.flush()
    out, _ = r.communicate(timeout=60)
    check(b"250 2.0.0 Ok: queued as" in out, f"s_client: {out[-800:]!r}")
    sent.append("s_client over dpdk tls")
    stored = d.export()
    for subject in sent:
        raw = [v for v in stored.values()
               if f"Subject: {subject}".encode() in v]
        check(len(raw) == 1, f"{subject}: {len(raw)} copies in the spool")
        check(b" with ESMTPS id " in raw[0][:800], f"{subject}: no ESMTPS")
        # swaks ends its data with one more CRLF of its own.
        want = (b"\r\n\r\nhello from swaks\r\n"
                if subject.startswith("swaks") else b"\r\n\r\nhi\r\n")
        check(want in strip_received(raw[0]),
              f"{subject}: body {raw[0][-80:]!r}")
    print(f"ok: real TLS clients on DPDK: {', '.join(sent)}")


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
            real_clients(ns, d)
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
