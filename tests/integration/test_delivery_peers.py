#!/usr/bin/python3
"""Delivery to real next hops started by the test on loopback:

- Postfix (a private instance, its own config and queue) as the SMTP next
  hop: every message arrives exactly once, byte-identical after our
  Received header; pipelining clients, several connections.
- Dovecot's LMTP server into Maildirs: a multi-recipient message with
  mixed per-recipient replies (two users exist, one does not): the two
  get it, the third is bounced to the sender with a DSN.
"""
import email
import email.policy
import os
import re
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import Daemon, check  # noqa: E402
from delivtest import (send, message, maildir_files, wait, log_count,  # noqa
                       run_cases)
from peers import PostfixPeer, DovecotLMTP, delivered_content  # noqa: E402


def postfix_got_each_once(pf, sent):
    """Postfix got every message of sent ({rcpt: [body, ...]}) once, each
    byte-identical after our Received header; the number of them."""
    total = sum(len(v) for v in sent.values())
    got = pf.wait_for(total, timeout=60)
    check(len(got) == total, f"postfix got {len(got)} of {total}\n"
          f"{pf.log()[-2000:]}")
    for rcpt, bodies in sent.items():
        msgs = pf.messages(rcpt)
        check(len(msgs) == len(bodies),
              f"{rcpt}: {len(msgs)} delivered, {len(bodies)} sent")
        check(sorted(delivered_content(m) for m in msgs) ==
              sorted(bodies), f"{rcpt}: content differs")
    return total


def case_postfix():
    with PostfixPeer(domain="dest.test", catch_all=True) as pf, \
            Daemon("--route", f"dest.test={pf.target}", "--threads", "2",
                   domains=("example.com", "dest.test"), delivery=True) as d:
        sent = {}
        lock = threading.Lock()

        def client(k):
            for i in range(25):
                rcpt = ["alice@dest.test", "bob@dest.test",
                        f"u{k}@dest.test"][i % 3]
                body = message(k * 100 + i, size=1000 + 300 * i)
                send(d, "a@example.com", [rcpt], body)
                with lock:
                    sent.setdefault(rcpt, []).append(body)

        ts = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        total = postfix_got_each_once(pf, sent)
        wait(lambda: log_count(d, r"status=sent") == total, 10,
             "one sent line per message")


def case_lmtp_mixed():
    with DovecotLMTP(domain="lmtp.test") as lm, \
            Daemon("--route", f"lmtp.test={lm.target_tcp}",
                   domains=("example.com", "lmtp.test"), delivery=True) as d:
        body = message(1)
        qid = send(d, "sender@example.com",
                   ["alice@lmtp.test", "nosuch@lmtp.test", "bob@lmtp.test"],
                   body)
        for u in ("alice@lmtp.test", "bob@lmtp.test"):
            got = lm.wait_for(u, 1, 20)
            check(len(got) == 1, f"{u}: {len(got)} messages")
            check(delivered_content(got[0]) == body, f"{u}: content")
        root = os.path.join(d.tmp, "maildir")
        files = wait(lambda: maildir_files(root, "sender@example.com"), 20,
                     "the DSN")
        with open(files[0], "rb") as f:
            dsn = email.message_from_bytes(f.read(),
                                           policy=email.policy.default)
        check(dsn.get_content_type() == "multipart/report", "DSN type")
        text = dsn.as_string()
        check("nosuch@lmtp.test" in text and "alice@lmtp.test" not in
              text.split("Final-Recipient")[1] if "Final-Recipient" in text
              else False, "DSN names nosuch only")
        # (the log's own thread may write these lines after the DSN lands)
        wait(lambda: log_count(d, rf"{qid} event=delivery .*status=sent")
             == 2, 10, "two sent")
        wait(lambda: log_count(d, rf"{qid} event=delivery "
                               r"to=<nosuch@lmtp.test>.*status=bounced")
             == 1, 10, "one bounced")
    # The unix socket target works too.
    with DovecotLMTP(domain="lmtp.test", unix=True) as lm, \
            Daemon("--route", f"lmtp.test={lm.target_unix}",
                   domains=("example.com", "lmtp.test"), delivery=True) as d:
        send(d, "sender@example.com", ["carol@lmtp.test"], message(2))
        check(len(lm.wait_for("carol@lmtp.test", 1, 20)) == 1,
              "unix socket LMTP")


def case_backlog_batches():
    """A backlog falls due at once (queued with delivery off, then a
    restart with it on): the delivery threads take up to 16 jobs per next
    hop and pipeline them over one connection (BDAT to Postfix and to
    Dovecot's LMTP, both offer CHUNKING and PIPELINING). Every message
    arrives exactly once and intact, a message over 64 KiB (sent alone in
    its batch) included; LMTP's per-recipient refusals stay with their
    message: one bounce per message that named the unknown user."""
    with PostfixPeer(domain="dest.test", catch_all=True) as pf, \
            DovecotLMTP(domain="lmtp.test") as lm:
        with Daemon("--route", f"dest.test={pf.target}",
                    "--route", f"lmtp.test={lm.target_tcp}",
                    domains=("example.com", "dest.test",
                             "lmtp.test")) as d:
            sent, lmtp_want, bounced = {}, {}, 0
            for i in range(120):
                rcpts = [f"u{i % 5}@dest.test"]
                if i % 4 == 0:
                    rcpts.append(f"w{i % 3}@dest.test")
                size = 90000 if i == 57 else 800 + 37 * i
                body = message(1000 + i, size=size)
                send(d, "a@example.com", rcpts, body)
                for r in rcpts:
                    sent.setdefault(r, []).append(body)
            for i in range(30):
                rcpts = ["alice@lmtp.test", "bob@lmtp.test"]
                if i % 3 == 0:
                    rcpts.insert(1, "nosuch@lmtp.test")
                    bounced += 1
                body = message(2000 + i, size=1500)
                send(d, "sender@example.com", rcpts, body)
                for r in ("alice@lmtp.test", "bob@lmtp.test"):
                    lmtp_want.setdefault(r, []).append(body)
            d.stop()
            d.delivery = True
            d.start()
            total = postfix_got_each_once(pf, sent)
            for u, bodies in lmtp_want.items():
                msgs = lm.wait_for(u, len(bodies), 30)
                check(sorted(delivered_content(m) for m in msgs) ==
                      sorted(bodies), f"{u}: {len(msgs)} delivered, "
                      f"{len(bodies)} sent, or content differs")
            root = os.path.join(d.tmp, "maildir")
            wait(lambda: len(maildir_files(root, "sender@example.com")) ==
                 bounced, 30, f"{bounced} DSNs")
            wait(lambda: log_count(d, r"status=sent") ==
                 total + 2 * 30 + bounced, 10, "one sent line per delivery")
            check(log_count(d, r"to=<nosuch@lmtp.test>.*status=bounced") ==
                  bounced, "one bounce line per unknown-user recipient")
            check(log_count(d, r"event=reply_lost") == 0, "no reply lost")
        # Pipelined: Postfix's smtpd counts each session's commands when
        # the (cached, now closed) connection ends; an RSET goes between
        # the transactions of a batch, never in one at a time.
        wait(lambda: "disconnect from" in pf.log(), 10, "postfix sessions")
        batched = [int(m.group(1)) for m in re.finditer(
            r"disconnect from \S+ .*\brset=(\d+)", pf.log())]
        check(batched and max(batched) >= 4,
              f"no pipelined batch in Postfix's sessions: rset={batched}")


CASES = [case_postfix, case_lmtp_mixed, case_backlog_batches]

if __name__ == "__main__":
    run_cases(CASES)
