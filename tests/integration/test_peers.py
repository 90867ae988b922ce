#!/usr/bin/python3
"""Self-test of peers.py, each peer driven directly by Python clients:
  - PostfixPeer: 3 messages for alice, bob and a catch-all address each
    arrive exactly once in the right Maildir, byte-exact after the trace
    headers; unknown domain 554, unknown user 550 without the catch-all;
    it listens on its one loopback port only; stopped, nothing is left.
  - DovecotLMTP: known user 250 and unknown user 550 in one transaction,
    one reply per accepted recipient after the data (RFC 2033 4.2), the
    message in alice's Maildir; over TCP and the unix socket; all_users.
  - SmtpSink: a rejection option (-r rcpt) refuses and dumps nothing; the
    plain sink dumps what it got; LMTP over a unix socket.
  - ScriptedHop: 451 then 250 (fail_first), 550 for chosen RCPTs, a hang
    after the data (client timeout), garbage, close and reset mid-DATA,
    chosen extensions and the strict parameter check, BDAT, LMTP
    per-recipient replies, per-connection scripts, pipelining seen,
    byte-exact dot-unstuffing, Delay, stop() while a session hangs.
Exit 0 pass, 77 skip (a program is missing), 1 fail.
"""
import os
import re
import smtplib
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fdtest import Client, check, smtplib_body  # noqa: E402
from peers import (CLOSE, GARBAGE, GARBAGE_BYTES, HANG, RESET,  # noqa: E402
                   Delay, DovecotLMTP, PostfixPeer, Raw, Script,
                   ScriptedHop, SmtpSink, delivered_content, fail_first,
                   listeners)


def body(tag):
    """A message whose lines exercise transparency (RFC 5321 4.5.2)."""
    return (f"Subject: {tag}\r\nMessage-ID: <{tag}@test>\r\n\r\n"
            f"first line of {tag}\r\n.leading dot\r\n..two dots\r\n"
            f".\r\nlast\r\n").encode()


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:][:1] == "Z"


def check_only_loopback(pid, port, tmp, what):
    ls = listeners(pid)
    tcp = {l for l in ls if l[0] == "tcp"}
    check(tcp == {("tcp", "127.0.0.1", port)},
          f"{what} listens on {tcp}, not only 127.0.0.1:{port}")
    outside = [l for l in ls if l[0] == "unix" and
               not l[1].startswith(tmp + "/")]
    check(not outside, f"{what} unix sockets outside its dir: {outside}")


# ------------------------------------------------------------- Postfix

def postfix():
    with PostfixPeer() as p, PostfixPeer(catch_all=False,
                                         users=("dave",)) as q:
        check(p.port != q.port and p.tmp != q.tmp, "two instances differ")
        check(p.target == f"smtp:127.0.0.1:{p.port}", p.target)
        check_only_loopback(p.master_pid, p.port, p.tmp, "postfix")
        plan = [("m0", ["alice@dest.test", "bob@dest.test"]),
                ("m1", ["Alice@Dest.Test"]),
                ("m2", ["bob@dest.test", "zed@dest.test"])]
        with smtplib.SMTP(*p.addr, timeout=20) as s:
            for tag, rcpts in plan:
                refused = s.sendmail("sender@src.test", rcpts, body(tag))
                check(refused == {}, f"{tag} refused {refused}")
            try:
                s.sendmail("sender@src.test", ["x@other.test"], body("rl"))
                check(False, "relay to other.test accepted")
            except smtplib.SMTPRecipientsRefused as e:
                code = e.recipients["x@other.test"][0]
                check(code == 554, f"relay refused with {code}")
        got = p.wait_for(5, 20)
        time.sleep(0.5)  # would a duplicate show up?
        check(len(p.messages()) == 5,
              f"{len(p.messages())} files, want 5:\n{p.log()[-2000:]}")
        want = {"alice@dest.test": ["m0", "m1"],
                "bob@dest.test": ["m0", "m2"], "zed@dest.test": ["m2"]}
        for addr, tags in want.items():
            msgs = p.messages(addr)
            check(len(msgs) == len(tags), f"{addr}: {len(msgs)} messages")
            seen = sorted(delivered_content(m).split(b"\r\n")[0]
                          .decode()[9:] for m in msgs)
            check(seen == tags, f"{addr} got {seen}, want {tags}")
            for m in msgs:
                tag = delivered_content(m).split(b"\r\n")[0].decode()[9:]
                check(delivered_content(m) == smtplib_body(body(tag)),
                      f"{addr} {tag}: {delivered_content(m)!r}")
                check(re.search(rb"(?im)^Delivered-To: " +
                                re.escape(addr.encode()) + rb"$", m),
                      f"Delivered-To {addr}: {m[:300]!r}")
        check(os.path.isdir(os.path.join(p.tmp, "mail", "dest.test",
                                         "alice", "new")),
              "alice has her own Maildir")
        check(p.messages("nobody@dest.test") == [], "no stray deliveries")
        check(got and "status=sent" in p.log(), "maillog in the temp dir")
        # Without the catch-all: unknown users refused at RCPT.
        with smtplib.SMTP(*q.addr, timeout=20) as s:
            r = s.sendmail("s@src.test", ["dave@dest.test", "eve@dest.test"],
                           body("q0"))
            check(list(r) == ["eve@dest.test"] and r["eve@dest.test"][0]
                  == 550, f"unknown user: {r}")
        check(len(q.wait_for(1, 20, "dave@dest.test")) == 1, "dave's mail")
        pids = {p.master_pid, q.master_pid}
        tmps = (p.tmp, q.tmp)
        t0 = time.monotonic()
    # `postfix stop` works: the SIGKILL fallback would take 15 s each.
    check(time.monotonic() - t0 < 10, "postfix stopped in time")
    check(all(gone(pid) for pid in pids), f"postfix masters {pids} gone")
    check(not any(os.path.exists(t) for t in tmps), "postfix dirs removed")


