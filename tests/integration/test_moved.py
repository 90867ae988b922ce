#!/usr/bin/env python3
"""Moved messages: mail deferred for long no longer keeps its spool
segments. Without the move, a few messages for a dead next hop kept
every segment they were in, the spool reached --max-segments and every
client got 452 4.3.1 (found in review: 6 deferred of 132 accepted).

- case_dead_route_keeps_no_segment: 1 MiB segments, at most 6; every 25th
  message for a next hop that is down, the rest for a Maildir. All 600 are
  accepted (a client retrying a 452 while a segment is emptied, as it
  would); the deferred ones are moved to spool/moved/; after a restart
  they are still queued (from their files), and once the next hop is up
  each is delivered once and its file is deleted.
- case_kill_during_moves: kill -9 while moving, three times: each
  deferred message delivered exactly once in the end.
"""
import glob
import json
import os
import re
import smtplib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import Daemon, check, free_port  # noqa: E402
from delivtest import (send, message, maildir_files, wait, log_count,  # noqa
                       run_cases)
from peers import ScriptedHop, Script  # noqa: E402


def send_retrying(d, to, body):
    """As a client does with 452 4.3.1 (the spool at its limit until a
    segment is emptied): try again a moment later. (queue id, 452s)."""
    for tries in range(120):
        try:
            return send(d, "a@example.com", [to], body), tries
        except smtplib.SMTPDataError as e:
            check(e.smtp_code == 452, f"DATA: {e}")
            time.sleep(0.5)
    check(False, "452 for a minute")


def wait_sent(d, ids):
    for q in ids:
        wait(lambda q=q: log_count(d, rf"{q} event=delivery .*status=sent"),
             30, f"{q} delivered")


def moved_files(d):
    return glob.glob(os.path.join(d.spool, "moved", "*.msg"))


def mover(port, *extra):
    """A daemon with 1 MiB segments that moves after 1 s, mail for
    example.com to its Maildir and for dead.test to port (down until a
    test starts a next hop there), retried only after 60 s."""
    return Daemon("--segment-size", "1M", "--move-after", "1s",
                  "--retry-min", "60s", "--retry-max", "60s",
                  "--smtp-connect-timeout", "2s",
                  "--route", f"dead.test=smtp:127.0.0.1:{port}", *extra,
                  delivery=True, domains=("example.com", "dead.test"))


def case_dead_route_keeps_no_segment():
    port = free_port()
    with mover(port, "--max-segments", "6", "--spare-segments", "1") as d:
        root = os.path.join(d.tmp, "maildir")
        dead, refused = [], 0
        for i in range(600):
            to = "b@dead.test" if i % 25 == 0 else f"u{i % 7}@example.com"
            qid, n = send_retrying(d, to, message(i, size=20000))
            refused += n
            if i % 25 == 0:
                dead.append(qid)
        print(f"ok: 600 accepted, {refused} times 452 on the way")
        wait(lambda: sum(len(maildir_files(root, f"u{k}@example.com"))
                         for k in range(7)) == 600 - len(dead), 60,
             "the Maildir messages delivered")
        wait(lambda: len(moved_files(d)) == len(dead), 30,
             f"{len(dead)} messages moved")
        check(log_count(d, r"event=move_failed") == 0, "a move failed")
        # No descriptor kept per moved message (a million deferred would
        # be a million open files): only a reader holds one, for a read.
        fds = [os.readlink(f"/proc/{d.proc.pid}/fd/{n}")
               for n in os.listdir(f"/proc/{d.proc.pid}/fd")]
        held = [f for f in fds if "/moved/" in f]
        check(not held, f"{len(held)} moved files held open")
        # The operator reads a moved message as any other.
        _, out, _ = d.ctl("queue", "cat", dead[1])
        check(out.startswith("Received: ") and "Subject: test 25\r\n" in
              out, f"queue cat of a moved message: {out[:200]!r}")
        # (the counts are published four times a second)
        wait(lambda: json.loads(d.ctl("status", "--json")[1])["delivery"]
             ["moved_total"] == len(dead), 5, "status: moved_total")
        st = json.loads(d.ctl("status", "--json")[1])["delivery"]
        check(st["move_failed_total"] == 0, f"status: {st}")
        check(d.stop() == 0, "clean stop")
        with ScriptedHop(port=port, script=Script()) as hop:
            d.start()
            d.wait_log(rf"event=moved_recovered messages={len(dead)} ", 10)
            d.ctl("queue", "flush")
            hop.wait_for(len(dead), 30)
            wait_sent(d, dead)
            wait(lambda: not moved_files(d), 20, "moved files deleted")
            check(len(hop.completed()) == len(dead),
                  f"{len(hop.completed())} arrived, {len(dead)} sent")
            bodies = [t.body for t in hop.completed()]
            check(len(set(bodies)) == len(dead), "a message twice")


