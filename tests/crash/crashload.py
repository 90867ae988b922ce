"""The load the crash tests put on finaldot: an SMTP client that sends
messages in a loop until told to stop, reconnecting while the daemon is
down (killed, restarting), and hands each reply to a final dot to a
callback. Shared by test_crash.py, test_delivery_crash.py and
test_powercut.py and test_powercut_delivery.py."""
import socket
import time

CRLF = b"\r\n"


def lines(text, width=76):
    """text as CRLF-separated lines of at most `width` octets: RFC 5321
    4.5.3.1.6 caps a line at 1000, and a longer one is refused, not
    stored (a load of single long lines tests nothing)."""
    return CRLF.join(text[i:i + width] for i in range(0, len(text), width))


def client(port, stop, make_body, on_reply, sender=b"c@crash.test",
           rcpt=b"u@example.com"):
    """Until stop is set: make_body(n) -> (key, body); one transaction;
    on_reply(key, body, reply_line). Connection errors are retried.
    rcpt: one address, or a list of them (one RCPT each)."""
    rcpts = [rcpt] if isinstance(rcpt, bytes) else list(rcpt)
    n = 0
    while not stop.is_set():
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            f = s.makefile("rb")

            def reply():
                while True:
                    line = f.readline()
                    if not line:
                        raise ConnectionError("eof")
                    if line[3:4] != b"-":
                        return line

            reply()
            s.sendall(b"EHLO crash.test\r\n")
            reply()
            while not stop.is_set():
                n += 1
                key, body = make_body(n)
                s.sendall(b"MAIL FROM:<" + sender + b">\r\n" +
                          b"".join(b"RCPT TO:<" + r + b">\r\n"
                                   for r in rcpts) + b"DATA\r\n")
                for _ in range(2 + len(rcpts)):
                    reply()
                s.sendall(body + b".\r\n")
                on_reply(key, body, reply())
        except (OSError, ConnectionError):
            time.sleep(0.01)  # the daemon is down: try again