# ------------------------------------------------------------- Dovecot

def dovecot():
    with DovecotLMTP() as d, DovecotLMTP(unix=False, all_users=True) as e:
        check(d.target == f"lmtp:unix:{d.unix_path}", d.target)
        check(e.target == f"lmtp:127.0.0.1:{e.port}", e.target)
        check_only_loopback(d.proc.pid, d.port, d.tmp, "dovecot")
        # One transaction: 250, 550, 250 at RCPT; after the data one reply
        # per accepted recipient, in RCPT order.
        c = Client(*d.addr)
        c.expect(220)
        c.cmd("LHLO client.test", 250)
        c.cmd("MAIL FROM:<s@src.test>", 250)
        c.cmd("RCPT TO:<alice@lmtp.test>", 250)
        c.cmd("RCPT TO:<nosuch@lmtp.test>", 550, r"5\.1\.1")
        c.cmd("RCPT TO:<bob@lmtp.test>", 250)
        c.cmd("DATA", 354)
        c.send(b"Subject: d0\r\n\r\nhello\r\n..dot\r\n.\r\n")
        c.expect(250, "alice@lmtp.test")
        c.expect(250, "bob@lmtp.test")
        c.cmd("QUIT", 221)
        c.close()
        # smtplib over the unix socket
        with smtplib.LMTP(d.unix_path) as s:
            r = s.sendmail("s@src.test", ["alice@lmtp.test", "x@lmtp.test"],
                           b"Subject: d1\r\n\r\nsecond\r\n")
            check(list(r) == ["x@lmtp.test"] and r["x@lmtp.test"][0] == 550,
                  f"unknown user over unix: {r}")
        msgs = d.wait_for("alice@lmtp.test", 2, 10)
        check(len(msgs) == 2, f"alice has {len(msgs)} messages")
        check(delivered_content(msgs[0]) == b"Subject: d0\r\n\r\nhello\r\n"
              b".dot\r\n", f"alice's first: {msgs[0]!r}")
        check(delivered_content(msgs[1]) == b"Subject: d1\r\n\r\nsecond\r\n",
              f"alice's second: {msgs[1]!r}")
        check(len(d.messages("bob@lmtp.test")) == 1, "bob's copy")
        check(d.messages("nosuch@lmtp.test") == [], "nothing for nosuch")
        check(os.path.isdir(os.path.join(d.tmp, "mail", "lmtp.test", "alice",
                                         "new")), "alice's Maildir")
        with smtplib.LMTP(*e.addr) as s:
            r = s.sendmail("s@src.test", ["anyone@else.test"], b"x\r\n")
            check(r == {}, f"all_users accepts anyone: {r}")
        check(len(e.wait_for("anyone@else.test", 1, 10)) == 1, "anyone's")
        check("saved mail to INBOX" in d.log(), "dovecot log in temp dir")
        pids = {d.proc.pid, e.proc.pid}
        tmps = (d.tmp, e.tmp)
    check(all(gone(p) for p in pids), "dovecot masters gone")
    check(not any(os.path.exists(t) for t in tmps), "dovecot dirs removed")


