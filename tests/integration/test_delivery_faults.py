#!/usr/bin/python3
"""Delivery against scripted next hops: every fault gets a clear outcome
(deferral and retry, bounce with a DSN, expiry), never a crash or a loss.

Each case starts its own finaldot (delivery on, retries after 1-2 s) and
its own ScriptedHop on loopback, routes dest.test to the hop, and lets
bounces for senders in example.com go to a Maildir in the test's temp dir.
"""
import email
import email.policy
import json
import os
import re
import smtplib
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import Daemon, Client, check, fail, free_port  # noqa: E402
from delivtest import (send, message, maildir_files, wait, log_count,  # noqa
                       strip_our_received, run_cases, settled_log)
from peers import (ScriptedHop, Script, fail_first, HANG, GARBAGE,  # noqa
                   DEFAULT_EXTENSIONS, Delay)

FAST = ["--retry-min", "1s", "--retry-max", "2s", "--smtp-timeout", "3s",
        "--smtp-data-timeout", "3s", "--smtp-connect-timeout", "2s"]


def daemon(hop_target, *extra):
    return Daemon("--route", f"dest.test={hop_target}", *FAST, *extra,
                  domains=("example.com", "dest.test"), delivery=True)


def dsn_of(d, sender="a@example.com", n=1, timeout=20):
    root = os.path.join(d.tmp, "maildir")
    files = wait(lambda: len(maildir_files(root, sender)) >= n and
                 maildir_files(root, sender), timeout, f"{n} DSN(s)")
    with open(files[-1], "rb") as f:
        return email.message_from_bytes(f.read(), policy=email.policy.default)


def dsn_fields(msg):
    """(per-message fields, [per-recipient fields]) of a DSN."""
    check(msg.get_content_type() == "multipart/report",
          f"DSN type {msg.get_content_type()}")
    check(msg.get_param("report-type") == "delivery-status",
          "report-type")
    parts = list(msg.iter_parts())
    check(len(parts) >= 2, f"{len(parts)} parts")
    ds = parts[1]
    check(ds.get_content_type() == "message/delivery-status",
          f"part 2 is {ds.get_content_type()}")
    raw = ds.get_payload()
    blocks = []
    if isinstance(raw, list):
        blocks = [dict((k.lower(), str(v)) for k, v in b.items()) for b in raw]
    else:
        for chunk in str(raw).replace("\r\n", "\n").split("\n\n"):
            fields = {}
            for line in chunk.split("\n"):
                if ":" in line and not line[:1].isspace():
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
            if fields:
                blocks.append(fields)
    check(len(blocks) >= 2, f"delivery-status blocks: {blocks}")
    return blocks[0], blocks[1:]


def case_retry():
    """451 at the end of data, then 250: deferred, retried, delivered once."""
    with ScriptedHop(script=Script(dot=fail_first(1))) as hop, \
            daemon(hop.target) as d:
        body = message(1)
        qid = send(d, "a@example.com", ["bob@dest.test"], body)
        hop.wait_for(2, 20)
        wait(lambda: log_count(d, rf"{qid} event=delivery .*status=sent"),
             10, "status=sent")
        check(log_count(d, rf"{qid} event=delivery .*status=deferred") == 1,
              "one deferral logged")
        done = hop.completed()
        check(len(done) == 2, f"{len(done)} transactions")
        check(strip_our_received(done[1].body) == body,
              "retried body differs from the client's message")
        check(not maildir_files(os.path.join(d.tmp, "maildir"),
                                "a@example.com"), "no DSN for a deferral")


def case_bounce_dsn():
    """550 for one recipient: the other is delivered, the sender gets one
    DSN naming the refused recipient with the next hop's reply."""
    s = Script(rcpt={"gone@dest.test": "550 5.1.1 <gone@dest.test>: "
                                       "User unknown"})
    with ScriptedHop(script=s) as hop, daemon(hop.target) as d:
        qid = send(d, "a@example.com", ["ok@dest.test", "gone@dest.test"],
                   message(2), rcpt_options=["NOTIFY=FAILURE"]
                   if b"DSN" in ehlo(d) else [])
        hop.wait_for(1, 20)
        t = hop.completed()[0]
        check([r[0].lower() for r in t.rcpts] == ["ok@dest.test"],
              f"hop accepted {t.rcpts}")
        msg = dsn_of(d)
        check(msg["To"] and "a@example.com" in str(msg["To"]), "DSN To")
        check(str(msg["Auto-Submitted"]).startswith("auto-replied"),
              "Auto-Submitted")
        per_msg, per_rcpt = dsn_fields(msg)
        check(per_msg.get("reporting-mta", "").startswith("dns;"),
              f"Reporting-MTA {per_msg}")
        check(len(per_rcpt) == 1, f"recipients in DSN: {per_rcpt}")
        r = per_rcpt[0]
        check("gone@dest.test" in r.get("final-recipient", ""),
              f"Final-Recipient {r}")
        check(r.get("action") == "failed", f"Action {r}")
        check(r.get("status") == "5.1.1", f"Status {r}")
        check("User unknown" in r.get("diagnostic-code", ""),
              f"Diagnostic-Code {r}")
        # RFC 3464 2.3.5: the MTA whose reply this is
        check(r.get("remote-mta") == "dns; 127.0.0.1", f"Remote-MTA {r}")
        wait(lambda: log_count(d, rf"{qid} event=bounce status=sent"), 10,
             "bounce sent")
        check(log_count(d, rf"{qid} event=delivery to=<gone@dest.test>.*"
                        r"status=bounced") == 1, "bounced line")


def case_bounce_status_from_the_reply():
    """A DSN's Status is the enhanced code of the next hop's reply, where
    it has one, else 5.0.0: never a d.d.d found elsewhere in the text
    ("550 Your IP 45.12.3.9 is listed" gave Status 5.12.3)."""
    s = Script(rcpt={"gone@dest.test": "550 5.1.1 <gone@dest.test>: "
                                       "User unknown",
                     "ip@dest.test": "550 Your IP 45.12.3.9 is listed"})
    with ScriptedHop(script=s) as hop, daemon(hop.target) as d:
        send(d, "a@example.com", ["gone@dest.test", "ip@dest.test"],
             message(3))
        _, per_rcpt = dsn_fields(dsn_of(d))
        got = {r.get("final-recipient", "").split(";")[-1].strip():
               r.get("status") for r in per_rcpt}
        check(got == {"gone@dest.test": "5.1.1", "ip@dest.test": "5.0.0"},
              f"Status per recipient: {got}")
        check(hop.connections >= 1, "never tried")


