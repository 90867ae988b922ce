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


def metrics(mport, bport):
    """The damaged count and the route's delivery series in /metrics."""
    import urllib.request
    time.sleep(0.6)  # the queue manager publishes 4 times a second
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics",
                                  timeout=10).read().decode()
    vals = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            vals[k] = float(v)
    route = f"smtp:127.0.0.1:{bport}"
    check(vals.get("finaldot_queue_damaged_total") == 1,
          f"damaged_total {vals.get('finaldot_queue_damaged_total')}")
    deferred = vals.get('finaldot_route_deliveries_total{route="%s",'
                        'outcome="deferred"}' % route, 0)
    check(deferred >= 2, f"route deferred {deferred}")
    count = vals.get('finaldot_delivery_duration_seconds_count{route="%s"}'
                     % route, 0)
    check(count >= 2, f"route attempts {count}")
    inf = vals.get('finaldot_delivery_duration_seconds_bucket{route="%s",'
                   'le="+Inf"}' % route)
    check(inf == count, f"+Inf {inf} != count {count}")
    print(f"ok: /metrics: damaged=1, route {route}: {count:.0f} attempts, "
          f"{deferred:.0f} deferred")


def main():
    bport = free_port()
    mport = free_port()
    with Daemon("--route", f"example.com=smtp:127.0.0.1:{bport}",
                "--retry-min", "1s", "--retry-max", "1s",
                "--metrics", f"127.0.0.1:{mport}",
                delivery=True) as a:
        body = message(1, 3000, "damaged") + MARK + b"\r\n"
        qid = send(a, "s@client.test", ["u@example.com"], body)
        a.wait_log(rf"{qid} event=delivery .*status=deferred", 15)
        # Flip one byte of the body in the segment file.
        hit = 0
        for path in glob.glob(os.path.join(a.spool, "w*", "*")):
            # Segments being prepared (.tmp) come and go: not ours.
            if path.endswith(".tmp") or not os.path.isfile(path):
                continue
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
        metrics(mport, bport)
        print(f"ok: damaged body held at once, never sent, not retried")


main()
