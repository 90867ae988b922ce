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

Then queue cat of a 20 MiB message (cat_big):
  - it is byte for byte what the spool holds, while the daemon's peak
    RSS grows by less than CAT_RSS_MAX (the old cat built the whole
    base64 reply, 27 MiB, before sending a byte) and the bytes are read
    by the control socket's thread, not the queue manager's;
  - a cat whose client stops reading stays a few chunks in memory, and
    meanwhile other mail is delivered and status answers;
  - a message deleted while its cat streams: its segments stay pinned (4
    MiB segments: the message spans several, sealed ones among them, and
    none is reclaimed until the cat ends), every byte sent is still the
    message's, the reply ends in an error and finaldotctl exits 1;
  - a damaged body (one byte flipped in the segment file): the chunk that
    would complete it is withheld, the error says damaged, exit 1.

Then hold and delete with the delivery log's disk slowed (fault seam
dlog-hold): each answers only once its record is durable, and a kill -9
right after it keeps it.
"""
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import Daemon, FINALDOTCTL, check, fail, free_port  # noqa: E402
from delivtest import send, message, wait, log_count  # noqa: E402
from peers import ScriptedHop, Script  # noqa: E402

DEFER = "451 4.3.0 Try again later"
BIG = 20 << 20
# What a cat may add to the daemon's peak RSS: its output buffer (256 KiB
# and a chunk) and one piece; the rest is allocator slack.
CAT_RSS_MAX = 4 << 20


def failing(d, want_rc, pattern, *args):
    """A command that must fail: exit want_rc, exactly one stderr line
    matching pattern, nothing on stdout."""
    rc, out, err = d.ctl(*args, ok=False)
    check(rc == want_rc, f"finaldotctl {' '.join(args)}: exit {rc}, want "
          f"{want_rc} ({err!r})")
    lines = err.strip().splitlines()
    check(len(lines) == 1 and re.search(pattern, lines[0]),
          f"finaldotctl {' '.join(args)}: stderr {err!r}, want one line "
          f"/{pattern}/")
    check(out == "", f"finaldotctl {' '.join(args)}: stdout {out!r}")


def jlist(d, *args):
    _, out, _ = d.ctl("queue", "list", "--json", *args)
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


def big_message(size):
    """size bytes or a little more of base64 lines (an attachment), every
    seventh starting with a dot (transparency), CRLF line ends."""
    import base64
    out = [b"From: big@example.com\r\nTo: x@stuck.test\r\n"
           b"Subject: big\r\n\r\n"]
    n = len(out[0])
    i = 0
    while n < size:
        line = base64.b64encode(os.urandom(57)) + b"\r\n"
        if i % 7 == 0:
            line = b"." + line
        out.append(line)
        n += len(line)
        i += 1
    return b"".join(out)


def mem(pid, key):
    """VmRSS or VmHWM of pid, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    fail(f"no {key} in /proc/{pid}/status")


