#!/usr/bin/python3
"""A client program for tests that must run inside a network namespace:
sends messages with smtplib and prints, as JSON, each queued id with the body
it sent (base64), so the test can check the spool byte for byte.

Usage: smtpclient.py HOST PORT COUNT [--size N] [--pipeline] [--sessions S]
       smtpclient.py --idle HOST PORT CONNECTIONS SECONDS
"""
import base64
import json
import resource
import smtplib
import socket
import sys
import threading
import time


def body(tag, size):
    text = f"Subject: {tag}\r\n\r\n".encode()
    line = (f"{tag} " * 20).encode()[:76] + b"\r\n"
    out = bytearray(text)
    while len(out) < size:
        out += line
    out += b".leading dot line\r\n"
    return bytes(out)


def session(host, port, count, size, pipeline, tag, out, errors):
    try:
        with smtplib.SMTP(host, port, timeout=60) as s:
            s.ehlo("ns-client.test")
            for i in range(count):
                msg = body(f"{tag}-{i}", size)
                if pipeline:
                    s.send(f"MAIL FROM:<c@ns.test>\r\nRCPT TO:<u@example.com>"
                           f"\r\nDATA\r\n")
                    for want in (250, 250, 354):
                        code, resp = s.getreply()
                        if code != want:
                            raise RuntimeError(f"{code} {resp}")
                    s.send(msg.replace(b"\r\n.", b"\r\n..") + b".\r\n")
                    code, resp = s.getreply()
                else:
                    s.mail("c@ns.test")
                    s.rcpt("u@example.com")
                    code, resp = s.data(msg)
                if code != 250:
                    raise RuntimeError(f"end of data: {code} {resp}")
                mid = resp.decode().split()[-1]
                out.append([mid, base64.b64encode(msg).decode()])
    except Exception as e:  # reported, and the caller fails the test
        errors.append(f"{tag}: {e!r}")


def send(argv):
    host, port, count = argv[0], int(argv[1]), int(argv[2])
    size = int(argv[argv.index("--size") + 1]) if "--size" in argv else 2000
    sessions = (int(argv[argv.index("--sessions") + 1])
                if "--sessions" in argv else 1)
    pipeline = "--pipeline" in argv
    out, errors = [], []
    per = max(1, count // sessions)
    threads = [threading.Thread(target=session, args=(
        host, port, per, size, pipeline, f"s{k}", out, errors))
        for k in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"sent": out, "errors": errors}))
    return 0 if not errors else 1


def idle(argv):
    host, port, n, secs = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 256, n + 256))
    socks, greeted, t0 = [], 0, time.time()
    for i in range(n):
        s = socket.socket()
        s.setblocking(True)
        s.settimeout(30)
        s.connect((host, port))
        socks.append(s)
    for s in socks:
        if s.recv(512).startswith(b"220"):
            greeted += 1
    print(json.dumps({"connections": n, "greeted": greeted,
                      "seconds_to_open": round(time.time() - t0, 2)}),
          flush=True)
    time.sleep(secs)
    for s in socks:
        s.close()
    return 0 if greeted == n else 1


if __name__ == "__main__":
    if sys.argv[1] == "--idle":
        sys.exit(idle(sys.argv[2:]))
    sys.exit(send(sys.argv[1:]))
