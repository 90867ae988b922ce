#!/usr/bin/python3
"""STARTTLS client for the DPDK test (run inside the test's namespace).

Usage: tlsclient.py HOST PORT MODE [N]
MODE messages: N sessions, each STARTTLS then 5 pipelined messages; prints
  JSON {"sent": [[id, base64 body], ...], "tls": [[version, cipher], ...]}.
MODE inject: STARTTLS and a MAIL command in one segment; inside TLS the
  first reply must be the one to EHLO and RCPT must get 503; prints "ok".
MODE garbage: an HTTP request instead of a ClientHello; the server must
  close; prints "ok".
Exit 1 with the reason on stderr when something is wrong."""
import base64
import json
import os
import socket
import ssl
import sys

HOST, PORT, MODE = sys.argv[1], int(sys.argv[2]), sys.argv[3]
N = int(sys.argv[4]) if len(sys.argv) > 4 else 1


def ctx():
    c = ssl.create_default_context()
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    return c


class Conn:
    def __init__(self):
        self.sock = socket.create_connection((HOST, PORT), timeout=30)
        self.buf = b""

    def reply(self):
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                d = self.sock.recv(65536)
                if not d:
                    raise ConnectionError(f"closed; partial {self.buf!r}")
                self.buf += d
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), lines

    def expect(self, code):
        c, lines = self.reply()
        if c != code:
            sys.exit(f"expected {code}, got {lines}")
        return lines

    def send(self, b):
        self.sock.sendall(b)

    def starttls(self, extra=b""):
        self.expect(220)
        self.send(b"EHLO client.test\r\n")
        lines = self.expect(250)
        if not any("STARTTLS" in l for l in lines):
            sys.exit(f"no STARTTLS in {lines}")
        self.send(b"STARTTLS\r\n" + extra)
        self.expect(220)
        if self.buf:
            sys.exit(f"cleartext after the 220: {self.buf!r}")
        self.sock = ctx().wrap_socket(self.sock, server_hostname="mx.test")


def messages():
    sent, tls = [], []
    for s in range(N):
        c = Conn()
        c.starttls()
        c.send(b"EHLO client.test\r\n")
        c.expect(250)
        tls.append([c.sock.version(), c.sock.cipher()[0]])
        bodies = [b"Subject: tls %d/%d\r\n\r\n" % (s, i) +
                  b"".join(os.urandom(38).hex().encode() + b"\r\n"
                           for _ in range(40))
                  for i in range(5)]
        # One write for the whole batch: RFC 2920 pipelining.
        out = b""
        for b in bodies:
            out += (b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.com>"
                    b"\r\nDATA\r\n" + b + b".\r\n")
        c.send(out)
        for b in bodies:
            c.expect(250)
            c.expect(250)
            c.expect(354)
            lines = c.expect(250)
            sent.append([lines[-1].split()[-1],
                         base64.b64encode(b).decode()])
        c.send(b"QUIT\r\n")
        c.expect(221)
        c.sock.close()
    print(json.dumps({"sent": sent, "tls": tls}))


def inject():
    c = Conn()
    c.starttls(b"MAIL FROM:<evil@client.test>\r\n")
    c.send(b"EHLO client.test\r\n")
    lines = c.expect(250)
    if not lines[0].startswith("250-"):
        sys.exit(f"first reply inside TLS: {lines}")
    c.send(b"RCPT TO:<u@example.com>\r\n")
    lines = c.expect(503)
    c.send(b"STARTTLS\r\n")
    c.expect(503)
    c.send(b"QUIT\r\n")
    c.expect(221)
    print("ok")


def garbage():
    c = Conn()
    c.expect(220)
    c.send(b"EHLO client.test\r\nSTARTTLS\r\n")
    c.expect(250)
    c.expect(220)
    c.send(b"GET / HTTP/1.0\r\n\r\n")
    c.sock.settimeout(10)
    try:
        while c.sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except (socket.timeout, TimeoutError):
        sys.exit("garbage handshake: not closed within 10 s")
    print("ok")


{"messages": messages, "inject": inject, "garbage": garbage}[MODE]()
