#!/usr/bin/python3
"""finaldotctl queue against a running daemon with a real queue.

A ScriptedHop answers 451 to every final dot, so four messages stay
deferred (retry_min 1h: nothing is retried unless finaldotctl says so).
Then, through finaldotctl only:
  - queue list (text like postqueue -p, --json like postqueue -j, the
    --state/--from/--to filters) shows every deferred id with its 451;
  - queue show and queue cat give the envelope, recipient state and the
    stored bytes (the same bytes finaldotctl spool cat reads offline);
  - status counts them as deferred;
  - hold keeps a message from delivery even through a flush, delete drops
    one for good (the next hop never sees it), flush ID / --to-domain /
    ALL retry at once once the hop accepts, release lets a held one go;
  - unknown ids, bad ids and bad arguments are one line on stderr and a
    non-zero exit.
"""
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import Daemon, FINALDOTCTL, check, fail  # noqa: E402
from delivtest import send, message, wait, log_count  # noqa: E402
from peers import ScriptedHop, Script  # noqa: E402

DEFER = "451 4.3.0 Try again later"


def ctl(d, *args, ok=True):
    """finaldotctl against daemon d: (rc, stdout, stderr)."""
    r = subprocess.run([FINALDOTCTL, "--control",
                        os.path.join(d.tmp, "control.sock"), *args],
                       capture_output=True, timeout=60)
    out, err = r.stdout.decode(errors="replace"), r.stderr.decode(
        errors="replace")
    if ok:
        check(r.returncode == 0,
              f"finaldotctl {' '.join(args)}: exit {r.returncode}: {err}")
    return r.returncode, out, err


def failing(d, want_rc, pattern, *args):
    """A command that must fail: exit want_rc, exactly one stderr line
    matching pattern, nothing on stdout."""
    rc, out, err = ctl(d, *args, ok=False)
    check(rc == want_rc, f"finaldotctl {' '.join(args)}: exit {rc}, want "
          f"{want_rc} ({err!r})")
    lines = err.strip().splitlines()
    check(len(lines) == 1 and re.search(pattern, lines[0]),
          f"finaldotctl {' '.join(args)}: stderr {err!r}, want one line "
          f"/{pattern}/")
    check(out == "", f"finaldotctl {' '.join(args)}: stdout {out!r}")


def jlist(d, *args):
    _, out, _ = ctl(d, "queue", "list", "--json", *args)
    return [json.loads(l) for l in out.splitlines()]


def delivered_subjects(hop):
    """Subjects of the messages the hop accepted (answered 250)."""
    res = set()
    for t in hop.completed():
        if t.replies and t.replies[-1].startswith("250"):
            m = re.search(rb"Subject: ctl (\d+)", t.body)
            if m:
                res.add(int(m.group(1)))
    return res


