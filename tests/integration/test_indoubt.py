#!/usr/bin/python3
"""RFC 1047's gap, end to end: a client sends a message, the server's
packets to it are dropped (iptables, in a namespace this test makes) right
after the final dot, so the 250 never arrives; the client gives up and
sends the message again on a new connection. The next hop (a Maildir)
must get ONE copy. Controls: a resend after an acknowledged 250 is
delivered twice; an in-doubt message followed by different content is
delivered twice; in-doubt state survives a kill -9 between the first copy
and the resend.

Usage: test_indoubt.py kernel|dpdk
"""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import Daemon, check, fail, skip  # noqa: E402
from fdnet import Netns, DpdkDaemon, DPDK_IP  # noqa: E402

TRANSPORT = sys.argv[1] if len(sys.argv) > 1 else "kernel"

# The client, run inside the namespace: one SMTP transaction; with
# "hold" it stops before the final dot, says READY, waits for GO on stdin,
# sends the dot, waits `wait` seconds for a reply and prints it (or NONE),
# then closes (RST when no reply came, as a client that gave up).
CLIENT = r'''
import socket, struct, sys
host, port, mode, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
body = sys.stdin.buffer.read(int(sys.argv[5]))
s = socket.create_connection((host, port), timeout=10)
f = s.makefile("rb")
def reply():
    while True:
        l = f.readline()
        if not l: raise SystemExit("eof")
        if l[3:4] != b"-": return l
reply()
for c in (b"EHLO c.test", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>", b"DATA"):
    s.sendall(c + b"\r\n"); reply()
s.sendall(body)
if mode == "hold":
    print("READY", flush=True)
    sys.stdin.readline()
s.sendall(b".\r\n")
s.settimeout(wait)
try:
    print(reply().decode().strip(), flush=True)
    s.sendall(b"QUIT\r\n"); reply()
    s.close()
except (socket.timeout, OSError, SystemExit):
    print("NONE", flush=True)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
'''


def body(tag):
    return (f"Subject: in doubt {tag}\r\nMessage-ID: <{tag}@c.test>\r\n\r\n"
            + "\r\n".join(f"line {i} {tag}" for i in range(40))
            + "\r\n").encode()


class Env:
    def __init__(self, ns, d, host, port):
        self.ns, self.d, self.host, self.port = ns, d, host, port

    def send(self, data, drop=False):
        """One transaction; drop=True: the server's packets are dropped
        from just before the final dot. Returns the reply or 'NONE'."""
        p = subprocess.Popen(
            self.ns.argv(["/usr/bin/python3", "-c", CLIENT, self.host,
                          str(self.port), "hold" if drop else "plain",
                          "3" if drop else "10", str(len(data))]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False)
        p.stdin.write(data)
        p.stdin.flush()
        if drop:
            line = p.stdout.readline()
            check(line.strip() == b"READY", f"client: {line!r}")
            self.ns.sh(self.drop_rule("-A"))
            p.stdin.write(b"GO\n")
            p.stdin.flush()
        out, _ = p.communicate(timeout=30)
        if drop:
            self.ns.sh(self.drop_rule("-D"))
        return out.decode().strip().splitlines()[-1] if out else "NONE"

    def drop_rule(self, op):
        if TRANSPORT == "dpdk":
            # The DPDK stack's packets reach the kernel side of the tap.
            return (f"iptables {op} INPUT -p tcp -s {DPDK_IP} "
                    f"--sport {self.port} -j DROP")
        return (f"iptables {op} OUTPUT -p tcp -o lo --sport {self.port} "
                f"-j DROP")

    def copies(self, tag):
        root = os.path.join(self.d.tmp, "maildir", "example.com", "b", "new")
        n = 0
        for f in os.listdir(root) if os.path.isdir(root) else []:
            with open(os.path.join(root, f), "rb") as fh:
                if f"Message-ID: <{tag}@c.test>".encode() in fh.read():
                    n += 1
        return n


def wait_copies(env, tag, n, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline and env.copies(tag) < n:
        time.sleep(0.1)
    return env.copies(tag)


def scenario(env):
    d = env.d
    # 1. The 250 is lost; the client resends: one copy.
    b1 = body("lost1")
    check(env.send(b1, drop=True) == "NONE", "the 250 was not dropped")
    d.wait_log(r"event=indoubt", 15)
    r = env.send(b1)
    check(r.startswith("250"), f"the resend got {r}")
    d.wait_log(r"event=suppressed duplicate_of=", 15)
    time.sleep(1)
    check(wait_copies(env, "lost1", 1) == 1 and env.copies("lost1") == 1,
          f"lost1: {env.copies('lost1')} copies delivered, expected 1")
    # 2. Control: the 250 arrived; a second send is a real second send.
    b2 = body("acked2")
    check(env.send(b2).startswith("250"), "first send")
    check(env.send(b2).startswith("250"), "second send")
    check(wait_copies(env, "acked2", 2) == 2,
          f"acked2: {env.copies('acked2')} copies, expected 2")
    # 3. Control: in doubt, then different content: both delivered.
    check(env.send(body("lost3"), drop=True) == "NONE", "drop 3")
    check(env.send(body("other3")).startswith("250"), "other content")
    check(wait_copies(env, "lost3", 1) == 1 and
          wait_copies(env, "other3", 1) == 1, "lost3/other3 each once")
    # 4. In-doubt state survives kill -9 between the copy and the resend.
    b4 = body("lost4")
    before = d.read_log().count("event=indoubt ")
    check(env.send(b4, drop=True) == "NONE", "drop 4")
    deadline = time.time() + 15
    while d.read_log().count("event=indoubt ") <= before and \
            time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the DLOG_INDOUBT record is written by now
    d.kill9()
    d.start()
    r = env.send(b4)
    check(r.startswith("250"), f"resend after restart: {r}\n"
          f"{d.read_log()[-2500:]}")
    time.sleep(2)
    check(wait_copies(env, "lost4", 1) == 1 and env.copies("lost4") == 1,
          f"lost4: {env.copies('lost4')} copies after kill -9, expected 1")


def main():
    if os.geteuid() != 0:
        skip("needs root (network namespace, iptables)")
    for tool in ("ip", "iptables"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            skip(f"{tool} is not installed")
    args = ("--dedup-settle", "2s", "--relay", "maildir:MAILDIR")
    with Netns() as ns:
        if TRANSPORT == "dpdk":
            from fdnet import need_root_netns
            need_root_netns()
            d = DpdkDaemon(ns, "--delivery", "on", delivery=True,
                           domains=("example.com",))
            host, port = DPDK_IP, 25
        else:
            ns.sh("true")
            d = Daemon(delivery=True, wrap=ns.argv([]),
                       domains=("example.com",), wait_ready=False,
                       listen=["127.0.0.1:2525"], port=2525)
            host, port = "127.0.0.1", 2525
        with d:
            d.extra = [a.replace("MAILDIR", os.path.join(d.tmp, "maildir"))
                       for a in args] + d.extra
            d.stop()
            d.start()
            scenario(Env(ns, d, host, port))
            if ns.sh("iptables -S", check_rc=False).stdout.count("DROP"):
                fail("a DROP rule was left behind")
    print(f"ok: {TRANSPORT}")


main()
