"""RFC 1047 test helpers: a client whose final dot's reply is dropped by
iptables (the server's packets to it), then given up on; used by
test_indoubt.py and tools/rfc1047-compare."""
import subprocess

# The client, run inside the namespace: one SMTP transaction; with
# "hold" it stops before the final dot, says READY and its own port (the
# drop rule takes only this connection's packets: a resend on another
# connection gets through meanwhile), waits for GO on stdin,
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
    print("READY", s.getsockname()[1], flush=True)
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
    """A message tagged by its Message-ID <tag@c.test>."""
    return (f"Subject: in doubt {tag}\r\nMessage-ID: <{tag}@c.test>\r\n\r\n"
            + "\r\n".join(f"line {i} {tag}" for i in range(40))
            + "\r\n").encode()




# Many messages on one session (run inside the namespace): N messages of
# SIZE octets, then QUIT; prints the number of 250s.
FILLER = r'''
import smtplib, sys
n, size = int(sys.argv[3]), int(sys.argv[4])
s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=30)
ok = 0
for i in range(n):
    body = (f"Subject: filler {i}\r\n\r\n" + ("x" * 76 + "\r\n") * (size // 78)).encode()
    ok += not s.sendmail("a@example.com", ["f@example.com"], body)
s.quit()
print(ok)
'''


def fill(host, port, n, size, wrap=()):
    """n messages of about size octets on one session; returns the number
    accepted."""
    r = subprocess.run(list(wrap) + ["/usr/bin/python3", "-c", FILLER, host,
                                     str(port), str(n), str(size)],
                       capture_output=True, text=True, timeout=120)
    return int(r.stdout.strip() or 0)


def drop_rule(op, port, dpdk_ip=None, cport=None):
    """iptables command dropping the server's packets to the client (to
    its port cport alone when given)."""
    to = f" --dport {cport}" if cport else ""
    if dpdk_ip:
        # The DPDK stack's packets reach the kernel side of the tap.
        return (f"iptables {op} INPUT -p tcp -s {dpdk_ip} "
                f"--sport {port}{to} -j DROP")
    return f"iptables {op} OUTPUT -p tcp -o lo --sport {port}{to} -j DROP"


def send_once(host, port, data, drop=False, wrap=(), dpdk_ip=None,
              give_up=1.5, dot_sent=None):
    """One transaction (wrap: an argv prefix such as ip netns exec NS);
    drop=True: the server's packets are dropped from just before the
    final dot, and the client gives up give_up seconds after sending it
    (dot_sent, a threading.Event, is set then). Returns the reply line,
    or 'NONE'."""
    wrap = list(wrap)
    p = subprocess.Popen(
        wrap + ["/usr/bin/python3", "-c", CLIENT, host, str(port),
                "hold" if drop else "plain", str(give_up) if drop else "10",
                str(len(data))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    p.stdin.write(data)
    p.stdin.flush()
    if drop:
        line = p.stdout.readline().split()
        if len(line) != 2 or line[0] != b"READY":
            p.kill()
            raise RuntimeError(f"client: {line!r}")
        cport = int(line[1])
        subprocess.run(wrap + ["sh", "-c",
                               drop_rule("-A", port, dpdk_ip, cport)],
                       check=True)
        p.stdin.write(b"GO\n")
        p.stdin.flush()
        if dot_sent:
            dot_sent.set()
    try:
        out, _ = p.communicate(timeout=30)
    finally:
        if drop:
            subprocess.run(wrap + ["sh", "-c",
                                   drop_rule("-D", port, dpdk_ip, cport)])
    return out.decode().strip().splitlines()[-1] if out else "NONE"
