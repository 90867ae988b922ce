#!/usr/bin/python3
"""SIGHUP re-reads the configuration for delivery (routes, retries): a
route changed in the config file takes effect for new messages and for
deferred ones at their next try, without dropping a session that is open
across the reload; a file with a bad line is refused with that line and the
previous configuration stays."""
import os
import re
import shutil
import signal
import smtplib
import tempfile
import time

from delivtest import message, send, wait
from fdtest import Daemon, check, free_port


def in_spool(d, subject):
    return any(f"Subject: {subject}".encode() in raw
               for raw in d.export().values())


def policy():
    """The SMTP policy reloads too: an accepted domain added, the message
    size lowered, for the next commands of open and new sessions."""
    tmp = tempfile.mkdtemp(prefix="fdreload-")
    conf = os.path.join(tmp, "p.conf")
    with open(conf, "w") as f:
        f.write("accept_domain = example.com\nmax_message_size = 10M\n")
    with Daemon("--config", conf, domains=()) as d:
        c = d.connect()
        c.expect(220)
        c.cmd("EHLO client.test", 250)
        c.cmd("MAIL FROM:<a@client.test>", 250)
        c.cmd("RCPT TO:<u@new.test>", 550, r"5\.7\.1")
        with open(conf, "w") as f:
            f.write("accept_domain = example.com\naccept_domain = new.test\n"
                    "max_message_size = 1M\n")
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_log(r"event=policy_reloaded domains=2 "
                   r"max_message_size=1048576", 10)
        # The open session: the next RCPT sees the new domain.
        c.cmd("RCPT TO:<u@new.test>", 250)
        c.cmd("RSET", 250)
        c.cmd("MAIL FROM:<a@client.test> SIZE=2000000", 552, r"5\.3\.4")
        c.cmd("QUIT", 221)
        c.close()
        lines = smtplib.SMTP("127.0.0.1", d.port, timeout=30)
        code, msg = lines.ehlo("client.test")
        check(b"SIZE 1048576" in msg, f"EHLO after the reload: {msg!r}")
        lines.quit()
    shutil.rmtree(tmp, ignore_errors=True)
    print("ok: reload applies accepted domains and the size limit to open "
          "and new sessions")


def timers():
    """The idle timeout and the greeting delay reload too: a session open
    across the reload meets the new (shorter) idle timeout, counted from
    its last command; a new connection waits for the new greeting delay."""
    tmp = tempfile.mkdtemp(prefix="fdreload-")
    conf = os.path.join(tmp, "t.conf")
    with open(conf, "w") as f:
        f.write("accept_domain = example.com\nidle_timeout = 10m\n")
    with Daemon("--config", conf, domains=()) as d:
        c = d.connect(timeout=30)
        c.expect(220)
        c.cmd("EHLO client.test", 250)
        with open(conf, "w") as f:
            f.write("accept_domain = example.com\nidle_timeout = 2s\n"
                    "greet_delay = 1500ms\n")
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_log(r"event=policy_reloaded .*idle_timeout_ms=2000 "
                   r"greet_delay_ms=1500", 10)
        t0 = time.time()
        n = d.connect(timeout=30)
        n.expect(220)
        waited = time.time() - t0
        check(1.3 < waited < 10, f"greeted after {waited:.2f} s, not 1.5")
        n.cmd("QUIT", 221)
        c.expect(421, r"4\.4\.2")
        gone = time.time() - t0
        check(gone < 10, f"the open session timed out after {gone:.1f} s")
    shutil.rmtree(tmp, ignore_errors=True)
    print("ok: reload applies the idle timeout to open sessions and the "
          "greeting delay to new ones")


