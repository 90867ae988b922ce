#!/usr/bin/python3
"""python3 smtplib against the real daemon, without and with pipelining;
every accepted message is found byte-identical (after the Received header)
by `finaldotctl spool scan` / `spool cat`."""
import smtplib

from fdtest import (Daemon, by_id, check, queued_id, smtplib_body,
                    strip_received)

MESSAGES = [
    b"Subject: plain\r\n\r\nHello.\r\n",
    b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n",
    "Subject: utf-8\r\n\r\nGr\u00fc\u00dfe, \u65e5\u672c\r\n".encode(),
    b"Subject: no final newline\r\n\r\nlast line",
    b"Subject: big\r\n\r\n" + b"".join(
        b"%06d " % i + b"x" * 70 + b"\r\n" for i in range(15000)),
    b"Subject: empty body\r\n\r\n",
    # smtplib turns bare LF into CRLF for str messages only.
    "Subject: bare lf is fixed by smtplib\n\nline one\nline two\n",
]


def bare_lf_rejected(port):
    """A bytes body with bare LF goes to the wire as it is: finaldot must
    refuse the message (550 5.6.0) and keep the session usable."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("bare@client.test")
        s.rcpt("user@example.com")
        code, resp = s.data(b"Subject: bare\n\nhello\n.\nsmuggled\n")
        check(code == 550 and resp.startswith(b"5.6.0"), f"{code} {resp}")
        code, _ = s.noop()
        check(code == 250, "session usable after the rejection")


def send_plain(port):
    ids = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        code, _ = s.ehlo("client.test")
        check(code == 250, "EHLO")
        check(s.has_extn("pipelining") and s.has_extn("chunking") and
              s.has_extn("8bitmime") and s.has_extn("smtputf8") and
              s.has_extn("enhancedstatuscodes"), f"extensions {s.esmtp_features}")
        check(int(s.esmtp_features["size"]) == 32 << 20, "SIZE")
        for i, msg in enumerate(MESSAGES):
            s.mail(f"sender{i}@client.test", ["BODY=8BITMIME"])
            s.rcpt("user@example.com")
            if i % 2:
                s.rcpt("other@localhost")
            code, resp = s.data(msg)
            check(code == 250, f"DATA reply {code} {resp}")
            ids[queued_id([f"250 {resp.decode()}"])] = (msg, i)
    return ids


def send_pipelined(port):
    """smtplib has no pipelining API: send whole command groups with
    SMTP.send() and read the replies with getreply(), as RFC 2920 allows."""
    ids = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("pipeliner.test")
        for i, msg in enumerate(MESSAGES):
            body = smtplib_body(msg)
            stuffed = b"\r\n".join(
                (b"." + l if l.startswith(b".") else l)
                for l in body[:-2].split(b"\r\n")) + b"\r\n.\r\n"
            # MAIL, RCPT, RCPT, DATA in one write; then the body and the
            # next transaction's MAIL in one write.
            s.send(f"MAIL FROM:<p{i}@pipeliner.test>\r\n"
                   f"RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
                   f"DATA\r\n")
            for want in (250, 250, 250, 354):
                code, resp = s.getreply()
                check(code == want, f"pipelined reply {code} {resp}, want {want}")
            s.send(stuffed + b"NOOP\r\n")
            code, resp = s.getreply()
            check(code == 250, f"end of data {code} {resp}")
            ids[queued_id([f"250 {resp.decode()}"])] = (msg, i)
            code, resp = s.getreply()
            check(code == 250 and resp.startswith(b"2.0.0"), f"NOOP {code} {resp}")
    return ids


def verify(d, ids):
    scan = by_id(d.scan())
    for mid, (msg, i) in ids.items():
        check(mid in scan, f"message {mid} ({i}) missing from spool scan")
        stored = strip_received(d.cat(mid))
        want = smtplib_body(msg)
        check(stored == want, f"message {i}: stored body differs "
              f"({len(stored)} vs {len(want)} bytes)")
        check(scan[mid]["size"] >= len(want), f"size of {mid}")


def main():
    with Daemon() as d:
        bare_lf_rejected(d.port)
        a = send_plain(d.port)
        b = send_pipelined(d.port)
        check(len(a) == len(MESSAGES) and len(b) == len(MESSAGES),
              "every message got its own id")
        check(not set(a) & set(b), "ids are unique")
        verify(d, a)
        verify(d, b)
        scan = d.scan()
        check(len(scan["messages"]) == 2 * len(MESSAGES),
              f"spool holds {len(scan['messages'])} messages")
        m = by_id(scan)[next(iter(a))]
        check(m["recipients"] == ["user@example.com"], f"recipients {m}")
        check(m["sender"] == "sender0@client.test", f"sender {m}")
        check(d.stop() == 0, "clean exit on SIGTERM")
        st = d.stats()
        check(int(st.get("messages", -1)) == 2 * len(MESSAGES), f"stats {st}")
    print("ok: %d messages plain, %d pipelined" % (len(a), len(b)))


main()