def main():
    state = {"defer": True}

    def dot(session):
        return DEFER if state["defer"] else None

    with ScriptedHop(script=Script(dot=dot)) as hop, \
            Daemon("--route", f"dest.test={hop.target}",
                   "--retry-min", "1h", "--retry-max", "1h",
                   "--smtp-timeout", "5s", "--smtp-data-timeout", "5s",
                   domains=("example.com", "dest.test"), threads=2,
                   delivery=True) as d:
        ids = {}
        for n in range(1, 5):
            ids[n] = send(d, f"s{n}@example.com", [f"bob{n}@dest.test"],
                          message(n, subject="ctl")).upper()
        for n, q in ids.items():
            wait(lambda q=q: log_count(
                d, rf"(?i){q} event=delivery .*status=deferred"), 30,
                f"message {n} deferred")

        # list: every deferred id, with the next hop's reason.
        items = jlist(d)
        check({m["id"] for m in items} == set(ids.values()),
              f"list --json ids {[m['id'] for m in items]} != {ids}")
        for m in items:
            check(m["state"] == "deferred" and not m["held"], f"{m}")
            r = m["recipients"]
            check(len(r) == 1 and r[0]["status"] == "pending" and
                  "451 4.3.0" in r[0]["reason"] and r[0]["attempts"] >= 1
                  and r[0]["next_attempt"], f"recipient {r}")
            check(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$",
                           m["arrival"]) and m["size"] > 0, f"{m}")
        _, out, _ = ctl(d, "queue", "list")
        for q in ids.values():
            check(re.search(rf"^{q}  +\d+ ", out, re.M),
                  f"{q} not in the text listing:\n{out}")
        check("(451 4.3.0 Try again later)" in out and
              re.search(r"^ +bob3@dest\.test$", out, re.M) and
              re.search(r"^-- \d+ Kbytes in 4 Requests\.$", out, re.M),
              f"not shaped like postqueue -p:\n{out}")
        check([m["id"] for m in jlist(d, "--from", "S2@EXAMPLE")] ==
              [ids[2]], "--from filter")
        check([m["id"] for m in jlist(d, "--to", "bob3@")] == [ids[3]],
              "--to filter")
        check(jlist(d, "--from", "<>") == [], "--from '<>': null sender")
        check(jlist(d, "--state", "held") == [], "nothing held yet")

        # show and cat.
        _, out, _ = ctl(d, "queue", "show", ids[1])
        check(f"id:       {ids[1]}" in out and "<s1@example.com>" in out
              and re.search(r"<bob1@dest\.test> pending attempts=\d", out)
              and "451 4.3.0" in out and f"route={hop.target}" in out,
              f"queue show:\n{out}")
        _, out, _ = ctl(d, "queue", "show", ids[1], "--json")
        v = json.loads(out)
        check(v["sender"] == "s1@example.com" and v["helo"] ==
              "client.test" and v["client"] == "127.0.0.1" and
              v["recipients"][0]["route"] == hop.target, f"show --json {v}")
        # The delivery history, from the delivery log: the attempt and
        # the deferral with the next hop's 451, in that order.
        events = [(h["event"], h["rcpt"]) for h in v["history"]]
        check(("attempt", 0) in events and ("deferred", 0) in events and
              events.index(("attempt", 0)) < events.index(("deferred", 0)),
              f"history {v['history']}")
        check(any("451 4.3.0" in h["text"] for h in v["history"]
                  if h["event"] == "deferred"), f"history {v['history']}")
        _, out, _ = ctl(d, "queue", "show", ids[1])
        check(re.search(r"history .*\n  \S+ attempt +<bob1@dest\.test>",
                        out) and
              re.search(r"deferred +<bob1@dest\.test> attempt 1 .*451 4\.3\.0",
                        out), f"queue show history:\n{out}")
        r = subprocess.run([FINALDOTCTL, "--control",
                            os.path.join(d.tmp, "control.sock"), "queue",
                            "cat", ids[1]], capture_output=True, timeout=60)
        check(r.returncode == 0, f"queue cat: {r.stderr!r}")
        check(r.stdout == d.cat(ids[1]), "queue cat differs from the "
              "stored bytes (spool cat)")
        check(b"Subject: ctl 1\r\n" in r.stdout, "queue cat: no subject")

        # The queue manager publishes its counts a few times a second.
        def status_queue():
            q = json.loads(ctl(d, "status", "--json")[1])["queue"]
            return q if q["deferred"] == 4 and q["queued"] == 4 else None
        wait(status_queue, 10, "status: 4 deferred")

        # hold ALL / release ALL touch every message.
        check(ctl(d, "queue", "hold", "ALL")[1] == "4 messages held\n",
              "hold ALL")
        check(len(jlist(d, "--state", "held")) == 4, "all held")
        check(ctl(d, "queue", "release", "ALL")[1] ==
              "4 messages released\n", "release ALL")

        # hold 1, delete 2: then the hop accepts, and flush 3.
        check(ctl(d, "queue", "hold", ids[1])[1] == "1 message held\n",
              "hold")
        check([m["id"] for m in jlist(d, "--state", "held")] == [ids[1]],
              "list --state held")
        check(json.loads(ctl(d, "queue", "show", ids[1], "--json")[1])
              ["state"] == "held", "show says held")
        check(ctl(d, "queue", "delete", ids[2])[1] ==
              "1 message deleted\n", "delete")
        check(ids[2] not in {m["id"] for m in jlist(d)},
              "a deleted message is still listed")
        # Until its segment is reclaimed a finished message can still be
        # looked at: deleted, not delivered.
        v = json.loads(ctl(d, "queue", "show", ids[2], "--json")[1])
        check(v["state"] == "finished" and
              v["recipients"][0]["status"] == "deleted", f"deleted: {v}")
        state["defer"] = False
        check(ctl(d, "queue", "flush", ids[3])[1] ==
              "1 message scheduled for delivery now\n", "flush ID")
        wait(lambda: 3 in delivered_subjects(hop), 30, "3 delivered")
        wait(lambda: log_count(d, rf"(?i){ids[3]} event=delivery "
                               r".*status=sent"), 10, "3 logged sent")
        check(delivered_subjects(hop) == {3},
              f"flush ID delivered {delivered_subjects(hop)}")
        # flush by domain: 4 goes; 1 is held and stays.
        ctl(d, "queue", "flush", "--to-domain", "dest.test")
        wait(lambda: 4 in delivered_subjects(hop), 30, "4 delivered")
        time.sleep(1.0)  # a held message would have gone by now
        check(delivered_subjects(hop) == {3, 4},
              f"after flush --to-domain: {delivered_subjects(hop)}")
        check([m["id"] for m in jlist(d)] == [ids[1]], "only 1 is left")
        ctl(d, "queue", "flush")  # ALL: 1 is still held
        time.sleep(1.0)
        check(delivered_subjects(hop) == {3, 4}, "a held message went")
        check(ctl(d, "queue", "release", ids[1])[1] ==
              "1 message released\n", "release")
        ctl(d, "queue", "flush", "ALL")
        wait(lambda: 1 in delivered_subjects(hop), 30, "1 delivered")
        last = {}

        def empty():
            last["out"] = ctl(d, "queue", "list")[1]
            return last["out"] == "Mail queue is empty\n"
        deadline = time.time() + 10
        while not empty() and time.time() < deadline:
            time.sleep(0.1)
        check(empty(), f"the queue is not empty:\n{last['out']}")
        check(delivered_subjects(hop) == {1, 3, 4},
              f"the deleted message was delivered: "
              f"{delivered_subjects(hop)}")

        # Errors: one line, a non-zero exit.
        unknown = "0000000000000001"
        failing(d, 1, "no such message", "queue", "show", unknown)
        failing(d, 1, "no such message", "queue", "cat", unknown)
        failing(d, 1, "1 of 1 ids are not in the queue", "queue", "hold",
                unknown)
        failing(d, 1, "not in the queue", "queue", "delete", ids[3],
                unknown)
        failing(d, 2, "not a queue id", "queue", "show", "xyz")
        failing(d, 2, "not a queue id", "queue", "release", "12345")
        failing(d, 2, "usage", "queue", "hold")
        failing(d, 2, "not several", "queue", "flush", "ALL", ids[1])
        failing(d, 2, "not several", "queue", "flush", "--to-domain",
                "dest.test", ids[1])
        failing(d, 2, "--state is active, deferred or held", "queue",
                "list", "--state", "frozen")
        failing(d, 2, "unknown argument", "queue", "list", "--bogus")
        failing(d, 2, "unknown queue command", "queue", "frobnicate")
    print("ok: list/show/cat/status see every deferred message; hold, "
          "release, delete and flush (ID, domain, ALL) do what they say; "
          "errors are one line and a non-zero exit")


if __name__ == "__main__":
    main()
