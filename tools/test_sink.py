#!/usr/bin/python3
"""fd-sink, the delivery benchmark's next hop: fd-loadgen in its four modes
(DATA and BDAT, plain and pipelined) gets every message answered 250 and
counted by kind; the end of DATA is found however the octets are split;
BDAT 0 LAST ends a message; a pipelined flood of commands gets every
reply; an overlong line gets one 500; a non-loopback address is refused;
--stall holds one message's reply, and its connection, and no other."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
from fdtest import check, start_sink  # noqa: E402

SINK = os.environ["FD_SINK"]
LOADGEN = os.environ["FD_LOADGEN"]


def stop(p):
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=10)
    check(p.returncode == 0, f"fd-sink exit {p.returncode}")
    return json.loads(out)


def replies(sock, n, lines=None):
    """Read until n reply lines that end a reply (code + space); every
    line read goes to LINES too."""
    got, buf = [], b""
    while len(got) < n:
        chunk = sock.recv(65536)
        check(chunk, f"closed after {got}")
        buf += chunk
        while b"\r\n" in buf:
            line, buf = buf.split(b"\r\n", 1)
            if lines is not None:
                lines.append(line)
            if len(line) >= 4 and line[3:4] == b" ":
                got.append(line)
    check(buf == b"", f"more than {n} replies: {buf!r}")
    return got


def loadgen_modes(port):
    total = {"data": 0, "bdat": 0}
    for mode in ([], ["--pipelining"], ["--bdat"],
                 ["--bdat", "--pipelining"]):
        r = subprocess.run([LOADGEN, "--server", f"127.0.0.1:{port}",
                            "--connections", "4", "--messages", "400",
                            "--size", "5000", "--json"] + mode,
                           capture_output=True, text=True, timeout=120)
        check(r.returncode == 0, f"fd-loadgen {mode}: {r.stderr}")
        total["bdat" if "--bdat" in mode else "data"] += 400
    return total


def by_hand(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    check(replies(s, 1)[0].startswith(b"220 "), "greeting")
    s.sendall(b"EHLO t\r\n")
    ehlo = []
    replies(s, 1, ehlo)
    check(b"250-CHUNKING" in ehlo and b"250-PIPELINING" in ehlo,
          f"EHLO: {ehlo}")
    s.sendall(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    check([l[:3] for l in replies(s, 3)] == [b"250", b"250", b"354"],
          "MAIL, RCPT, DATA")
    # A dot-stuffed line, then the terminator one octet at a time.
    for b in b"x\r\n..not the end\r\n.\r\n":
        s.send(bytes([b]))
        time.sleep(0.001)
    check(replies(s, 1)[0].startswith(b"250 "), "DATA split at every octet")
    # A stray CR right before the terminator's own CR.
    s.sendall(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    replies(s, 3)
    s.sendall(b"y\r\r\n.\r\n")
    check(replies(s, 1)[0].startswith(b"250 "), "CR before CRLF.CRLF")
    s.sendall(b"BDAT 5\r\nhello")
    check(replies(s, 1)[0].startswith(b"250 "), "BDAT chunk")
    s.sendall(b"BDAT 0 LAST\r\n")
    check(replies(s, 1)[0].startswith(b"250 "), "BDAT 0 LAST")
    s.sendall(b"NOOP\r\n" * 5000)
    check(len(replies(s, 5000)) == 5000, "5,000 pipelined NOOPs answered")
    s.sendall(b"X" * 70000 + b"\r\nNOOP\r\n")
    r = replies(s, 2)
    check(r[0].startswith(b"500 ") and r[1].startswith(b"250 "),
          f"overlong line: {r}")
    s.sendall(b"QUIT\r\n")
    check(replies(s, 1)[0].startswith(b"221 "), "QUIT")
    s.close()


def stall(sink_args):
    """--stall 2:600: the second message's reply waits 0.6 s, and its
    connection with it; another connection is answered meanwhile."""
    p, port = start_sink(SINK, *sink_args)
    try:
        a = socket.create_connection(("127.0.0.1", port), timeout=10)
        replies(a, 1)
        a.sendall(b"EHLO a\r\n")
        replies(a, 1)
        one = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3 LAST\r\nx\r\n"
        a.sendall(one)
        replies(a, 3)  # the first: answered at once
        t0 = time.time()
        a.sendall(one + b"NOOP\r\n")
        b = socket.create_connection(("127.0.0.1", port), timeout=10)
        check(replies(b, 1)[0].startswith(b"220 "), "greeting")
        b.sendall(b"NOOP\r\n")
        replies(b, 1)
        other = time.time() - t0
        got = replies(a, 4)
        held = time.time() - t0
        check(got[2].startswith(b"250 ") and got[3].startswith(b"250 "),
              f"the held replies: {got}")
        check(held >= 0.55, f"the second reply after {held:.2f} s, not held")
        check(other < 0.5, f"another connection waited {other:.2f} s")
        a.close()
        b.close()
    except BaseException:
        p.kill()
        raise
    st = stop(p)
    check(st["messages"] == 2, f"counts: {st}")


def main():
    stall(["--stall", "2:600"])
    r = subprocess.run([SINK, "--listen", "198.18.0.1:2525"],
                       capture_output=True, text=True)
    check(r.returncode == 2 and "loopback" in r.stderr,
          f"non-loopback refused: {r.returncode} {r.stderr}")
    p, port = start_sink(SINK)
    try:
        total = loadgen_modes(port)
        by_hand(port)
    except BaseException:
        p.kill()
        raise
    st = stop(p)
    check(st["data_messages"] == total["data"] + 2,
          f"DATA messages {st['data_messages']}, sent {total['data'] + 2}")
    check(st["bdat_messages"] == total["bdat"] + 1,
          f"BDAT messages {st['bdat_messages']}, sent {total['bdat'] + 1}")
    check(st["messages"] == st["data_messages"] + st["bdat_messages"],
          f"counts: {st}")
    print(f"ok: {st}")


main()