def case_success_dsn():
    """NOTIFY=SUCCESS (RFC 3461): a success report when nobody further
    will send one: Action delivered for a Maildir delivery, relayed for
    an SMTP next hop without DSN, and none when the next hop offers DSN
    (the NOTIFY goes with the message). Headers only, RET=FULL or not.
    NOTIFY=SUCCESS was accepted and nothing was ever sent."""
    plain = Script(extensions=[e for e in DEFAULT_EXTENSIONS if e != "DSN"])
    with ScriptedHop(script=plain) as hop, daemon(hop.target) as d:
        send(d, "a@example.com", ["u@example.com"], message(7),
             mail_options=["RET=FULL"], rcpt_options=["NOTIFY=SUCCESS"])
        msg = dsn_of(d)
        _, per_rcpt = dsn_fields(msg)
        check([(r.get("action"), r.get("status")) for r in per_rcpt] ==
              [("delivered", "2.0.0")], f"Maildir: {per_rcpt}")
        types = [p.get_content_type() for p in msg.iter_parts()]
        check(types[-1] == "text/rfc822-headers",
              f"a success report returns headers only: {types}")
        send(d, "a@example.com", ["r@dest.test"], message(8),
             rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
        _, per_rcpt = dsn_fields(dsn_of(d, n=2))
        check([(r.get("action"), r.get("status")) for r in per_rcpt] ==
              [("relayed", "2.0.0")], f"relayed: {per_rcpt}")
    with ScriptedHop() as hop, daemon(hop.target) as d:
        send(d, "a@example.com", ["r@dest.test"], message(9),
             rcpt_options=["NOTIFY=SUCCESS"])
        hop.wait_for(1, 20)
        params = [p.upper() for p in hop.completed()[0].rcpts[0][1]]
        check("NOTIFY=SUCCESS" in params, f"NOTIFY not passed on: {params}")
        time.sleep(2)
        check(not maildir_files(os.path.join(d.tmp, "maildir"),
                                "a@example.com"),
              "a success report although the next hop offers DSN")


def case_success_dsn_after_a_restart():
    """A success report still owed at a restart (the sender's MX was down)
    is sent after it: the delivery log's DELIVERED record says so."""
    plain = Script(extensions=[e for e in DEFAULT_EXTENSIONS if e != "DSN"])
    mx_port = free_port()
    with ScriptedHop(script=plain) as hop, \
            Daemon("--route", f"dest.test={hop.target}",
                   "--route", f"sender.test=smtp:127.0.0.1:{mx_port}",
                   *FAST, domains=("sender.test", "dest.test"),
                   delivery=True) as d:
        qid = send(d, "a@sender.test", ["r@dest.test"], message(10),
                   rcpt_options=["NOTIFY=SUCCESS"])
        hop.wait_for(1, 20)
        wait(lambda: log_count(d, rf"{qid} event=bounce status=deferred"),
             20, "the report deferred (the sender's MX is down)")
        check(d.stop() == 0, "clean stop")
        with ScriptedHop(port=mx_port) as mx:
            d.start()
            d.ctl("queue", "flush")
            mx.wait_for(1, 30)
            check(mx.completed(), "no report after the restart")
            body = mx.completed()[0].body
            check(b"Action: relayed" in body, f"report: {body[:600]!r}")


def case_dsn_after_a_restart_names_the_remote_mta():
    """A DSN owed at a restart (the sender's MX was down) still names the
    next hop whose 550 it reports: the delivery log's BOUNCED record says
    the reason was that hop's reply. The sender spells its domain with a
    trailing dot, which the SMTP engine takes: the DSN is routed by that
    domain like any other mail (it was taken for a domain we do not
    accept, and dropped for want of a --bounce-relay)."""
    s = Script(rcpt={"gone@dest.test": "550 5.1.1 no such user"})
    mx_port = free_port()
    with ScriptedHop(script=s) as hop, \
            Daemon("--route", f"dest.test={hop.target}",
                   "--route", f"sender.test=smtp:127.0.0.1:{mx_port}",
                   *FAST, domains=("sender.test", "dest.test"),
                   delivery=True) as d:
        qid = send(d, "a@Sender.Test.", ["gone@dest.test"], message(11))
        wait(lambda: log_count(d, rf"{qid} event=bounce status=deferred"),
             20, "the DSN deferred (the sender's MX is down)")
        check(log_count(d, r"event=bounce_dropped") == 0,
              "the DSN was dropped")
        check(d.stop() == 0, "clean stop")
        with ScriptedHop(port=mx_port) as mx:
            d.start()
            d.ctl("queue", "flush")
            mx.wait_for(1, 30)
            t = mx.completed()[0]
            check([r[0].lower() for r in t.rcpts] == ["a@sender.test."],
                  f"DSN to {t.rcpts}")
            msg = email.message_from_bytes(t.body,
                                           policy=email.policy.default)
            _, per_rcpt = dsn_fields(msg)
            check(per_rcpt[0].get("remote-mta") == "dns; 127.0.0.1" and
                  per_rcpt[0].get("status") == "5.1.1",
                  f"after the restart: {per_rcpt}")


def case_dsn_sent_is_no_possible_duplicate():
    """A DSN that went out is no attempt in flight at the next start, for
    the recipient it reported on or any other: its ATTEMPT was for ALL
    and its DSN_DONE closed none, so a restart counted the message as a
    possible duplicate."""
    s = Script(rcpt={"gone@dest.test": "550 5.1.1 no such user"})
    with ScriptedHop(script=s) as hop, daemon(hop.target) as d:
        qid = send(d, "a@example.com", ["ok@dest.test", "gone@dest.test"],
                   message(11))
        dsn_of(d)
        wait(lambda: log_count(d, rf"{qid} event=bounce status=sent"), 10,
             "bounce sent")
        check(d.stop() == 0, "clean stop")
        d.start()
        m = re.findall(r"event=queue_rebuilt .*possible_duplicates=(\d+)",
                       d.read_run_log())
        check(m and m[-1] == "0", f"possible duplicates after a DSN: {m}")


def case_dsn_reply_lost():
    """A DSN whose final reply never came (the sender's MX hangs after the
    dot) is logged event=reply_lost like a message (it was not: only the
    deferral showed), then sent again over a new connection."""
    s = Script(rcpt={"gone@dest.test": "550 5.1.1 no such user"})
    with ScriptedHop(script=s) as hop, \
            ScriptedHop(script=[Script(dot=HANG), Script()]) as mx, \
            Daemon("--route", f"dest.test={hop.target}",
                   "--route", f"sender.test={mx.target}",
                   *FAST, domains=("sender.test", "dest.test"),
                   delivery=True) as d:
        qid = send(d, "a@sender.test", ["gone@dest.test"], message(12))
        mx.wait_for(1, 30)
        wait(lambda: log_count(d, rf"{qid} event=bounce status=sent"), 10,
             "bounce sent")
        check(log_count(d, rf"{qid} event=reply_lost") == 1,
              "reply_lost logged for the DSN")
        check(log_count(d, rf"{qid} event=bounce status=deferred") == 1,
              "one deferral of the DSN")
        check(b"Action: failed" in mx.completed()[0].body, "not the DSN")


def dead_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def show(d, qid):
    return json.loads(d.ctl("queue", "show", qid, "--json")[1])


def case_retry_within_bounds():
    """The wait before a retry stays within --retry-min and --retry-max,
    jitter included (the jitter came after the cap: 0.75-1.25 times
    them, so waits of 5,000 s with the default 4,000 s maximum)."""
    from datetime import datetime
    with Daemon("--route", f"dest.test=smtp:127.0.0.1:{dead_port()}",
                "--retry-min", "60s", "--retry-max", "60s",
                "--smtp-connect-timeout", "2s",
                domains=("example.com", "dest.test"), delivery=True) as d:
        # Four: fewer connection failures in a row than the next hop's
        # window, so it is never declared dead (suspended mail has no
        # attempt of its own to measure from).
        ids = [send(d, "a@example.com", ["b@dest.test"], message(60 + i))
               for i in range(4)]
        for q in ids:
            wait(lambda q=q: show(d, q)["recipients"][0]["attempts"] >= 1,
                 20, f"{q} deferred")
            r = show(d, q)["recipients"][0]
            gap = (datetime.fromisoformat(r["next_attempt"]) -
                   datetime.fromisoformat(r["last_attempt"])).total_seconds()
            check(59 <= gap <= 61, f"{q}: retry in {gap:.1f} s, not 60")


def case_suspended_counts_a_deferral():
    """Mail deferred because its next hop was declared dead counts the
    deferral (it stayed a first attempt: queued, once the next hop came
    back, in front of mail that arrived after it, and due again every
    retry_min for the whole queue lifetime)."""
    with Daemon("--route", f"dest.test=smtp:127.0.0.1:{dead_port()}",
                "--retry-min", "60s", "--retry-max", "120s",
                "--dest-concurrency", "2", "--smtp-connect-timeout", "2s",
                domains=("example.com", "dest.test"), delivery=True) as d:
        ids = [send(d, "a@example.com", ["b@dest.test"], message(80 + i))
               for i in range(60)]
        d.wait_log(r"event=destination_dead", 20)
        views = {}

        def all_counted():
            for q in ids:
                views[q] = show(d, q)["recipients"][0]
            return all(v["attempts"] >= 1 for v in views.values())
        wait(all_counted, 15, "every message deferred and counted")
        check(any("suspended" in v["reason"] for v in views.values()),
              "no message was deferred as suspended")


def case_busy_next_hop_is_not_dead():
    """Two connections in a row turned away (421 too many connections) do
    not make a next hop dead: that takes a window's worth of failures
    with no success between (two did, and suspended its whole queue)."""
    busy = Script(greeting="421 4.7.0 too many connections")
    with ScriptedHop(script=[busy, busy, Script()]) as hop, \
            daemon(hop.target) as d:
        qid = send(d, "a@example.com", ["b@dest.test"], message(300))
        wait(lambda: log_count(d, rf"{qid} event=delivery .*status=sent"),
             30, "delivered after two 421s")
        check(log_count(d, rf"{qid} event=delivery .*status=deferred") == 2,
              "two deferrals")
        check(log_count(d, r"event=destination_dead") == 0,
              "declared dead after two 421 greetings")


def case_slow_next_hops_leave_a_thread():
    """Two slow next hops whose windows together take every delivery
    thread: a message for a third route goes out when the first thread
    is done with a batch, not after their backlogs (a thread done with a
    batch went back to the next hop it was connected to)."""
    slow = Script(dot=Delay(0.1, "250 2.0.0 Ok"))
    with ScriptedHop(script=slow) as h1, ScriptedHop(script=slow) as h2, \
            Daemon("--route", f"one.test={h1.target}",
                   "--route", f"two.test={h2.target}",
                   "--delivery-threads", "4", "--dest-concurrency", "2",
                   *FAST, domains=("example.com", "one.test", "two.test"),
                   delivery=True) as d:
        for i in range(100):
            send(d, "a@example.com", ["b@one.test"], message(400 + i))
            send(d, "a@example.com", ["b@two.test"], message(500 + i))
        qid = send(d, "a@example.com", ["c@example.com"], message(600))
        wait(lambda: log_count(d, rf"{qid} event=delivery .*status=sent"),
             60, "the local message delivered")
        done = len(h1.completed()) + len(h2.completed())
        check(done < 150, f"delivered only after {done} of 200 slow ones")
        print(f"ok: the local message went out after {done} of 200")


def case_hold_and_delete_stop_queued_jobs():
    """queue hold / queue delete of a message whose job already waits in a
    slow next hop's list: it is not sent (it was: the job went out when
    its turn came). Released, the held one is sent. The hop answers no
    final dot until both are done, so every job is in the list by then
    however slowly the messages arrive (under the sanitizers, on a busy
    machine, the last ones were once delivered before the hold)."""
    go = threading.Event()

    def dot(sess):
        go.wait(60)
        return Delay(0.15, "250 2.0.0 Ok")

    with ScriptedHop(script=Script(dot=dot)) as hop, \
            daemon(hop.target, "--dest-concurrency", "1") as d:
        try:
            ids = [send(d, "a@example.com", ["b@dest.test"],
                        message(200 + i)) for i in range(45)]
            held, gone = ids[-2], ids[-1]
            check(d.ctl("queue", "hold", held)[1] == "1 message held\n",
                  "hold")
            check(d.ctl("queue", "delete", gone)[1] ==
                  "1 message deleted\n", "delete")
        finally:
            go.set()
        for q in ids[:-2]:
            wait(lambda q=q: log_count(d, rf"{q} event=delivery "
                                          r".*status=sent"), 60,
                 f"{q} delivered")
        check(log_count(d, rf"{held} event=delivery .*status=sent") == 0,
              "the held message was sent")
        check(log_count(d, rf"{gone} event=delivery .*status=sent") == 0,
              "the deleted message was sent")
        check(len(hop.completed()) == 43, f"{len(hop.completed())} sent")
        d.ctl("queue", "release", held)
        wait(lambda: log_count(d, rf"{held} event=delivery .*status=sent"),
             20, "released, then sent")


def case_null_sender_no_dsn():
    """A bounce is never sent to the null sender (RFC 5321 6.1)."""
    s = Script(rcpt={"gone@dest.test": "550 5.1.1 no such user"})
    with ScriptedHop(script=s) as hop, daemon(hop.target) as d:
        qid = send(d, "", ["gone@dest.test"], message(3))
        wait(lambda: log_count(d, rf"{qid} event=delivery .*status=bounced"),
             20, "bounced")
        import time
        time.sleep(1.5)
        root = os.path.join(d.tmp, "maildir")
        check(not os.path.exists(root) or not any(
            files for _, _, files in os.walk(root)),
            "a DSN was written for the null sender")
        check(log_count(d, rf"{qid} event=bounce") == 0, "bounce attempted")


def case_expiry_dsn():
    """4xx until the queue lifetime is over: expired, DSN with 4.4.7."""
    s = Script(dot="451 4.3.0 Try again later")
    with ScriptedHop(script=s) as hop, \
            daemon(hop.target, "--queue-lifetime", "3s") as d:
        qid = send(d, "a@example.com", ["slow@dest.test"], message(4))
        msg = dsn_of(d, timeout=30)
        _, per_rcpt = dsn_fields(msg)
        check(per_rcpt[0].get("status") == "4.4.7", f"Status {per_rcpt}")
        check(per_rcpt[0].get("action") == "failed", f"Action {per_rcpt}")
        # the reason ends with the next hop's last reply: named
        check(per_rcpt[0].get("remote-mta") == "dns; 127.0.0.1",
              f"Remote-MTA {per_rcpt}")
        check(log_count(d, rf"{qid} event=delivery .*status=expired") == 1,
              "expired line")
        check(hop.connections >= 1, "never tried")


def case_expiry_dsn_greylisted():
    """The sender's MX greylists the DSN of an expired message (451 to the
    first try): the DSN is tried again and arrives. Its retries were bound
    to the message's lifetime, over before the DSN's first try: the first
    4xx dropped it (event=bounce status=expired)."""
    s = Script(dot="451 4.3.0 Try again later")
    grey = Script(dot=fail_first(1, "451 4.7.1 greylisted, try again"))
    with ScriptedHop(script=s) as hop, ScriptedHop(script=grey) as mx, \
            Daemon("--route", f"dest.test={hop.target}",
                   "--route", f"sender.test={mx.target}", *FAST,
                   "--queue-lifetime", "3s",
                   domains=("sender.test", "dest.test"),
                   delivery=True) as d:
        qid = send(d, "a@sender.test", ["slow@dest.test"], message(5))
        mx.wait_for(2, 40)
        check(len(mx.completed()) >= 2,
              "the DSN was not tried again after the greylisting 451")
        dsn = mx.completed()[1]
        check(b"multipart/report" in dsn.body and
              b"report-type=delivery-status" in dsn.body,
              f"not a DSN: {dsn.body[:300]!r}")
        check(dsn.mail_from == "", f"DSN from <{dsn.mail_from}>")
        wait(lambda: log_count(d, rf"{qid} event=bounce status=sent"), 10,
             "event=bounce status=sent")
        check(log_count(d, rf"{qid} event=bounce status=deferred") >= 1,
              "the greylisting was not a deferral")


def case_dsn_to_a_utf8_sender():
    """A DSN to a UTF-8 envelope sender asks for SMTPUTF8: without it the
    sender's MX refuses the address (553 5.6.7) and the DSN was dropped."""
    s = Script(dot="550 5.1.1 no such user")
    with ScriptedHop(script=s) as hop, ScriptedHop() as mx, \
            Daemon("--route", f"dest.test={hop.target}",
                   "--route", f"sender.test={mx.target}", *FAST,
                   domains=("sender.test", "dest.test"),
                   delivery=True) as d:
        send(d, "s\u00e9@sender.test", ["gone@dest.test"], message(6),
             mail_options=["SMTPUTF8"])
        mx.wait_for(1, 20)
        done = mx.completed()
        check(done, "no DSN reached the sender's MX")
        check("SMTPUTF8" in [p.upper() for p in done[0].mail_params],
              f"DSN's MAIL without SMTPUTF8: {done[0].mail_params}")
        check(done[0].mail_from == "", f"DSN from <{done[0].mail_from}>")
        check(done[0].rcpts and done[0].rcpts[0][0] == "s\u00e9@sender.test",
              f"DSN to {done[0].rcpts}")


def case_smtputf8_needed():
    """A message that needs SMTPUTF8, next hop without it: 5.6.7 bounce,
    nothing sent (never downgraded)."""
    ext = [e for e in DEFAULT_EXTENSIONS if e != "SMTPUTF8"]
    with ScriptedHop(script=Script(extensions=ext)) as hop, \
            daemon(hop.target) as d:
        qid = send(d, "a@example.com", ["b@dest.test"],
                   "Subject: caf\u00e9\r\n\r\nhi\r\n".encode(),
                   mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        wait(lambda: log_count(d, rf"{qid} event=delivery .*status=bounced"),
             20, "bounced")
        check(log_count(d, r"5\.6\.7") >= 1, "5.6.7 in the log")
        check(not hop.completed(), "the message was sent anyway")
        _, per_rcpt = dsn_fields(dsn_of(d))
        check(per_rcpt[0].get("status") == "5.6.7", f"{per_rcpt}")
        check("remote-mta" not in per_rcpt[0],
              f"Remote-MTA for a reason of ours: {per_rcpt}")


def case_bdat_and_data():
    """With CHUNKING the stored bytes go out as BDAT; without it as DATA,
    dot-stuffed. The next hop gets the client's message either way."""
    no_chunking = [e for e in DEFAULT_EXTENSIONS if e != "CHUNKING"]
    for ext, method in ((DEFAULT_EXTENSIONS, "BDAT"), (no_chunking, "DATA")):
        with ScriptedHop(script=Script(extensions=ext)) as hop, \
                daemon(hop.target) as d:
            bodies = [message(10 + i, size=3000 + 40000 * i)
                      for i in range(3)]
            for b in bodies:
                send(d, "a@example.com", ["b@dest.test"], b)
            hop.wait_for(3, 20)
            got = sorted(strip_our_received(t.body) for t in hop.completed())
            check(got == sorted(bodies), f"{method}: bodies differ")
            check(all(t.method == method for t in hop.completed()),
                  f"methods {[t.method for t in hop.completed()]}")


def case_hang_after_data():
    """No reply to the final dot: the data timeout defers the message (the
    log says the reply was lost), the next connection delivers it."""
    with ScriptedHop(script=[Script(dot=HANG), Script()]) as hop, \
            daemon(hop.target) as d:
        qid = send(d, "a@example.com", ["b@dest.test"], message(20))
        wait(lambda: log_count(d, rf"{qid} event=delivery .*status=sent"),
             30, "delivered after the timeout")
        check(log_count(d, rf"{qid} event=reply_lost") == 1,
              "reply_lost logged")
        check(log_count(d, rf"{qid} event=delivery .*status=deferred") == 1,
              "one deferral")


def case_garbage_and_close():
    """Garbage for a reply, then a connection closed mid-data: each is a
    deferral, then the message is delivered, once."""
    scripts = [Script(mail=GARBAGE), Script(close_mid_data=500), Script()]
    with ScriptedHop(script=scripts) as hop, daemon(hop.target) as d:
        body = message(30, size=5000)
        qid = send(d, "a@example.com", ["b@dest.test"], body)
        wait(lambda: log_count(d, rf"{qid} event=delivery .*status=sent"),
             30, "delivered")
        check(log_count(d, rf"{qid} event=delivery .*status=deferred") == 2,
              "two deferrals")
        done = hop.completed()
        check(len(done) == 1 and strip_our_received(done[0].body) == body,
              f"completed: {done}")


def case_bare_lf_from_bdat_relayed_as_data():
    """A body taken by BDAT may hold a bare LF or CR; relayed to a next hop
    without CHUNKING it goes as DATA with those made CRLF (RFC 5321 2.3.8),
    so a receiver ending lines at CRLF only (the scripted hop is one)
    reads the same lines. They went bare, with a '.' after them: that hop
    kept the '.', the message changed."""
    ext = [e for e in DEFAULT_EXTENSIONS if e != "CHUNKING"]
    body = (b"Subject: bare\r\n\r\nline one\n.dot after a bare LF\r\n"
            b"two\r.dot after a bare CR\r\n.\r\nend\n")
    with ScriptedHop(script=Script(extensions=ext)) as hop, \
            daemon(hop.target) as d:
        c = Client("127.0.0.1", d.port)
        c.expect(220)
        c.cmd("EHLO client.test", 250)
        c.cmd("MAIL FROM:<a@example.com>", 250)
        c.cmd("RCPT TO:<bob@dest.test>", 250)
        c.send(b"BDAT %d LAST\r\n" % len(body) + body)
        c.expect(250)
        c.cmd("QUIT", 221)
        hop.wait_for(1, 20)
        t = hop.completed()[0]
        check(t.method == "DATA", f"sent by {t.method}")
        got = strip_our_received(t.body)
        want = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n") \
            .replace(b"\n", b"\r\n")
        check(got == want, f"the next hop got {got!r}, not {want!r}")


def case_dead_destination():
    """Nothing listens: deferred, the next hop is marked dead, and
    acceptance goes on answering 250 meanwhile."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with daemon(f"smtp:127.0.0.1:{port}") as d:
        ids = [send(d, "a@example.com", ["b@dest.test"], message(40 + i))
               for i in range(5)]
        wait(lambda: log_count(d, r"event=destination_dead"), 20,
             "destination_dead")
        for q in ids:
            wait(lambda q=q: log_count(d, rf"{q} event=delivery .*"
                                          r"status=deferred"), 20,
                 f"{q} deferred")
        check(log_count(d, r"status=sent") == 0, "sent to nobody?")
        send(d, "a@example.com", ["b@dest.test"], message(50))


def case_delivery_log_failed():
    """The delivery log's fdatasync fails (a test build's dlog-fail fault):
    no message goes to the next hop while no ATTEMPT can be put on record
    (each is deferred 4.3.0, status and /metrics say delivery stopped);
    after a restart with a working log each is delivered exactly once."""
    mport = free_port()
    with ScriptedHop() as hop, \
            Daemon("--route", f"dest.test={hop.target}", *FAST,
                   "--metrics", f"127.0.0.1:{mport}",
                   domains=("example.com", "dest.test"), delivery=True,
                   env={"FINALDOT_DELIVERY_FAULT": "dlog-fail"}) as d:
        bodies = {}
        for i in range(3):
            body = message(60 + i)
            qid = send(d, "a@example.com", ["bob@dest.test"], body)
            bodies[qid] = body
            wait(lambda q=qid: log_count(d, rf"{q} event=delivery .*"
                                            r"status=deferred"), 20,
                 f"{qid} deferred")
        # Retries come every 1-2 s: give them time to go wrong.
        time.sleep(3)
        check(not hop.completed(),
              f"{len(hop.completed())} messages delivered without an "
              "ATTEMPT on record")
        check(log_count(d, r"event=delivery_stopped") == 1,
              "event=delivery_stopped logged once")
        check(log_count(d, r"status=deferred .*4\.3\.0 delivery log "
                           r"failed") >= 2, "deferred 4.3.0")
        check(json.loads(d.ctl("status", "--json")[1])["delivery"]
              ["log_error"] == 5, "status: delivery.log_error is EIO")
        out = d.ctl("status")[1]
        check("delivery STOPPED: the delivery log failed" in out,
              f"finaldotctl status says delivery stopped: {out}")
        # A hold could not be recorded: refused, with the reason.
        rc, _, err = d.ctl("queue", "hold", "ALL", ok=False)
        check(rc != 0 and "delivery log failed" in err,
              f"queue hold with the log failed: {rc} {err!r}")
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics",
                                    timeout=10) as m:
            check(re.search(r"^finaldot_delivery_log_failed 1$",
                            m.read().decode(), re.M),
                  "finaldot_delivery_log_failed 1")
        d.stop()
        del d.env["FINALDOT_DELIVERY_FAULT"]
        d.start()
        hop.wait_for(len(bodies), 30)
        time.sleep(1)
        done = hop.completed()
        check(len(done) == len(bodies),
              f"{len(done)} transactions for {len(bodies)} messages")
        got = sorted(strip_our_received(t.body) for t in done)
        check(got == sorted(bodies.values()),
              "each message delivered once, byte-identical")


def case_schedule_survives_a_failed_allocation():
    """The queue manager's schedule (a heap) could not grow (out of
    memory; the test seam heap-grow-fail fails its first growth): the
    message it was for is scheduled again within a second and delivered.
    It stayed in no schedule at all, never delivered nor expired."""
    with ScriptedHop() as hop, \
            Daemon("--route", f"dest.test={hop.target}", *FAST,
                   domains=("example.com", "dest.test"), delivery=True,
                   env={"FINALDOT_DELIVERY_FAULT": "heap-grow-fail"}) as d:
        body = message(12)
        qid = send(d, "a@example.com", ["bob@dest.test"], body)
        wait(lambda: log_count(d, rf"{qid} event=delivery .*status=sent"),
             10, "delivered after the failed allocation")
        check(log_count(d, r"event=heap_alloc_failed ") == 1 and
              log_count(d, r"event=heap_recovered rescheduled=1 "
                           r"still_failing=no") == 1,
              "the failure and the recovery are not logged as such")
        check([strip_our_received(t.body) for t in hop.completed()] ==
              [body], "not delivered once, byte-identical")


def case_a_segment_read_short_at_start_is_kept():
    """A read fails while the start's scan walks a segment (the test seam
    scan-read-fail: every read past a segment's first MiB): the messages
    before it are delivered, the segment is never given back to its
    worker (the messages past the failed read are on no queue: a reclaim
    would write a new epoch over them), and the next start, which reads it
    whole, delivers the rest: every message exactly once."""
    with ScriptedHop() as hop, \
            Daemon("--route", f"dest.test={hop.target}", *FAST,
                   "--segment-size", "4M",
                   domains=("example.com", "dest.test")) as d:
        bodies = [message(i, size=8000) for i in range(200)]  # ~1.7 MB
        for b in bodies:
            send(d, "a@example.com", ["bob@dest.test"], b)
        check(d.stop() == 0, "clean stop")
        d.delivery = True
        d.env["FINALDOT_DELIVERY_FAULT"] = "scan-read-fail"
        d.start()
        wait(lambda: log_count(d, r"event=segment_unreadable "), 10,
             "the failed read reported")
        check(log_count(d, r"event=recovered .* segments_bad=[1-9]") == 1,
              "the start counts the segment bad")
        wait(lambda: len(hop.completed()) >= 20, 30, "the first MiB delivered")
        time.sleep(1.0)  # what the first start had is delivered by now
        first = len(hop.completed())
        check(20 <= first < len(bodies),
              f"{first} of {len(bodies)} delivered from a scan read short")
        check(log_count(d, r"event=segment_reclaimed ") == 0,
              "a segment with unscanned messages was given back")
        check(d.stop() == 0, "clean stop")
        del d.env["FINALDOT_DELIVERY_FAULT"]
        d.start()
        hop.wait_for(len(bodies), 30)
        got = sorted(strip_our_received(t.body) for t in hop.completed())
        check(got == sorted(bodies),
              f"{len(got)} deliveries of {len(bodies)} messages: each "
              "once, byte-identical")


def case_part_of_a_message_is_kept_beside_an_unreadable_segment():
    """A crash mid-message (no final dot: never acknowledged) leaves the
    message's first records in the newest segment; at the next start the
    scan cannot read past the first MiB of the full segment before it (the
    test seam scan-read-fail-first: in the worker's first file only). The cut-short message might continue where
    the scan could not read, so its segment is kept (event=segment_kept)
    and never given back to its worker, even once every whole message in
    it is delivered: a new epoch over it would lose the message's first
    records for the start that reads the rest (the queue manager's side of
    the reader's kept_incomplete)."""
    with ScriptedHop() as hop, \
            Daemon("--route", f"dest.test={hop.target}", *FAST,
                   "--segment-size", "2M",
                   domains=("example.com", "dest.test")) as d:
        for i in range(300):  # ~2.4 MB: a full 2 MiB segment, then more
            send(d, "a@example.com", ["bob@dest.test"],
                 message(i, size=8000))
        c = Client("127.0.0.1", d.port)
        c.expect(220)
        c.cmd("EHLO cut.test", 250)
        c.cmd("MAIL FROM:<a@example.com>", 250)
        c.cmd("RCPT TO:<bob@dest.test>", 250)
        c.cmd("DATA", 354)
        c.send(b"Subject: cut short\r\n\r\n" + (b"x" * 998 + b"\r\n") * 600)
        time.sleep(1.0)  # its full batches written
        d.kill9()
        c.close()
        d.delivery = True
        d.env["FINALDOT_DELIVERY_FAULT"] = "scan-read-fail-first"
        d.start()
        wait(lambda: re.search(r"event=segment_kept path=\S*/w00/"
                               r"([0-9a-f]{8})\.seg", d.read_run_log()),
             10, "the cut-short message's segment kept")
        m = re.search(r"event=segment_kept path=\S*/w00/([0-9a-f]{8})\.seg",
                      d.read_run_log())
        kept = m.group(1)
        last, since = -1, time.time()
        while time.time() - since < 1.5:  # deliveries settled
            n = len(hop.completed())
            if n != last:
                last, since = n, time.time()
            time.sleep(0.1)
        check(last > 0, "nothing delivered")
        time.sleep(1.0)
        check(not re.search(rf"event=segment_reclaimed worker=0 "
                            rf"file={kept}", d.read_run_log()),
              f"segment {kept}, holding part of a message cut short, went "
              f"back to its worker ({last} delivered)")


def ehlo(d):
    s = smtplib.SMTP("127.0.0.1", d.port, timeout=10)
    try:
        code, msg = s.ehlo("client.test")
        return msg
    finally:
        s.close()


def case_dsn_passthrough():
    """RET/ENVID/NOTIFY/ORCPT go on to a next hop that offers DSN."""
    with ScriptedHop(script=Script()) as hop, daemon(hop.target) as d:
        if b"DSN" not in ehlo(d):
            fail("finaldot does not advertise DSN")
        send(d, "a@example.com", ["b@dest.test"], message(60),
             mail_options=["RET=HDRS", "ENVID=abc+2Bdef"],
             rcpt_options=["NOTIFY=SUCCESS,FAILURE",
                           "ORCPT=rfc822;b+40dest.test"])
        hop.wait_for(1, 20)
        t = hop.completed()[0]
        mp = [p.upper() for p in t.mail_params]
        check("RET=HDRS" in mp and "ENVID=ABC+2BDEF" in mp, f"MAIL {mp}")
        rp = [p.upper() for p in t.rcpts[0][1]]
        check("NOTIFY=SUCCESS,FAILURE" in rp and
              "ORCPT=RFC822;B+40DEST.TEST" in rp, f"RCPT {rp}")


def case_window_counts_connections():
    """--dest-concurrency 2 and a slow next hop: 60 messages queued at
    once go out in batches over at most 2 connections at a time (the
    window counts connections, each carrying up to 16 pipelined
    transactions), every one exactly once."""
    import threading
    import time
    lock = threading.Lock()
    active, peak = set(), [0]

    def mail(session, addr, params):
        with lock:
            active.add(session.conn)
            peak[0] = max(peak[0], len(active))
        return "250 2.1.0 Ok"

    def dot(session):
        time.sleep(0.02)
        with lock:
            active.discard(session.conn)
        return "250 2.0.0 Ok"

    with ScriptedHop(script=Script(mail=mail, dot=dot)) as hop, \
            Daemon("--route", f"dest.test={hop.target}", *FAST,
                   domains=("example.com", "dest.test")) as d:
        bodies = [message(300 + i, size=600) for i in range(60)]
        for b in bodies:
            send(d, "a@example.com", ["b@dest.test"], b)
        d.stop()
        d.delivery = True
        d.extra += ["--dest-concurrency", "2"]
        d.start()
        got = hop.wait_for(60, timeout=30)
        check(len(got) == 60, f"{len(got)} of 60 delivered")
        check(sorted(strip_our_received(t.body) for t in got) ==
              sorted(bodies), "each message once, intact")
        check(peak[0] <= 2, f"{peak[0]} connections at once, window 2")
        check(peak[0] == 2, "the window's second connection was not used")
        check(max(s.pipelined for s in hop.sessions) > 0,
              "no transaction was pipelined")
        check(len(hop.sessions) <= 4, f"{len(hop.sessions)} connections "
              "for 60 messages: batches not reusing their connection")


def case_idle_thread_at_full_window():
    """--dest-concurrency 1 and a next hop slow on its first message:
    while the window's one connection waits, messages for the same next
    hop are listed and the other delivery threads, idle, time out of
    their wait for work. A timed-out thread must look at the list again,
    not at where it stood before the wait (the job listed meanwhile is
    for a next hop at its window: taking it divided by zero free
    connections, and a stale predecessor corrupted the list). Every
    message arrives once and the daemon stops cleanly."""
    import time
    slow = [True]

    def dot(session):
        if slow[0]:
            slow[0] = False
            time.sleep(2.5)
        return "250 2.0.0 Ok"

    with ScriptedHop(script=Script(dot=dot)) as hop, \
            daemon(hop.target, "--dest-concurrency", "1",
                   "--delivery-threads", "4") as d:
        first = message(400, size=600)
        send(d, "a@example.com", ["b@dest.test"], first)
        deadline = time.time() + 10
        while not hop.transactions and time.time() < deadline:
            time.sleep(0.01)
        check(hop.transactions, "the first message never reached the hop")
        rest = [message(401 + i, size=600) for i in range(3)]
        for b in rest:
            send(d, "a@example.com", ["b@dest.test"], b)
        got = hop.wait_for(4, timeout=20)
        check(d.proc.poll() is None,
              f"finaldot exited ({d.proc.returncode}):\n"
              f"{d.read_log()[-2000:]}")
        check(len(got) == 4, f"{len(got)} of 4 delivered")
        check(sorted(strip_our_received(t.body) for t in got) ==
              sorted([first] + rest), "each message once, intact")
        check(d.stop() == 0, "clean stop")


def case_checkpoint_during_a_retry():
    """A retry in flight when the delivery log is compacted, then kill -9:
    the restart counts it as a possible duplicate. The checkpoint wrote the
    recipient's ATTEMPT before its DEFERRED, and replay closes an open
    attempt at a DEFERRED: a retry (or a DSN) in flight at a checkpoint was
    delivered again after a crash without being counted."""
    def dot(session):
        # first try: 451; the retry: held until the kill
        if session.txn.number == 0:
            return "451 4.3.0 try again"
        return HANG
    with ScriptedHop(script=Script(dot=dot)) as hop, \
            Daemon("--route", f"dest.test={hop.target}", *FAST,
                   "--smtp-data-timeout", "60s", "--dlog-rotate", "16k",
                   # the retry still hangs at the end: not 10 s for it
                   "--shutdown-timeout", "1s",
                   domains=("example.com", "dest.test", "local.test"),
                   delivery=True) as d:
        qid = send(d, "a@example.com", ["bob@dest.test"], message(1))
        # the retry's data at the next hop, its reply held
        hop.wait_for(2, 20)
        check(log_count(d, rf"{qid} event=delivery .*status=deferred") == 1,
              "the first try was not deferred")
        before = log_count(d, r"dlog event=checkpoint")
        # Records enough for a checkpoint (16 KiB) from mail to the
        # default route (a Maildir: fast), while the retry hangs.
        # (the raw log, not log_count's settled one: waiting for the log
        # to stop growing after each message made this case 20 s long)
        n = 0
        while d.read_log().count("dlog event=checkpoint") == before and \
                n < 400:
            send(d, "a@example.com", [f"u{n}@local.test"], message(n, 200))
            n += 1
        check(log_count(d, r"dlog event=checkpoint") > before,
              f"no checkpoint after {n} more messages")
        d.kill9()
        d.start()
        m = re.findall(r"event=queue_rebuilt .*possible_duplicates=(\d+)",
                       d.read_run_log())
        check(m and int(m[-1]) >= 1,
              f"the retry in flight was not counted: {m}")


def case_deleted_while_listed_is_not_bounced():
    """A message the operator deleted while its job waited in its next
    hop's list (the hop at its window) is dropped without a bounce when
    that hop is then found dead. The dead hop's list was deferred whole,
    the deleted recipient too, which an expired message turned into
    EXPIRED and a DSN to its sender."""
    with ScriptedHop(script=Script(greeting=Delay(3, "421 4.3.2 busy"))) \
            as hz:
        d = Daemon("--dest-concurrency", "1", "--queue-lifetime", "2s",
                   "--retry-min", "60s", "--retry-max", "60s",
                   "--route", f"z.test={hz.target}", delivery=True,
                   domains=("example.com", "z.test"))
        with d:
            ids = [send(d, "a@example.com", ["b@z.test"], message(i))
                   for i in range(40)]
            z = ids[-1]  # its job waits in z.test's list
            d.ctl("queue", "delete", z)
            wait(lambda: log_count(d, r"event=destination_dead"), 20,
                 "z.test marked dead")
            # the others, expired with it, are bounced meanwhile
            wait(lambda: log_count(d, r"event=bounce status=sent") >= 30,
                 30, "the other messages bounced")
            bad = [ln for ln in settled_log(d).splitlines()
                   if z in ln and ("status=expired" in ln or
                                   "event=bounce" in ln)]
            check(not bad, f"the deleted message expired or bounced: "
                  f"{bad[:2]}")


def try_send(d, body):
    """One message to bob@dest.test; the final reply's code."""
    s = smtplib.SMTP("127.0.0.1", d.port, timeout=30)
    try:
        s.ehlo("client.test")
        s.mail("a@example.com")
        code, msg = s.rcpt("bob@dest.test")
        check(code == 250, f"RCPT: {code} {msg!r}")
        try:
            code, msg = s.data(body)
        except smtplib.SMTPDataError as e:
            code = e.smtp_code
        s.quit()
        return code
    finally:
        s.close()


def case_a_451_copy_whole_on_disk_is_never_delivered():
    """A batch reaches the file but its flush fails (the spool's fault seam
    fail-flush:3): that message's client gets 451 4.3.0 and will send it
    again, while all of it is on disk. The copy on disk is queued as
    refused (event=not_delivered, DELETED in the delivery log) and goes out
    neither now, nor after a kill -9 and a start whose scan finds it whole,
    nor after a clean restart (from the checkpoint): the messages answered
    250 are delivered, each once, and that one never."""
    with ScriptedHop() as hop, \
            Daemon("--route", f"dest.test={hop.target}", *FAST,
                   domains=("example.com", "dest.test"), delivery=True,
                   env={"FINALDOT_SPOOL_FAULT": "fail-flush:3"}) as d:
        bodies = [message(i) for i in range(5)]
        codes = [try_send(d, b) for b in bodies]
        check(sorted(codes) == [250, 250, 250, 250, 451],
              f"final replies {codes}: one 451 wanted")
        sent = sorted(b for b, c in zip(bodies, codes) if c == 250)
        hop.wait_for(4, 20)
        d.wait_log(r"event=not_delivered ", 10)
        time.sleep(0.5)  # its DELETED is flushed at once: durable by now

        def delivered():
            return sorted(strip_our_received(t.body)
                          for t in hop.completed())
        check(delivered() == sent, "only the 250 copies delivered")
        d.kill9()
        del d.env["FINALDOT_SPOOL_FAULT"]
        d.start()
        d.wait_log(r"event=recovered ", 10)
        time.sleep(2.5)  # a message the scan queued goes out at once
        check(delivered() == sent,
              f"{len(hop.completed())} deliveries after kill -9 and a "
              "start: the 451 copy went out")
        check(d.stop() == 0, "clean stop")
        d.start()
        time.sleep(2.5)
        check(delivered() == sent,
              f"{len(hop.completed())} deliveries after a clean restart: "
              "the checkpoint forgot the 451 copy")


CASES = [case_retry, case_bounce_dsn, case_null_sender_no_dsn,
         case_dsn_reply_lost, case_retry_within_bounds,
         case_suspended_counts_a_deferral,
         case_hold_and_delete_stop_queued_jobs,
         case_busy_next_hop_is_not_dead,
         case_slow_next_hops_leave_a_thread,
         case_expiry_dsn, case_smtputf8_needed, case_bdat_and_data,
         case_bare_lf_from_bdat_relayed_as_data,
         case_hang_after_data, case_garbage_and_close,
         case_dead_destination, case_dsn_passthrough,
         case_window_counts_connections, case_idle_thread_at_full_window,
         case_delivery_log_failed, case_checkpoint_during_a_retry,
         case_expiry_dsn_greylisted, case_dsn_to_a_utf8_sender,
         case_bounce_status_from_the_reply, case_success_dsn,
         case_success_dsn_after_a_restart,
         case_dsn_after_a_restart_names_the_remote_mta,
         case_schedule_survives_a_failed_allocation,
         case_dsn_sent_is_no_possible_duplicate,
         case_a_segment_read_short_at_start_is_kept,
         case_part_of_a_message_is_kept_beside_an_unreadable_segment,
         case_deleted_while_listed_is_not_bounced,
         case_a_451_copy_whole_on_disk_is_never_delivered]

if __name__ == "__main__":
    run_cases(CASES)
