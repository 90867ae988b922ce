#!/usr/bin/python3
"""SIGHUP re-reads the configuration for delivery (routes, retries): a
route changed in the config file takes effect for new messages and for
deferred ones at their next try, without dropping a session that is open
across the reload; a file with a bad line is refused with that line and the
previous configuration stays."""
import os
import re
import signal
import smtplib
import time

from delivtest import message, send, wait
from fdtest import Daemon, check, free_port


def in_spool(d, subject):
    return any(f"Subject: {subject}".encode() in raw
               for raw in d.export().values())


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


main()
