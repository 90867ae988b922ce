#!/usr/bin/python3
"""What an operator reads about a session: one event=disconnect line per
session with the client, HELO, duration, messages queued and refused, TLS,
why it ended and a per-verb command summary ("rcpt=1/2": one of two got a
2xx), and session ids that do not start again at 0 after a restart (a grep
for one id must find one session)."""
import re
import smtplib

from fdtest import Daemon, check


def session(d):
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("a@client.test")
        s.rcpt("u@example.com")
        code, _ = s.rcpt("x@elsewhere.test")  # relay denied: 550
        check(code == 550, f"relay: {code}")
        s.data(b"Subject: x\r\n\r\nhi\r\n")
        s.docmd("NOSUCH")
    return None


def disconnect_lines(d):
    return [l for l in d.read_run_log().splitlines()
            if "event=disconnect" in l]


def main():
    with Daemon() as d:
        session(d)
        d.wait_log(r"event=disconnect", 10)
        line = disconnect_lines(d)[-1]
        pat = (r"smtp ([0-9a-f]{16}) event=disconnect client=127\.0\.0\.1 "
               r"helo=client\.test duration_ms=\d+ messages=1 refused=0 "
               r"tls=none end=quit state=closing errors=2 ehlo=1 mail=1 "
               r"rcpt=1/2 data=1 quit=1 unknown=1$")
        m = re.search(pat, line)
        check(m, f"summary line: {line}")
        first = m.group(1)
        d.stop()
        d.start()
        session(d)
        d.wait_log(r"event=disconnect", 10)
        second = re.search(r"smtp ([0-9a-f]{16}) event=disconnect",
                           disconnect_lines(d)[-1]).group(1)
        check(first != second, f"session id {first} again after a restart")
        check(first[:2] == second[:2] == "00", "worker byte kept")
        print(f"ok: summary line; ids {first} then {second} after a restart")


main()