# ------------------------------------------------------------- smtp-sink

def unix_client(path):
    """fdtest.Client over a unix socket."""
    c = Client.__new__(Client)
    c.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.sock.settimeout(10)
    c.sock.connect(path)
    c.buf = b""
    return c


def smtp_sink():
    with SmtpSink(options=["-r", "rcpt"]) as k:
        with smtplib.SMTP(*k.addr, timeout=10) as s:
            try:
                s.sendmail("s@src.test", ["a@b.test"], b"x\r\n")
                check(False, "smtp-sink -r rcpt accepted a recipient")
            except smtplib.SMTPRecipientsRefused as e:
                check(e.recipients["a@b.test"][0] == 450,
                      f"-r rcpt: {e.recipients}")
        time.sleep(0.2)
        check(k.count() == 0 and k.messages() == [], "nothing dumped")
        check("rcpt TO:<a@b.test>" in k.log(), f"verbose log: {k.log()}")
    with SmtpSink() as k, SmtpSink(lmtp=True, unix=True,
                                   options=["-f", "."]) as u:
        with smtplib.SMTP(*k.addr, timeout=10) as s:
            s.sendmail("s@src.test", ["a@b.test", "c@d.test"], body("k0"))
        dumped = k.wait_for(1, 10)
        check(len(dumped) == 1, f"{len(dumped)} dumps")
        t = k.transactions()[0]
        check(t["mail"] == "<s@src.test>" and
              t["rcpts"] == ["<a@b.test>", "<c@d.test>"], f"dump: {t}")
        check(t["body"] == smtplib_body(body("k0")), f"body: {t['body']!r}")
        # LMTP over a unix socket, "." rejected with 5xx per recipient.
        check(u.target == f"lmtp:unix:{u.unix_path}", u.target)
        c = unix_client(u.unix_path)
        c.expect(220)
        c.cmd("LHLO c.test", 250)
        c.cmd("MAIL FROM:<s@src.test>", 250)
        c.cmd("RCPT TO:<a@b.test>", 250)
        c.cmd("RCPT TO:<c@d.test>", 250)
        c.cmd("DATA", 354)
        c.send("Subject: u\r\n\r\nx\r\n.\r\n")
        c.expect(500)
        c.expect(500)
        c.close()
        check(u.count() == 1, f"sink saw the dot: {u.count()}")


# ------------------------------------------------------------- ScriptedHop

def send(hop, rcpts, data, **kw):
    with smtplib.SMTP(*hop.addr, timeout=kw.get("timeout", 10)) as s:
        return s.sendmail("s@src.test", rcpts, data)


def hop_fail_first():
    with ScriptedHop(script=Script(dot=fail_first(2))) as hop:
        codes = []
        for i in range(3):
            try:
                send(hop, ["a@x.test"], body(f"f{i}"))
                codes.append(250)
            except smtplib.SMTPDataError as e:
                codes.append(e.smtp_code)
        check(codes == [451, 451, 250], f"fail_first(2): {codes}")
        done = hop.wait_for(3, 5)
        check([t.number for t in done] == [0, 1, 2], f"numbers {done}")
        check(done[0].replies[0].startswith("451 4.3.0") and
              done[2].replies[0].startswith("250 "), f"replies {done}")
        check(hop.connections == 3, f"{hop.connections} connections")
        check(all(t.body == smtplib_body(body(f"f{i}"))
                  for i, t in enumerate(done)), "bodies unstuffed exactly")


def hop_rcpt_rejects():
    script = Script(rcpt={"Bad@X.test": "550 5.1.1 no such user"})
    with ScriptedHop(script=script) as hop:
        r = send(hop, ["good@x.test", "bad@x.test"],
                 b"Subject: r\r\n\r\nr\r\n")
        check(list(r) == ["bad@x.test"] and r["bad@x.test"][0] == 550,
              f"refused {r}")
        t = hop.wait_for(1, 5)[0]
        check(t.rcpts == [("good@x.test", [])], f"accepted {t.rcpts}")
        check(t.rejected == [("bad@x.test", [], 550)], f"rej {t.rejected}")
        check(t.mail_from == "s@src.test" and t.method == "DATA", repr(t))


