#!/usr/bin/python3
"""Raw-socket transcripts against the real daemon: BDAT, smuggling, limits,
relay refusal, IPv6. What the unit tests check on the engine, checked here
end to end through the kernel transport and the spool."""
import socket

from fdtest import (Daemon, by_id, check, free_port, queued_id,
                    strip_received)


def ehlo(c, name="raw.test"):
    c.expect(220, r"^220 mx\.test ")
    return c.cmd(f"EHLO {name}", 250)


def bdat(d):
    c = d.connect()
    ehlo(c)
    c.cmd("MAIL FROM:<b@raw.test>", 250)
    c.cmd("RCPT TO:<u@example.com>", 250)
    # Binary but for NUL: a NUL is refused (issue 10, test_limits).
    chunk1 = b"Subject: bdat\r\n\r\nbinary \x01\xff and a fake end\r\n.\r\n"
    chunk2 = b"more\r\n"
    c.send(b"BDAT %d\r\n" % len(chunk1) + chunk1)
    c.expect(250)
    c.send(b"BDAT %d LAST\r\n" % len(chunk2) + chunk2)
    mid = queued_id(c.expect(250))
    c.cmd("QUIT", 221)
    got = strip_received(d.cat(mid))
    check(got == chunk1 + chunk2, f"BDAT body {got!r}")
    return mid


def smuggling(d):
    """A bare-LF 'end of data' must not end the message, and the smuggled
    second message must never be accepted."""
    before = len(d.scan()["messages"])
    for fake in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"):
        c = d.connect()
        ehlo(c)
        c.cmd("MAIL FROM:<a@raw.test>", 250)
        c.cmd("RCPT TO:<u@example.com>", 250)
        c.cmd("DATA", 354)
        c.send(b"Subject: one\r\n\r\nhello" + fake +
               b"MAIL FROM:<evil@raw.test>\r\nRCPT TO:<v@example.com>\r\n"
               b"DATA\r\nSubject: smuggled\r\n\r\nowned\r\n.\r\n")
        c.expect(550, r"5\.6\.0")
        # The session goes on normally afterwards.
        c.cmd("NOOP", 250)
        c.cmd("QUIT", 221)
    after = d.scan()["messages"]
    check(len(after) == before, f"smuggling left {len(after) - before} messages")


def limits(d):
    c = d.connect()
    ehlo(c)
    c.cmd("MAIL FROM:<a@raw.test> SIZE=999999999", 552, r"5\.3\.4")
    c.cmd("MAIL FROM:<a@raw.test> FOO=bar", 555, r"5\.5\.4")
    c.cmd("MAIL FROM:<a@raw.test>", 250)
    c.cmd("RCPT TO:<u@elsewhere.test>", 550, r"5\.7\.1")
    c.cmd("RCPT TO:<u%elsewhere.test@example.com>", 550, r"5\.7\.1")
    c.cmd('RCPT TO:<"u@elsewhere.test"@example.com>', 550, r"5\.7\.1")
    c.cmd("RCPT TO:<@example.com:u@elsewhere.test>", 550, r"5\.7\.1")
    c.cmd("RCPT TO:<postmaster>", 250)
    c.cmd("BOGUS", 500, r"5\.5\.[12]")
    c.send("X" * 600 + "\r\n")
    c.expect(500, r"5\.5\.[26]")
    c.cmd("RSET", 250)
    c.cmd("DATA", 503, r"5\.5\.1")
    c.cmd("VRFY user", 252)
    c.cmd("QUIT", 221)
    check(c.closed(), "closed after QUIT")
    # recipients per message
    c = d.connect()
    ehlo(c)
    c.cmd("MAIL FROM:<>", 250)
    for i in range(100):
        c.cmd(f"RCPT TO:<r{i}@example.com>", 250)
    c.cmd("RCPT TO:<r100@example.com>", 452, r"4\.5\.3")
    c.cmd("QUIT", 221)


def ipv6(d6):
    c = d6.connect(family=socket.AF_INET6, host="::1")
    ehlo(c)
    c.cmd("MAIL FROM:<six@raw.test>", 250)
    c.cmd("RCPT TO:<u@example.com>", 250)
    c.cmd("DATA", 354)
    c.send(b"Subject: v6\r\n\r\nover IPv6\r\n.\r\n")
    mid = queued_id(c.expect(250))
    c.cmd("QUIT", 221)
    stored = d6.cat(mid)
    check(b"[IPv6:::1]" in stored.split(b"\r\n\r\n")[0],
          f"Received names the IPv6 client: {stored[:200]!r}")


def main():
    with Daemon("--max-message-size", "1M") as d:
        mid = bdat(d)
        smuggling(d)
        limits(d)
        c = d.connect()
        ehlo(c)
        c.cmd("MAIL FROM:<a@raw.test>", 250)
        c.cmd("RCPT TO:<u@example.com>", 250)
        c.cmd("DATA", 354)
        c.send((b"y" * 998 + b"\r\n") * 1100 + b".\r\n")
        c.expect(552, r"5\.3\.4")
        # A text line over 1000 octets (RFC 5321 4.5.3.1.6) rejects the
        # message at its end; the session goes on.
        c.cmd("MAIL FROM:<a@raw.test>", 250)
        c.cmd("RCPT TO:<u@example.com>", 250)
        c.cmd("DATA", 354)
        c.send(b"x" * 1000 + b"\r\nshort\r\n.\r\n")
        c.expect(550, r"5\.6\.0")
        c.cmd("QUIT", 221)
        check(set(by_id(d.scan())) == {mid}, "only the BDAT message is kept")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        print("ok (IPv6 part skipped: no ::1 here)")
        return
    port = free_port(socket.AF_INET6, "::1")
    with Daemon(listen=[f"[::1]:{port}"], port=port) as d6:
        ipv6(d6)
    print("ok: BDAT, smuggling variants, limits, relay, IPv6")


main()