def reset_hwm(pid):
    """VmHWM back to the current RSS (Linux 4.0+: clear_refs 5); False if
    the kernel does not let us."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def thread_reads(pid):
    """Bytes read by read()/pread() (rchar), summed per thread name, or
    None where /proc does not tell."""
    res = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
        for tid in tids:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/io") as f:
                m = re.search(r"^rchar: (\d+)", f.read(), re.M)
            res[comm] = res.get(comm, 0) + int(m.group(1))
    except (OSError, AttributeError):
        return None
    return res


def flip_byte(spool, marker):
    """Flip a byte just after marker in the one segment file holding it."""
    import glob
    hit = 0
    for path in glob.glob(os.path.join(spool, "w*", "*.seg")):
        with open(path, "r+b") as f:
            data = f.read()
            at = data.find(marker)
            if at >= 0:
                f.seek(at + len(marker))
                f.write(b"#")
                f.flush()
                os.fsync(f.fileno())
                hit += 1
    check(hit == 1, f"marker {marker!r} found in {hit} segment files")


def cat_big():
    dead = free_port()  # nobody listens: mail for stuck.test waits
    with ScriptedHop() as hop, \
            Daemon("--route", f"dest.test={hop.target}",
                   "--route", f"stuck.test=smtp:127.0.0.1:{dead}",
                   "--retry-min", "1h", "--retry-max", "1h",
                   "--segment-size", "4M",
                   domains=("example.com", "dest.test", "stuck.test"),
                   threads=2, delivery=True) as d:
        sock = os.path.join(d.tmp, "control.sock")
        pid = d.proc.pid
        body = big_message(BIG)
        big = send(d, "big@example.com", ["x@stuck.test"], body).upper()
        wait(lambda: log_count(
            d, rf"(?i){big} event=delivery .*status=deferred"), 60,
            "the big message deferred")
        stored = d.cat(big)
        check(len(stored) > BIG and stored.endswith(body),
              f"spool cat: {len(stored)} bytes")

        # The whole message, through finaldotctl.
        rss0 = mem(pid, "VmRSS")
        hwm_reset = reset_hwm(pid)
        hwm0 = mem(pid, "VmHWM")
        io0 = thread_reads(pid)
        t0 = time.time()
        r = subprocess.run([FINALDOTCTL, "--control", sock, "queue", "cat",
                            big], capture_output=True, timeout=120)
        took = time.time() - t0
        hwm1 = mem(pid, "VmHWM")
        io1 = thread_reads(pid)
        check(r.returncode == 0, f"queue cat: exit {r.returncode} "
              f"{r.stderr!r}")
        check(r.stdout == stored, f"queue cat: {len(r.stdout)} bytes, not "
              f"the {len(stored)} stored")
        grew = hwm1 - (rss0 if hwm_reset else hwm0)
        print(f"cat of {len(stored)} bytes in {took:.2f}s: RSS before "
              f"{rss0 >> 10} KiB, peak after {hwm1 >> 10} KiB (reset: "
              f"{hwm_reset}), grew {grew >> 10} KiB")
        check(grew < CAT_RSS_MAX, f"the cat grew the daemon's peak RSS by "
              f"{grew >> 10} KiB (at most {CAT_RSS_MAX >> 10})")
        if io0 is None or io1 is None or "fd-ctl" not in io1:
            print("note: /proc/PID/task/*/io unreadable: which thread "
                  "read the message is not checked")
        else:
            ctl_read = io1["fd-ctl"] - io0.get("fd-ctl", 0)
            qm_read = io1.get("fd-qmgr", 0) - io0.get("fd-qmgr", 0)
            print(f"read by fd-ctl {ctl_read}, by fd-qmgr {qm_read}")
            check(ctl_read >= len(stored), f"fd-ctl read {ctl_read}")
            check(qm_read < len(stored) // 8,
                  f"the queue manager read {qm_read} bytes during the cat")

        # A cat nobody reads (finaldotctl writing to a pipe we leave
        # full): the daemon stops producing it, and goes on.
        rss0 = mem(pid, "VmRSS")
        p = subprocess.Popen([FINALDOTCTL, "--control", sock, "queue",
                              "cat", big], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        time.sleep(1.0)
        grew = mem(pid, "VmRSS") - rss0
        print(f"stalled cat: RSS grew {grew >> 10} KiB")
        check(grew < CAT_RSS_MAX, f"a stalled cat grew the daemon's RSS "
              f"by {grew >> 10} KiB")
        check(p.poll() is None, "finaldotctl ended with its stdout full")
        small = [send(d, "s@example.com", [f"u{n}@dest.test"],
                      message(n, subject="during cat")) for n in range(3)]
        check(len(hop.wait_for(3, 30)) >= 3,
              "mail not delivered while a cat waits")
        check(json.loads(d.ctl("status", "--json")[1])["pid"] == pid,
              "status while a cat waits")
        # Deleted while it streams: the message finishes, its segments
        # stay pinned, so the rest of the bytes are still its own.
        check(d.ctl("queue", "delete", big)[1] == "1 message deleted\n",
              "delete the big message")
        wait(lambda: big not in {m["id"] for m in jlist(d)}, 10,
             "the deleted message leaves the listing")
        # Finished, its log record durable, its references dropped: only
        # the cat's pins keep its sealed segments from their workers.
        time.sleep(1.0)
        check(log_count(d, r"event=segment_reclaimed") == 0,
              "a segment was reclaimed under a cat")
        out, err = p.communicate(timeout=120)
        err = err.decode(errors="replace")
        check(p.returncode == 1 and re.search(
            r"left the queue .*while it was being sent", err),
            f"cat of a message deleted meanwhile: exit {p.returncode} "
            f"{err!r}")
        check(out == stored, f"cat of a message deleted meanwhile: "
              f"{len(out)} bytes, not the stored {len(stored)}")
        check(len(small) == 3, "sent")
        wait(lambda: log_count(d, r"event=segment_reclaimed"), 10,
             "the big message's segments reclaimed once the cat ended")

        # A damaged body: the chunk that completes it never goes out.
        mark = b"DAMAGE-HERE-0123456789"
        dmg = big_message(300 << 10).replace(b"\r\n\r\n",
                                             b"\r\n\r\n" + mark, 1)
        qd = send(d, "big@example.com", ["y@stuck.test"], dmg).upper()
        wait(lambda: log_count(
            d, rf"(?i){qd} event=delivery .*status=deferred"), 30,
            "the damaged message deferred")
        flip_byte(d.spool, mark)
        r = subprocess.run([FINALDOTCTL, "--control", sock, "queue", "cat",
                            qd], capture_output=True, timeout=60)
        err = r.stderr.decode(errors="replace")
        check(r.returncode == 1 and re.search(r"damaged", err) and
              len(err.strip().splitlines()) == 1,
              f"damaged cat: exit {r.returncode} {err!r}")
        check(0 < len(r.stdout) < len(dmg) and mark in r.stdout,
              f"damaged cat: {len(r.stdout)} bytes out of {len(dmg)}")
    print("ok: a 20 MiB queue cat is byte-identical, read by the control "
          "thread with the peak RSS grown by less than 4 MiB; a stalled "
          "cat stays small while mail is delivered; deleted meanwhile or "
          "damaged: an error and exit 1")


def delivery_off():
    """With --delivery off the queue manager's tailer reads the segments
    with O_DIRECT (nothing reads the bodies after it): the live queue must
    still hold every message, whole, a large one across segments too;
    `queue cat` (the tailer's record layout) against `spool cat` (the
    spool reader's own walk)."""
    with Daemon("--segment-size", "1M", domains=("example.com",
                                                 "dest.test"),
                threads=2) as d:
        ids = [send(d, f"s{n}@example.com", [f"r{n}@dest.test"],
                    message(n, size=size, subject="off")).upper()
               for n, size in enumerate([300, 5000, 70000, 1500000])]
        wait(lambda: len(jlist(d)) == len(ids), 15,
             "every message listed with delivery off")
        check(sorted(m["id"] for m in jlist(d)) == sorted(ids),
              f"listed {[m['id'] for m in jlist(d)]}, sent {ids}")
        sock = os.path.join(d.tmp, "control.sock")
        for n, q in enumerate(ids):
            r = subprocess.run([FINALDOTCTL, "--control", sock, "queue",
                                "cat", q], capture_output=True, timeout=60)
            check(r.returncode == 0, f"queue cat {q}: {r.stderr!r}")
            check(r.stdout == d.cat(q), f"queue cat {q} ({len(r.stdout)} "
                  "bytes) differs from spool cat")
            check(f"Subject: off {n}\r\n".encode() in r.stdout,
                  f"queue cat {q}: not message {n}")
        # After a restart the counts are there as soon as the daemon is
        # ready (they were zeros until the queue manager's first pass).
        check(d.stop() == 0, "clean stop")
        d.start()
        q = json.loads(d.ctl("status", "--json")[1])["queue"]
        check(q["queued"] == len(ids), f"status right after a restart: {q}")
    print("ok: with delivery off the live queue holds every message, "
          "byte-identical to the spool")


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
            # 4 spells its domain as the SMTP engine also takes it (one
            # trailing dot): flush --to-domain dest.test still names it.
            to = "bob4@Dest.Test." if n == 4 else f"bob{n}@dest.test"
            ids[n] = send(d, f"s{n}@example.com", [to],
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
        _, out, _ = d.ctl("queue", "list")
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
        _, out, _ = d.ctl("queue", "show", ids[1])
        check(f"id:       {ids[1]}" in out and "<s1@example.com>" in out
              and re.search(r"<bob1@dest\.test> pending attempts=\d", out)
              and "451 4.3.0" in out and f"route={hop.target}" in out,
              f"queue show:\n{out}")
        _, out, _ = d.ctl("queue", "show", ids[1], "--json")
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
        _, out, _ = d.ctl("queue", "show", ids[1])
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
            q = json.loads(d.ctl("status", "--json")[1])["queue"]
            return q if q["deferred"] == 4 and q["queued"] == 4 else None
        wait(status_queue, 10, "status: 4 deferred")

        # hold ALL / release ALL touch every message.
        check(d.ctl("queue", "hold", "ALL")[1] == "4 messages held\n",
              "hold ALL")
        check(len(jlist(d, "--state", "held")) == 4, "all held")
        check(d.ctl("queue", "release", "ALL")[1] ==
              "4 messages released\n", "release ALL")

        # hold 1, delete 2: then the hop accepts, and flush 3.
        check(d.ctl("queue", "hold", ids[1])[1] == "1 message held\n",
              "hold")
        check([m["id"] for m in jlist(d, "--state", "held")] == [ids[1]],
              "list --state held")
        check(json.loads(d.ctl("queue", "show", ids[1], "--json")[1])
              ["state"] == "held", "show says held")
        check(d.ctl("queue", "delete", ids[2])[1] ==
              "1 message deleted\n", "delete")
        check(ids[2] not in {m["id"] for m in jlist(d)},
              "a deleted message is still listed")
        # Until its segment is reclaimed a finished message can still be
        # looked at: deleted, not delivered.
        v = json.loads(d.ctl("queue", "show", ids[2], "--json")[1])
        check(v["state"] == "finished" and
              v["recipients"][0]["status"] == "deleted", f"deleted: {v}")
        state["defer"] = False
        check(d.ctl("queue", "flush", ids[3])[1] ==
              "1 message scheduled for delivery now\n", "flush ID")
        wait(lambda: 3 in delivered_subjects(hop), 30, "3 delivered")
        wait(lambda: log_count(d, rf"(?i){ids[3]} event=delivery "
                               r".*status=sent"), 10, "3 logged sent")
        check(delivered_subjects(hop) == {3},
              f"flush ID delivered {delivered_subjects(hop)}")
        # flush by domain: 4 goes; 1 is held and stays.
        d.ctl("queue", "flush", "--to-domain", "dest.test")
        wait(lambda: 4 in delivered_subjects(hop), 30, "4 delivered")
        time.sleep(1.0)  # a held message would have gone by now
        check(delivered_subjects(hop) == {3, 4},
              f"after flush --to-domain: {delivered_subjects(hop)}")
        check([m["id"] for m in jlist(d)] == [ids[1]], "only 1 is left")
        d.ctl("queue", "flush")  # ALL: 1 is still held
        time.sleep(1.0)
        check(delivered_subjects(hop) == {3, 4}, "a held message went")
        check(d.ctl("queue", "release", ids[1])[1] ==
              "1 message released\n", "release")
        d.ctl("queue", "flush", "ALL")
        wait(lambda: 1 in delivered_subjects(hop), 30, "1 delivered")
        last = {}

        def empty():
            last["out"] = d.ctl("queue", "list")[1]
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
    cat_big()
    delivery_off()
    print("ok: list/show/cat/status see every deferred message; hold, "
          "release, delete and flush (ID, domain, ALL) do what they say; "
          "errors are one line and a non-zero exit")


def actions_answer_once_durable():
    """hold and delete answer only once their delivery-log record is
    durable: with the log's fdatasyncs held (fault seam dlog-hold, a slow
    disk) the command waits; released, it answers, and a kill -9 right
    after keeps both (the hop, accepting from then on, gets neither).
    They answered at once, and a crash then lost the hold or the delete:
    the message was delivered."""
    state = {"accept": False}

    def rcpt(sess, addr, params):
        return None if state["accept"] else DEFER

    with ScriptedHop(script=Script(rcpt=rcpt)) as hop:
        with Daemon("--retry-min", "1h", "--retry-max", "1h",
                    "--route", f"dest.test={hop.target}", delivery=True,
                    domains=("example.com", "dest.test"),
                    env={"FINALDOT_DELIVERY_FAULT": "dlog-hold"}) as d:
            ids = [send(d, "a@example.com", ["b@dest.test"], message(i))
                   for i in (1, 2)]
            for x in ids:
                wait(lambda: log_count(
                    d, rf"{x} event=delivery .*status=deferred"),
                     10, f"{x} deferred")
            time.sleep(0.5)  # the deferrals' records are durable
            hold = os.path.join(d.spool, "dlog", "hold")
            sock = os.path.join(d.tmp, "control.sock")
            for action, x in (("hold", ids[0]), ("delete", ids[1])):
                open(hold, "w").close()
                p = subprocess.Popen([FINALDOTCTL, "--control", sock,
                                      "queue", action, x],
                                     stdout=subprocess.PIPE, text=True)
                time.sleep(1.5)
                early = p.poll() is not None
                os.unlink(hold)
                out = p.communicate(timeout=30)[0]
                check(not early, f"queue {action} answered {out!r} before "
                      f"its record could be durable")
                check(p.returncode == 0, f"queue {action}: {out!r}")
            d.kill9()
            state["accept"] = True
            d.start()
            d.ctl("queue", "flush", "ALL")
            time.sleep(3)
            check(not hop.completed(), f"a held or deleted message was "
                  f"delivered after the restart: {delivered_subjects(hop)}")
            rc, out, _ = d.ctl("queue", "show", ids[0])
            check("held" in out, f"not held after the restart:\n{out}")


if __name__ == "__main__":
    main()
    actions_answer_once_durable()