def case_kill_during_moves():
    """kill -9 while messages are being moved, three times: after each
    restart every deferred message is queued once (from its segment or
    its file, never both), no half-written file stays, and once the next
    hop is up each is delivered exactly once."""
    port = free_port()
    with mover(port, "--spare-segments", "1") as d:
        dead = []
        for rnd in range(3):
            for i in range(120):
                k = rnd * 1000 + i
                to = "b@dead.test" if i % 4 == 0 else "u@example.com"
                qid, _ = send_retrying(d, to, message(k, size=20000))
                if i % 4 == 0:
                    dead.append(qid)
            n = log_count(d, r"event=moved ")
            wait(lambda: log_count(d, r"event=moved ") > n, 30,
                 "a move")
            d.kill9()
            d.start()
            for ln in re.findall(r"event=moved_recovered.*",
                                 d.read_run_log()):
                print(f"ok: round {rnd}: {ln}")
            check(not glob.glob(os.path.join(d.spool, "moved", ".tmp-*")),
                  "a half-written file after the restart")
        with ScriptedHop(port=port, script=Script()) as hop:
            d.ctl("queue", "flush")
            hop.wait_for(len(dead), 60)
            wait_sent(d, dead)
            time.sleep(1)  # anything sent twice would have arrived
            subjects = [t.body.split(b"Subject: ", 1)[1].split(b"\r\n")[0]
                        for t in hop.completed()]
            check(len(subjects) == len(dead),
                  f"{len(subjects)} arrived, {len(dead)} deferred")
            check(len(set(subjects)) == len(dead), "a message twice")
            wait(lambda: not moved_files(d), 20, "moved files deleted")


def case_failed_moves_pause():
    """A move that fails (here spool/moved is a file, as ENOSPC would on a
    full disk) is logged once, and no move is tried again for a minute
    (every deferred message failed again every second, a line each); the
    messages stay queued in their segments."""
    port = free_port()
    with mover(port) as d:
        mdir = os.path.join(d.spool, "moved")
        os.rmdir(mdir)
        with open(mdir, "w") as f:
            f.write("not a directory\n")
        ids = [send(d, "a@example.com", ["b@dead.test"],
                    message(i, size=20000))
               for i in range(60)]
        wait(lambda: log_count(d, r"event=move_failed") > 0, 30,
             "a failed move")
        time.sleep(4)
        n = log_count(d, r"event=move_failed")
        check(n <= len(ids), f"{n} failed moves logged for {len(ids)} "
              "messages in a few seconds")
        _, out, _ = d.ctl("queue", "list")
        check(all(q in out.lower() for q in ids), "a message left the queue")