def hop_hang():
    with ScriptedHop(script=[Script(dot=HANG), Script(data=HANG)]) as hop:
        t0 = time.monotonic()
        try:
            send(hop, ["a@x.test"], b"Subject: h\r\n\r\nh\r\n", timeout=1)
            check(False, "a reply came from a hanging hop")
        except (socket.timeout, TimeoutError, smtplib.SMTPServerDisconnected):
            pass
        check(time.monotonic() - t0 < 5, "the client timed out")
        t = hop.wait_for(1, 5)[0]
        check(t.complete and t.replies == [], f"hung after data: {t}")
        c = Client(*hop.addr, timeout=1)
        c.expect(220)
        c.cmd("EHLO c.test", 250)
        c.cmd("MAIL FROM:<s@x.test>", 250)
        c.cmd("RCPT TO:<a@x.test>", 250)
        c.send("DATA\r\n")
        try:
            c.reply()
            check(False, "354 from data=HANG")
        except (socket.timeout, TimeoutError):
            pass
        # stop() ends the hung session: the client sees the close.
        t0 = time.monotonic()
        hop.stop()
        check(time.monotonic() - t0 < 3, "stop() with a hung session")
        check(c.closed(3), "hung client sees EOF at stop()")
        c.close()


def hop_garbage():
    with ScriptedHop(script=[Script(dot=GARBAGE), Script(greeting=GARBAGE),
                             Script(mail=Raw(b"25"))]) as hop:
        c = Client(*hop.addr)
        c.expect(220)
        c.cmd("EHLO c.test", 250)
        c.cmd("MAIL FROM:<s@x.test>", 250)
        c.cmd("RCPT TO:<a@x.test>", 250)
        c.cmd("DATA", 354)
        c.send("Subject: g\r\n\r\ng\r\n.\r\n")
        c.sock.settimeout(5)
        got = b""
        while not got.endswith(b"\r\n"):
            got += c.sock.recv(100)
        check(got == GARBAGE_BYTES, f"garbage: {got!r}")
        c.cmd("QUIT", 221)  # the session goes on after garbage
        c.close()
        c = Client(*hop.addr)
        check(c.sock.recv(100) == GARBAGE_BYTES, "garbage greeting")
        c.close()
        c = Client(*hop.addr)
        c.expect(220)
        c.cmd("HELO c.test", 250)
        c.send("MAIL FROM:<s@x.test>\r\n")
        c.sock.settimeout(0.5)
        partial = c.sock.recv(100)
        check(partial == b"25", f"Raw partial reply: {partial!r}")
        c.close()
        t = hop.wait_for(1, 5)
        check(len(t) == 1 and t[0].replies == [GARBAGE_BYTES.decode(
            "utf-8", "replace").rstrip("\r\n")], f"recorded {t}")


def hop_mid_data():
    script = [Script(close_mid_data=100), Script(close_mid_data=10,
                                                 mid_data=RESET),
              Script(close_mid_data=50)]
    with ScriptedHop(script=script) as hop:
        line = b"0123456789012345678901234567890123456789\r\n"
        for n in range(2):
            c = Client(*hop.addr)
            c.expect(220)
            c.cmd("EHLO c.test", 250)
            c.cmd("MAIL FROM:<s@x.test>", 250)
            c.cmd("RCPT TO:<a@x.test>", 250)
            c.cmd("DATA", 354)
            try:
                c.send(b"Subject: m\r\n\r\n" + line * 10)
            except OSError:
                pass
            if n == 0:
                check(c.closed(5), "closed mid-DATA")
                check(c.buf == b"", f"no reply before the close: {c.buf!r}")
            else:
                try:
                    c.sock.settimeout(5)
                    data = c.sock.recv(100)
                    check(False, f"no RST, got {data!r}")
                except ConnectionResetError:
                    pass
            c.close()
        # BDAT: the cut comes inside a chunk.
        c = Client(*hop.addr)
        c.expect(220)
        c.cmd("EHLO c.test", 250, "CHUNKING")
        c.cmd("MAIL FROM:<s@x.test>", 250)
        c.cmd("RCPT TO:<a@x.test>", 250)
        c.send(b"BDAT 200 LAST\r\n" + b"b" * 80)
        check(c.closed(5), "closed mid-BDAT")
        c.close()
        ts = hop.transactions
        check(len(ts) == 3 and not any(t.complete for t in ts),
              f"three incomplete transactions: {ts}")
        check(100 <= len(ts[0].body) < 100 + len(line) and
              ts[0].body.startswith(b"Subject: m\r\n\r\n0123"),
              f"body up to the cut: {ts[0].body!r}")
        check(ts[2].method == "BDAT" and ts[2].body == b"b" * 50,
              f"BDAT cut: {ts[2]}")


