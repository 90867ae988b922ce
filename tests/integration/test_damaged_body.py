#!/usr/bin/python3
"""A queued message whose body is damaged in the spool after it was
accepted (a disk error, a stray write): when the delivery reads it back the
CRC32C does not match. It must never reach the next hop (not even cut
short), and must not be retried until the queue lifetime and bounced: it
is held at once, durably, with the reason logged and counted, for the
operator to decide (finaldotctl queue release|delete)."""
import glob
import os
import re
import time

from delivtest import message, send, wait
from fdtest import Daemon, check, free_port

MARK = b"DAMAGE-ME-0123456789"


def main():
    bport = free_port()
    with Daemon("--route", f"example.com=smtp:127.0.0.1:{bport}",
                "--retry-min", "1s", "--retry-max", "1s",
                "--metrics", f"127.0.0.1:{free_port()}",
                delivery=True) as a:
        body = message(1, 3000, "damaged") + MARK + b"\r\n"
        qid = send(a, "s@client.test", ["u@example.com"], body)
        a.wait_log(rf"{qid} event=delivery .*status=deferred", 15)
        # Flip one byte of the body in the segment file.
        hit = 0
        for path in glob.glob(os.path.join(a.spool, "w*", "*")):
            with open(path, "r+b") as f:
                data = f.read()
                at = data.find(MARK)
                if at >= 0:
                    f.seek(at + 3)
                    f.write(b"X")
                    f.flush()
                    os.fsync(f.fileno())
                    hit += 1
        check(hit == 1, f"marker found in {hit} segment files")
        with Daemon(port=bport) as b:
            a.wait_log(rf"{qid} event=held reason=damaged", 20)
            check(re.search(rf"{qid} event=body_damaged", a.read_run_log()),
                  "no event=body_damaged")
            time.sleep(2.5)  # a retry would have come by now
            log = a.read_run_log()
            after = log.split("event=held reason=damaged", 1)[1]
            check(not re.search(rf"{qid} event=delivery", after),
                  "the held message was tried again")
            check(not b.scan()["messages"],
                  "the damaged message reached the next hop")
        print(f"ok: damaged body held at once, never sent, not retried")


main()
