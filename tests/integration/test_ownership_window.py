#!/usr/bin/python3
"""Issue 10 section 2, the last window: a program of our user that joins a
listening address's SO_REUSEPORT group between finaldot's own binds (one
listener per worker) would hold one of the slots the group's filter picks
from, and take a share of the connections. The test seam
(FINALDOT_SOCK_FAULT=join-between-binds, test builds only) makes the daemon
itself join there, as that program would; the start must fail and say so,
for every worker count, and a start without it must succeed."""
import re

import fdtest
from fdtest import Daemon, check


def joined_between_binds(threads):
    port = fdtest.free_port()
    with Daemon(port=port, threads=threads, wait_ready=False,
                env={"FINALDOT_SOCK_FAULT": "join-between-binds"}) as d:
        try:
            rc = d.proc.wait(30)
        except Exception:
            check(False, f"threads={threads}: the daemon started with a "
                  "stranger in its listening group")
        check(rc != 0, f"threads={threads}: exit status 0")
        log = d.read_log()
        check(re.search(r"event=listen_failed .*another process joined "
                        r"this address's SO_REUSEPORT group.* strangers=1 ",
                        log), f"threads={threads}: no clear error:\n{log}")
    # The port is free again and an ordinary start takes it.
    with Daemon(port=port, threads=threads) as d:
        c = d.connect()
        c.expect(220)
        c.cmd("QUIT", 221)
        c.close()


for threads in (1, 2):
    joined_between_binds(threads)
print("ok: a stranger that joins the listening group between finaldot's "
      "binds makes the start fail with a clear error (1 and 2 workers); "
      "the same port then starts cleanly")
