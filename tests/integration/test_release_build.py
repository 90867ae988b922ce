#!/usr/bin/python3
"""Issue 10 section 4: a release build carries no test seam.

A binary built with the default options (-Dfault_injection=false) must not
read FINALDOT_SPOOL_FAULT at all: with every fault spec in its environment
it starts, logs no event=fault_injection, and answers 250 to a message
that is then in its spool. Its --help does not mention the variable; a
test build's --help does (that line is how the two are told apart). Nor
does the binary hold the name of any seam's variable
(FINALDOT_SPOOL_FAULT, FINALDOT_DELIVERY_FAULT, FINALDOT_SOCK_FAULT,
FINALDOT_PORT_FAULT).

Which binary: this build's own finaldot when it was configured without the
seam (FINALDOT_SEAM=off); otherwise FINALDOT_RELEASE, the default-options
binary tools/test builds (build-test-release). Neither: skipped."""
import os
import subprocess
import tempfile

import fdtest
from fdtest import Daemon, check, fail, queued_id, skip

SPECS = ("fail-write", "fail-write:1", "fail-once:1", "enospc")


def help_text(binary):
    r = subprocess.run([binary, "--help"], capture_output=True, timeout=30)
    check(r.returncode == 0, f"{binary} --help exited {r.returncode}")
    return r.stdout.decode()


def one_message(d, n):
    c = d.connect()
    c.expect(220)
    c.cmd("EHLO rel.test", 250)
    c.cmd(f"MAIL FROM:<r{n}@rel.test>", 250)
    c.cmd("RCPT TO:<u@example.com>", 250)
    c.cmd("DATA", 354)
    c.send(f"Subject: release {n}\r\n\r\nbody\r\n.\r\n")
    mid = queued_id(c.expect(250))
    c.cmd("QUIT", 221)
    c.close()
    return mid


def main():
    seam = os.environ.get("FINALDOT_SEAM", "on")
    own = fdtest.FINALDOT
    if seam == "off":
        binary = own
    else:
        # This build obeys the variable: its help says so.
        check("FINALDOT_SPOOL_FAULT" in help_text(own),
              "a test build's --help names FINALDOT_SPOOL_FAULT")
        binary = os.environ.get("FINALDOT_RELEASE")
        if not binary:
            skip("this build has the fault seam and FINALDOT_RELEASE names "
                 "no default-options binary (tools/test builds one)")
        if not os.access(binary, os.X_OK):
            fail(f"FINALDOT_RELEASE={binary} is not an executable: the "
                 f"default-options build failed")
    check("FINALDOT_SPOOL_FAULT" not in help_text(binary),
          f"{binary} --help mentions FINALDOT_SPOOL_FAULT: built with "
          f"the seam")
    # The delivery mutants (FINALDOT_DELIVERY_FAULT: a Maildir file or
    # directory not synced, the delivery log not synced) cannot be seen
    # from outside without a power cut; a release build must not even
    # hold the variable's name, which only the seam's getenv() uses.
    with open(binary, "rb") as f:
        image = f.read()
    for name in (b"FINALDOT_DELIVERY_FAULT", b"FINALDOT_SPOOL_FAULT",
                 b"FINALDOT_SOCK_FAULT", b"FINALDOT_PORT_FAULT"):
        check(name not in image,
              f"{binary} holds {name.decode()}: a seam is compiled in")
    if seam != "off":
        with open(own, "rb") as f:
            own_image = f.read()
        for name in (b"FINALDOT_DELIVERY_FAULT", b"FINALDOT_SOCK_FAULT"):
            check(name in own_image,
                  f"the test build's seam {name.decode()} is where this "
                  "test looks for it")
    fdtest.FINALDOT = binary
    with tempfile.TemporaryDirectory(prefix="fdrel-") as tmp:
        hold = os.path.join(tmp, "hold")
        open(hold, "w").close()
        for n, spec in enumerate(SPECS + (f"hold:{hold}",)):
            with Daemon(env={"FINALDOT_SPOOL_FAULT": spec}) as d:
                mid = one_message(d, n)
                check(mid in {m["id"] for m in d.scan()["messages"]},
                      f"{spec}: the message is in the spool")
                log = d.read_log()
                check("event=fault_injection" not in log,
                      f"{spec}: the release binary announced a fault seam")
    print(f"ok: {binary} ignores FINALDOT_SPOOL_FAULT ({', '.join(SPECS)}, "
          f"hold:PATH): 250 and stored; its --help does not name it; "
          f"neither it nor FINALDOT_DELIVERY_FAULT, FINALDOT_SOCK_FAULT or "
          f"FINALDOT_PORT_FAULT is in the binary")


main()