def case_message_across_segments():
    """A deferred message spanning several segments (5 MiB, 1 MiB
    segments) is moved whole, lets go of every one of them, and reaches
    its next hop byte for byte."""
    port = free_port()
    with mover(port, "--spare-segments", "0") as d:
        # (built directly: message() is quadratic in its size)
        big = (b"Subject: big\r\nMessage-ID: <big@client.test>\r\n\r\n" +
               b"".join(b"%07d " % i + b"y" * 60 + b"\r\n"
                        for i in range(5 * 1024 * 1024 // 70)))
        qid = send(d, "a@example.com", ["b@dead.test"], big)
        for i in range(30):  # fill on, so that its segments are sealed
            send(d, "a@example.com", ["u@example.com"],
                 message(10 + i, size=60000))
        wait(lambda: moved_files(d), 30, "the big message moved")
        wait(lambda: json.loads(d.ctl("status", "--json")[1])["queue"]
             ["segments"] <= 3, 30, "its segments handed back")
        with ScriptedHop(port=port, script=Script()) as hop:
            d.ctl("queue", "flush", qid)
            hop.wait_for(1, 30)
            got = hop.completed()[0].body
            check(got.endswith(big), "the body differs")
            wait(lambda: not moved_files(d), 20, "its file deleted")


def case_delivered_moved_message_outlives_its_old_segment():
    """A moved message, once delivered, is kept (finished, in the delivery
    log's checkpoints) until the segment it was moved out of is
    reclaimed: that segment still holds its records while another queued
    message pins it. It was freed at once; a checkpoint then forgot it,
    and after a kill -9 the scan found it in the old segment with nothing
    in the log and delivered it again.

    X: held (so it is moved whatever its due time); Y: retried every 1-2
    s at a hop that always defers, so never moved, pinning X's first
    segment."""
    state = {"accept": False}

    def x_rcpt(sess, addr, params):
        return None if state["accept"] else "451 4.3.0 not now"

    with ScriptedHop(script=Script(rcpt=x_rcpt)) as hx, \
            ScriptedHop(script=Script(
                rcpt=lambda s, a, p: "451 4.3.0 never")) as hy:
        d = Daemon("--segment-size", "1M", "--move-after", "1s",
                   "--retry-min", "1s", "--retry-max", "2s",
                   "--dlog-rotate", "8K",
                   "--route", f"x.test={hx.target}",
                   "--route", f"y.test={hy.target}", delivery=True,
                   domains=("example.com", "x.test", "y.test"))
        with d:
            x = send(d, "a@example.com", ["b@x.test"], message(1))
            y = send(d, "a@example.com", ["c@y.test"], message(2))
            wait(lambda: log_count(
                d, rf"{x} event=delivery .*status=deferred"), 10,
                "X deferred")
            d.ctl("queue", "hold", x)
            for i in range(70):  # fill and seal X's first segment
                send(d, "a@example.com", ["u@example.com"],
                     message(100 + i, size=20000))
            wait(lambda: log_count(d, rf"{x} event=moved "), 30, "X moved")
            state["accept"] = True
            d.ctl("queue", "release", x)
            wait(lambda: log_count(
                d, rf"{x} event=delivery .*status=sent"), 20,
                "X delivered")
            wait(lambda: not any(x.lower() in f.lower()
                                 for f in moved_files(d)), 20,
                 "X's moved file deleted")
            time.sleep(3)  # X finished: kept, or (before) forgotten
            n = log_count(d, r"event=dlog_checkpoint messages=\d+ err=0")
            for i in range(60):  # records enough for the next checkpoint
                send(d, "a@example.com", ["u@example.com"],
                     message(200 + i))
            wait(lambda: log_count(
                d, r"event=dlog_checkpoint messages=\d+ err=0") > n, 60,
                "a checkpoint after X was delivered")
            check(d.ctl("queue", "show", y, ok=False)[0] == 0,
                  "Y still queued (pinning X's old segment)")
            d.kill9()
            d.start()
            time.sleep(5)
            got = len(hx.completed())
            check(got == 1, f"X delivered {got} times (once expected)")


CASES = [case_dead_route_keeps_no_segment, case_kill_during_moves,
         case_failed_moves_pause, case_message_across_segments,
         case_delivered_moved_message_outlives_its_old_segment]

if __name__ == "__main__":
    run_cases(CASES)