def hop_extensions():
    plain = Script(extensions=["8BITMIME"], name="plain.test")
    with ScriptedHop(script=[plain, Script()]) as hop:
        with smtplib.SMTP(*hop.addr, timeout=10) as s:
            s.ehlo("c.test")
            check(s.has_extn("8bitmime") and not s.has_extn("pipelining")
                  and not s.has_extn("chunking") and not
                  s.has_extn("smtputf8") and not s.has_extn("dsn"),
                  f"advertised {s.esmtp_features}")
            # (smtplib itself refuses SMTPUTF8 when not advertised)
            code, _ = s.docmd("MAIL FROM:<s@x.test> SMTPUTF8")
            check(code == 555, f"SMTPUTF8 not advertised: {code}")
            s.send("MAIL FROM:<s\u00e9@x.test>\r\n".encode())
            code, _ = s.getreply()
            check(code == 553, f"non-ASCII without SMTPUTF8: {code}")
            code, _ = s.mail("s@x.test", ["RET=HDRS"])
            check(code == 555, f"DSN not advertised: {code}")
            code, _ = s.mail("s@x.test", ["BODY=8BITMIME"])
            check(code == 250, f"BODY=8BITMIME: {code}")
            code, _ = s.docmd("BDAT 3 LAST")
            check(code == 500, f"BDAT without CHUNKING: {code}")
        with smtplib.SMTP(*hop.addr, timeout=10) as s:
            s.ehlo("c.test")
            for ext in ("pipelining", "size", "8bitmime", "smtputf8", "dsn",
                        "chunking", "enhancedstatuscodes"):
                check(s.has_extn(ext), f"default advertises {ext}")
            code, _ = s.mail("s@x.test", ["SIZE=20000000"])
            check(code == 552, f"SIZE over the limit: {code}")
            code, _ = s.mail("s\u00e9@x.test", ["SMTPUTF8", "RET=FULL",
                                               "SIZE=10"])
            check(code == 250, f"SMTPUTF8 + DSN + SIZE: {code}")
            code, _ = s.rcpt("\u00fc@x.test", ["NOTIFY=NEVER",
                                               "ORCPT=rfc822;u@x.test"])
            check(code == 250, f"RCPT with DSN params: {code}")
            # BDAT in two chunks
            s.send(b"BDAT 5\r\nhelloBDAT 8 LAST\r\n world\r\n")
            check(s.getreply()[0] == 250 and s.getreply()[0] == 250,
                  "BDAT replies")
        t = hop.wait_for(1, 5)[0]
        check(t.method == "BDAT" and t.body == b"hello world\r\n" and
              t.chunks == [5, 8], f"BDAT recorded: {t}")
        check(t.mail_from == "s\u00e9@x.test" and t.mail_params ==
              ["SMTPUTF8", "RET=FULL", "SIZE=10"], f"MAIL: {t}")
        check(t.rcpts == [("\u00fc@x.test", ["NOTIFY=NEVER",
                                            "ORCPT=rfc822;u@x.test"])],
              f"RCPT params: {t.rcpts}")
        sess = hop.sessions
        check(sess[0].helo == "c.test" and "BDAT 3 LAST" in
              sess[0].commands, f"session 0: {sess[0].commands}")


