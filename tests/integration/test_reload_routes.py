#!/usr/bin/python3
"""Routes, recipient checks and limits across a reload (SIGHUP): what an
operator changes takes effect, or the reload is refused whole.
  - verify_recipients: a cached answer is the next hop's; a route moved to
    another hop asks the new one (the old hop's 550 5.1.1 was answered
    for up to 3 h to a user the new hop has);
  - a 550 5.1.7 or 5.1.8 to the probe is about its (null) sender: no
    "user unknown" is cached from it;
  - routes without a relay: a queued message whose domain a reload took
    away (with its route) stays deferred, "no route"; it went into the
    first-run default ./var/maildir under the daemon's working directory;
  - recipients: a reload to another file answers from it; adding or
    removing the table (or verify_recipients) is refused, said so (it was
    ignored silently);
  - a duration too large for the clocks (idle_timeout of 2^64 ms) is a
    configuration error; it wrapped to 384 us and ended every session.
Exits 0 pass, 1 fail."""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import FINALDOT, Daemon, check, free_port  # noqa: E402
from delivtest import (send, message, maildir_files, run_cases,  # noqa
                       rcpt, until, reload)
from peers import ScriptedHop, Script  # noqa: E402


def tmpdir():
    """A directory for this test's files, gone when it ends."""
    d = tempfile.mkdtemp(prefix="fdreload-")
    atexit.register(shutil.rmtree, d, True)
    return d


def case_verify_cache_follows_the_route():
    tmp = tmpdir()
    conf = os.path.join(tmp, "finaldot.conf")
    with ScriptedHop(script=Script(
            rcpt={"bob@example.com": "550 5.1.1 no such user"})) as old, \
            ScriptedHop(script=Script()) as new:
        with open(conf, "w") as f:
            f.write(f"verify_recipients = on\n"
                    f"route = example.com={old.target}\n")
        with Daemon("--config", conf, domains=("example.com",)) as d:
            first = until(d.port, "bob@example.com", 550)
            check(first[0] == 550, f"the old hop's refusal: {first}")
            reload(d, conf, f"verify_recipients = on\n"
                   f"route = example.com={new.target}\n")
            got = until(d.port, "bob@example.com", 250)
            check(got[0] == 250, f"after the route moved to a hop that has "
                  f"bob: {got} (the old hop's answer, cached)")
            check(new.sessions, "the new hop was never asked")


def case_sender_side_51x_is_no_unknown_user():
    rej = "550 5.1.8 <>: Sender address rejected: Domain not found"
    with ScriptedHop(script=Script(rcpt=lambda s, a, p: rej)) as hop, \
            Daemon("--verify-recipients", "on", "--route",
                   f"example.com={hop.target}",
                   domains=("example.com",)) as d:
        rcpt(d.port, "realuser@example.com")
        d.wait_log(r"event=probe rcpt=realuser@example\.com", 15)
        code, msg = rcpt(d.port, "realuser@example.com")
        check(code == 450, f"after a 5.1.8 to the probe's sender: {code} "
              f"{msg} (want 450: the user is not known to be unknown)")


def case_no_route_stays_deferred_after_a_reload():
    tmp = tmpdir()
    cwd, md = os.path.join(tmp, "cwd"), os.path.join(tmp, "md")
    os.makedirs(cwd)
    os.makedirs(md)
    conf = os.path.join(tmp, "finaldot.conf")
    down = free_port()
    keep = (f"accept_domain = a.test\nroute = a.test=maildir:{md}\n"
            f"retry_min = 1s\nretry_max = 2s\n")
    with open(conf, "w") as f:
        f.write(keep + f"accept_domain = b.test\n"
                f"route = b.test=smtp:127.0.0.1:{down}\n")
    with Daemon("--config", conf, delivery=True, relay=False, domains=(),
                cwd=cwd) as d:
        q = send(d, "s@client.test", ["u@b.test"], message(1, 300, "for b"))
        d.wait_log(rf"{q} .*status=deferred", 20)
        reload(d, conf, keep)
        deadline = time.time() + 15
        while "no route" not in d.ctl("queue", "show", q)[1] and \
                time.time() < deadline:
            time.sleep(0.2)
        out = d.ctl("queue", "show", q)[1]
        check("4.3.5 no route" in out, f"not deferred for want of a "
              f"route:\n{out}")
        d.wait_log(rf"{q} event=delivery to=<u@b.test> route=none .*"
                   rf"status=deferred reply=\"4.3.5 no route", 10)
        got = maildir_files(os.path.join(cwd, "var", "maildir"), "u@b.test")
        check(not got, "mail for a domain with no route (and no relay) "
              "went to the first-run ./var/maildir")


def case_recipients_file_changes_on_reload():
    tmp = tmpdir()
    ua, ub = os.path.join(tmp, "a.txt"), os.path.join(tmp, "b.txt")
    with open(ua, "w") as f:
        f.write("old@example.com\n")
    with open(ub, "w") as f:
        f.write("new@example.com\n")
    conf = os.path.join(tmp, "finaldot.conf")
    with open(conf, "w") as f:
        f.write(f"accept_domain = example.com\nrecipients = {ua}\n")
    with Daemon("--config", conf, domains=()) as d:
        reload(d, conf, f"accept_domain = example.com\nrecipients = {ub}\n")
        time.sleep(0.3)
        got = (rcpt(d.port, "old@example.com")[0],
               rcpt(d.port, "new@example.com")[0])
        check(got == (550, 250), f"another recipients file: old@, new@ "
              f"answered {got} (the old file's)")
    with open(conf, "w") as f:
        f.write("accept_domain = example.com\n")
    with Daemon("--config", conf, domains=()) as d:
        reload(d, conf, f"accept_domain = example.com\nrecipients = {ub}\n",
               logged=r"event=reload_failed .*needs a restart")
        check(rcpt(d.port, "nosuchuser@example.com")[0] == 250,
              "the refused reload changed what RCPT answers")


def case_huge_duration_refused():
    r = subprocess.run([FINALDOT, "--check-config", "--spool", "/nonexistent",
                        "--idle-timeout", "18446744073709552ms"],
                       capture_output=True, text=True, timeout=30)
    check(r.returncode != 0 and "idle_timeout" in r.stderr,
          f"an idle_timeout of 2^64 ms: exit {r.returncode} {r.stderr!r}")
    # the largest one that fits is taken
    r = subprocess.run([FINALDOT, "--check-config", "--spool", "/nonexistent",
                        "--idle-timeout", "18446744073709ms"],
                       capture_output=True, text=True, timeout=30)
    check(r.returncode == 0, f"584 years: exit {r.returncode} {r.stderr!r}")


CASES = [case_verify_cache_follows_the_route,
         case_sender_side_51x_is_no_unknown_user,
         case_no_route_stays_deferred_after_a_reload,
         case_recipients_file_changes_on_reload,
         case_huge_duration_refused]

if __name__ == "__main__":
    run_cases(CASES)