def bounce_domain():
    """A domain accepted by a reload: a bounce to a sender there is routed
    like mail to it (before, with no bounce relay, it was dropped)."""
    from delivtest import maildir_files
    tmp = tempfile.mkdtemp(prefix="fdreload-")
    users = os.path.join(tmp, "users")
    with open(users, "w") as f:
        f.write("known@example.com\n")
    conf = os.path.join(tmp, "a.conf")
    with Daemon("--recipients", users) as b:
        def write(extra):
            with open(conf, "w") as f:
                f.write(f"route = example.com=smtp:127.0.0.1:{b.port}\n"
                        f"accept_domain = example.com\n{extra}")
        write("")
        with Daemon("--config", conf, delivery=True, domains=()) as a:
            q1 = send(a, "s@new.test", ["unknown@example.com"],
                      message(1, 300, "bounce before"))
            a.wait_log(rf"{q1} event=bounce_dropped", 20)
            os.makedirs(f"{tmp}/md", exist_ok=True)
            write(f"accept_domain = new.test\n"
                  f"route = new.test=maildir:{tmp}/md\n")
            os.kill(a.proc.pid, signal.SIGHUP)
            a.wait_log(r"event=reloaded route_gen=1 ", 10)
            q2 = send(a, "s@new.test", ["unknown@example.com"],
                      message(2, 300, "bounce after"))
            a.wait_log(rf"{q2} event=bounce status=sent to=<s@new\.test>",
                       20)
            check(maildir_files(f"{tmp}/md", "s@new.test"),
                  "the DSN is not in new.test's Maildir")
    shutil.rmtree(tmp, ignore_errors=True)
    print("ok: a domain accepted by a reload gets its bounces")


def main():
    down = free_port()
    with Daemon() as b1, Daemon() as b2:
        conf = os.path.join(b1.tmp, "a.conf")

        def write(route, extra=""):
            with open(conf, "w") as f:
                f.write(f"route = example.com={route}\n"
                        f"retry_min = 1s\nretry_max = 1s\n{extra}")

        write(f"smtp:127.0.0.1:{b1.port}")
        with Daemon("--config", conf, delivery=True) as a:
            send(a, "s@client.test", ["u@example.com"],
                 message(1, 500, "before"))
            wait(lambda: in_spool(b1, "before 1"), 20, "B1 got 'before'")
            # A session open across the reload.
            held = smtplib.SMTP("127.0.0.1", a.port, timeout=30)
            held.ehlo("client.test")
            write(f"smtp:127.0.0.1:{down}")
            os.kill(a.proc.pid, signal.SIGHUP)
            a.wait_log(r"event=reloaded route_gen=1 ", 10)
            qid = send(a, "s@client.test", ["u@example.com"],
                       message(2, 500, "deferred"))
            a.wait_log(rf"{qid} event=delivery .*route=smtp:127\.0\.0\.1:"
                       rf"{down} .*status=deferred", 20)
            write(f"smtp:127.0.0.1:{b2.port}")
            os.kill(a.proc.pid, signal.SIGHUP)
            a.wait_log(r"event=reloaded route_gen=2 ", 10)
            wait(lambda: in_spool(b2, "deferred 2"), 20,
                 "the deferred message re-routed to B2")
            # The session from before both reloads still works.
            held.mail("s@client.test")
            held.rcpt("u@example.com")
            code, _ = held.data(message(3, 500, "held session"))
            check(code == 250, f"open session after reloads: {code}")
            held.quit()
            wait(lambda: in_spool(b2, "held session 3"), 20,
                 "the open session's message at B2")
            # A bad line: refused with its line, B2 stays the route.
            write(f"smtp:127.0.0.1:{b1.port}", "route = bad=smtp:x:0\n")
            os.kill(a.proc.pid, signal.SIGHUP)
            a.wait_log(r"event=reload_failed kept=previous error=\".*"
                       r"(a\.conf|bad port)", 10)
            send(a, "s@client.test", ["u@example.com"],
                 message(4, 500, "after bad"))
            wait(lambda: in_spool(b2, "after bad 4"), 20,
                 "a bad reload kept B2")
            check(not in_spool(b1, "after bad 4"), "went to B1")
            check(not re.search(r"event=signal|event=exit",
                                a.read_run_log()), "the daemon stopped")
    print("ok: reload re-routes new and deferred mail, keeps open sessions; "
          "a bad file is refused and changes nothing")
    policy()
    timers()
    bounce_domain()


main()