def hop_lmtp():
    script = Script(dot={"b@x.test": "452 4.2.2 <b@x.test> over quota",
                         "c@x.test": "550 5.7.1 <c@x.test> refused"})
    with ScriptedHop(lmtp=True, script=script) as hop, \
            ScriptedHop(lmtp=True, unix=True,
                        script=Script(dot={"b@x.test": CLOSE})) as uhop:
        check(hop.target == f"lmtp:127.0.0.1:{hop.port}", hop.target)
        c = Client(*hop.addr)
        c.expect(220)
        c.cmd("EHLO c.test", 500)
        c.cmd("LHLO c.test", 250)
        # pipelined (RFC 2920): all in one write
        c.send("MAIL FROM:<s@x.test>\r\nRCPT TO:<a@x.test>\r\n"
               "RCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n")
        for code in (250, 250, 250, 250, 354):
            c.expect(code)
        c.send("Subject: l\r\n\r\nl\r\n.\r\n")
        c.expect(250, "<a@x.test>")
        c.expect(452, r"4\.2\.2")
        c.expect(550, r"5\.7\.1")
        c.cmd("QUIT", 221)
        c.close()
        t = hop.wait_for(1, 5)[0]
        check(len(t.replies) == 3 and t.replies[1].startswith("452"),
              f"LMTP replies {t.replies}")
        check(hop.sessions[0].pipelined >= 1,
              f"pipelining seen: {hop.sessions[0].pipelined}")
        # unix socket; the connection drops after the first recipient's
        # reply.
        check(uhop.target == f"lmtp:unix:{uhop.unix_path}", uhop.target)
        with smtplib.LMTP(uhop.unix_path) as s:
            s.sock.settimeout(10)
            s.ehlo_or_helo_if_needed()
            s.mail("s@x.test")
            s.rcpt("a@x.test")
            s.rcpt("b@x.test")
            s.putcmd("DATA")
            check(s.getreply()[0] == 354, "354")
            s.send(b"x\r\n.\r\n")
            check(s.getreply()[0] == 250, "first recipient's 250")
            try:
                s.getreply()
                check(False, "second reply after CLOSE")
            except smtplib.SMTPServerDisconnected:
                pass
        u = uhop.wait_for(1, 5)[0]
        check(len(u.replies) == 1, f"one reply before the cut: {u.replies}")
    check(not os.path.exists(uhop.unix_path), "unix hop dir removed")


def hop_misc():
    # per-connection scripts, Delay
    script = [Script(greeting="421 4.3.2 busy, come back later"),
              Script(mail=Delay(0.3, "250 2.1.0 slow Ok"))]
    with ScriptedHop(script=script) as hop:
        try:
            send(hop, ["a@x.test"], b"x\r\n")
            check(False, "421 greeting accepted")
        except smtplib.SMTPConnectError as e:
            check(e.smtp_code == 421, f"greeting {e}")
        t0 = time.monotonic()
        send(hop, ["a@x.test"], b"x\r\n")
        check(time.monotonic() - t0 >= 0.3, "Delay delayed")
        check(hop.connections == 2 and len(hop.wait_for(1, 5)) == 1,
              "two connections, one message")
        check("421 4.3.2 busy" in hop.log(), "transcript")
    # a callable script
    with ScriptedHop(script=lambda n: Script(name=f"conn{n}.test")) as hop:
        for n in range(2):
            with smtplib.SMTP(*hop.addr, timeout=10) as s:
                code, msg = s.ehlo("c.test")
                check(msg.startswith(f"conn{n}.test".encode()),
                      f"script per connection: {msg!r}")
    # IPv6 loopback, if the machine has it
    try:
        hop = ScriptedHop(host="::1")
    except OSError:
        return
    with hop:
        check(hop.target == f"smtp:[::1]:{hop.port}", hop.target)
        with smtplib.SMTP("::1", hop.port, timeout=10) as s:
            s.sendmail("s@x.test", ["a@x.test"], b"six\r\n")
        check(hop.wait_for(1, 5)[0].body == b"six\r\n", "IPv6 body")


def main():
    t0 = time.monotonic()
    hop_fail_first()
    hop_rcpt_rejects()
    hop_hang()
    hop_garbage()
    hop_mid_data()
    hop_extensions()
    hop_lmtp()
    hop_misc()
    smtp_sink()
    dovecot()
    postfix()
    print(f"ok: scripted hop faults, smtp-sink, dovecot LMTP, private "
          f"postfix ({time.monotonic() - t0:.1f}s)")


main()
