#!/usr/bin/python3
"""A client that pipelines far more commands than its replies fit in the
send window, on the DPDK path (issue 8): thousands of commands in one
write, with and without 10% of the daemon's segments lost on the way back
(iptables on the kernel side, in a namespace this test creates). Every
reply must arrive, in order, well before the idle timeout: a session that
stopped reading because its replies filled the window must be resumed once
room comes back, whatever frees it (an ACK, a repaired loss), without any
spool activity to wake it. The same over STARTTLS."""
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time

from fdnet import DPDK_IP, DpdkDaemon, Netns, need_root_netns
from fdtest import check

CLIENT = r'''
import socket, ssl, sys, time
host, n, tls = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "tls"
s = socket.create_connection((host, 25), timeout=30)
f = s.makefile("rb")
def reply():
    lines = []
    while True:
        l = f.readline()
        if not l:
            sys.exit(f"closed after {len(lines)} lines")
        lines.append(l)
        if l[3:4] != b"-":
            return lines
reply()
if tls:
    s.sendall(b"EHLO c\r\n"); reply()
    s.sendall(b"STARTTLS\r\n"); reply()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s = ctx.wrap_socket(s, server_hostname="mx.test")
    f = s.makefile("rb")
t0 = time.time()
# One write: EHLO, n commands that each get a reply, QUIT.
s.sendall(b"EHLO c\r\n" + b"RSET\r\nNOOP\r\n" * (n // 2) + b"QUIT\r\n")
reply()
for i in range(n):
    l = reply()[-1]
    if not l.startswith(b"250 2.0.0"):
        sys.exit(f"reply {i}: {l!r}")
l = reply()[-1]
if not l.startswith(b"221"):
    sys.exit(f"to QUIT: {l!r}")
print(f"{n} replies in {time.time() - t0:.2f}s")
'''


def run(ns, n, tls):
    r = subprocess.run(ns.argv(["/usr/bin/python3", "-c", CLIENT, DPDK_IP,
                                str(n), "tls" if tls else "plain"]),
                       capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, f"client ({n}, tls={tls}): {r.stdout} "
          f"{r.stderr[-1500:]}")
    return r.stdout.strip()


def main():
    need_root_netns()
    tmp = tempfile.mkdtemp(prefix="fdpipe-")
    key, crt = f"{tmp}/k.pem", f"{tmp}/c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
                    "-out", crt, "-days", "30", "-subj", "/CN=mx.test"],
                   capture_output=True, check=True)
    with Netns() as ns:
        # The idle timeout is far beyond what the replies need: a stall
        # shows as the client's 30 s socket timeout.
        with DpdkDaemon(ns, "--tls-cert", crt, "--tls-key", key,
                        "--idle-timeout", "120s") as d:
            for tls in (False, True):
                print(f"ok: no loss, tls={tls}: {run(ns, 4000, tls)}")
            ns.sh("iptables -A INPUT -p tcp --sport 25 -m statistic "
                  "--mode random --probability 0.1 -j DROP")
            for tls in (False, True):
                for _ in range(3):
                    print(f"ok: 10% loss of replies, tls={tls}: "
                          f"{run(ns, 4000, tls)}")
    subprocess.run(["rm", "-rf", tmp])


main()
