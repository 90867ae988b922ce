#!/usr/bin/python3
"""Local delivery and the spool's life cycle:

- the embedded first-run route (maildir:./var/maildir, no --route/--relay);
- a spool of small segments gives its space back as mail is delivered
  (segments reclaimed: kept as spares or deleted), and shrinks after a
  burst;
- a restart delivers nothing twice (the delivery log), also after the log
  was compacted many times;
- --recipients: unknown users get 550 5.1.1 at RCPT, postmaster always
  passes;
- the queue manager forgets a segment once it is reclaimed and nothing
  names it: the segments it knows (finaldotctl status) stay a handful
  while dozens are written, reclaimed and reused;
- the spool's readers (the tailer, delivery) leave the segments' atime
  alone (O_NOATIME), so a read never dirties the inode a flush writes;
- --delivery-nice N: the delivery threads and the delivery log's writer
  run at nice N, the workers and the queue manager at the daemon's own.
"""
import glob
import json
import re
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import Daemon, check, skip, start_sink, FINALDOT  # noqa: E402
from delivtest import (send, message, maildir_files, wait, log_count,  # noqa
                       run_cases)


def count_files(root):
    """Delivered files: those in a new/ directory (tmp/ holds
    deliveries in progress)."""
    return sum(len(files) for d, _, files in os.walk(root)
               if os.path.basename(d) == "new")


def case_default_route():
    cwd = tempfile.mkdtemp(prefix="fdtest-cwd-")
    try:
        with Daemon(delivery=True, relay=False, cwd=cwd,
                    domains=("example.com",)) as d:
            body = message(1)
            send(d, "a@example.com", ["Bob@Example.com"], body)
            root = os.path.join(cwd, "var", "maildir")
            files = wait(lambda: maildir_files(root, "bob@example.com"), 20,
                         "delivery into ./var/maildir")
            with open(files[0], "rb") as f:
                got = f.read()
            check(got.startswith(b"Return-Path: <a@example.com>\n"
                                 b"Delivered-To: Bob@Example.com\n"
                                 b"Received: "), f"head {got[:120]!r}")
            check(got.endswith(body.replace(b"\r\n", b"\n")),
                  "body (LF line ends) differs")
            check(b"\r" not in got, "CR left in a Maildir file")
    finally:
        import shutil
        shutil.rmtree(cwd, ignore_errors=True)


def case_mailbox_spellings():
    """Spellings the SMTP engine takes for one mailbox land in that one:
    "example.com." (it went to the default route, here another root),
    "bob" quoted, and a bare <postmaster> (bounced 5.1.3, domain empty)
    at the first accepted domain. A configured root that is missing is
    never made (an unmounted filesystem): its mail is deferred."""
    tmp = tempfile.mkdtemp(prefix="fdtest-roots-")
    try:
        routed = os.path.join(tmp, "routed")
        os.mkdir(routed)
        absent = os.path.join(tmp, "absent")
        with Daemon("--route", f"example.com=maildir:{routed}",
                    "--route", f"other.test=maildir:{absent}",
                    delivery=True,
                    domains=("example.com", "other.test")) as d:
            check(not os.path.exists(absent), "a configured root was made")
            d.wait_log(r"event=maildir_root_missing path=" +
                       re.escape(absent), 5)
            q1 = send(d, "a@example.com", ["bob@example.com."], message(1))
            q2 = send(d, "a@example.com", ['"bob"@example.com'], message(2))
            q3 = send(d, "a@example.com", ["postmaster"], message(3))
            q4 = send(d, "a@example.com", ["x@other.test"], message(4))
            for q in (q1, q2, q3):
                wait(lambda: log_count(d, rf"{q} event=delivery "
                                          r".*status=sent"), 20,
                     f"{q} delivered")
            check(len(maildir_files(routed, "bob@example.com")) == 2,
                  f"bob: {os.listdir(os.path.join(routed, 'example.com'))}")
            check(len(maildir_files(routed, "postmaster@example.com")) == 1,
                  "postmaster")
            check(sorted(os.listdir(os.path.join(routed, "example.com"))) ==
                  ["bob", "postmaster"], "other mailboxes made")
            wait(lambda: log_count(d, rf"{q4} event=delivery "
                                      r".*status=deferred"), 20,
                 "deferred while the root is missing")
            check(not os.path.exists(absent), "the root was made later")
            check(count_files(d.tmp + "/maildir") == 0,
                  "mail in the relay's Maildir")
            check(log_count(d, r"status=bounced") == 0, "a bounce")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def case_routes_without_relay_cover_every_domain():
    """With --route and no --relay, an accepted domain without a route is
    a configuration error (its mail went to ./var/maildir, relative to
    wherever the daemon was started)."""
    tmp = tempfile.mkdtemp(prefix="fdtest-cfg-")
    try:
        r = subprocess.run(
            [FINALDOT, "--check-config", "--spool", tmp + "/spool",
             "--accept-domain", "example.com", "--accept-domain",
             "other.test", "--route", f"example.com=maildir:{tmp}"],
            capture_output=True, text=True, timeout=30)
        out = r.stdout + r.stderr
        check(r.returncode != 0, f"accepted: {out}")
        check("other.test has no --route" in out, f"why: {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def seg_files(d):
    return glob.glob(os.path.join(d.spool, "w*", "*.seg"))


def case_reclaim_and_restart():
    args = ["--segment-size", "1M", "--batch-size", "64k",
            "--spare-segments", "1", "--dlog-rotate", "64k"]
    with Daemon(*args, threads=2, delivery=True) as d:
        root = os.path.join(d.tmp, "maildir")
        n_clients, per = 4, 120

        def client(k):
            s = smtplib.SMTP("127.0.0.1", d.port, timeout=30)
            for i in range(per):
                s.sendmail("a@example.com", [f"u{k}@example.com"],
                           message(k * 1000 + i, size=8000))
            s.quit()

        ts = [threading.Thread(target=client, args=(k,))
              for k in range(n_clients)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        total = n_clients * per
        wait(lambda: count_files(root) >= total, 60, f"{total} deliveries")
        check(count_files(root) == total, f"{count_files(root)} files")
        # ~4 MB through 1 MiB segments: most were filled, sealed and
        # handed back; the spool keeps only what is in use and the spares.
        wait(lambda: log_count(d, r"event=segment_reclaimed") >= 3, 20,
             "segments reclaimed")
        check(log_count(d, r"kept=deleted") >= 1 or
              log_count(d, r"kept=reserve") >= 1, "no reclaim kept/deleted")
        peak = int(d.read_log().count("event=segment_open")) + \
            log_count(d, r"event=segment_switch")
        now = len(seg_files(d))
        # per worker: active + 1 ready + 1 reserve at most
        check(now <= 2 * 3, f"{now} segment files after the burst "
              f"({peak} segments used)")
        check(log_count(d, r"event=dlog_checkpoint messages=\d+ err=0") >= 1,
              "the delivery log was never compacted")
        check(d.stop() == 0, "clean stop")
        before = count_files(root)
        # Restart: the log (compacted) says everything is delivered.
        d.start()
        time.sleep(2)
        check(count_files(root) == before,
              f"redelivered after restart: {count_files(root)} vs {before}")
        check(log_count(d, r"event=queue_rebuilt messages=0 ") >= 1 or
              log_count(d, r"status=sent") == total,
              "restart queued old mail")


def case_segments_forgotten():
    sink_bin, loadgen = os.environ.get("FD_SINK"), os.environ.get("FD_LOADGEN")
    if not sink_bin or not loadgen:
        skip("FD_SINK/FD_LOADGEN not set (tools not built)")
    sink, sport = start_sink(sink_bin)
    try:
        with Daemon("--segment-size", "1M", "--spare-segments", "1",
                    "--route", f"localhost=smtp:127.0.0.1:{sport}",
                    delivery=True) as d:
            def status():
                return json.loads(d.ctl("status", "--json")[1])["queue"]

            sent = r"event=delivery .*status=sent"
            n = 0
            for rnd in range(3):
                r = subprocess.run([loadgen, "--server",
                                    f"127.0.0.1:{d.port}", "--connections",
                                    "8", "--messages", "2500", "--size",
                                    "4096", "--pipelining"],
                                   capture_output=True, timeout=240)
                check(r.returncode == 0, f"fd-loadgen: {r.returncode}")
                n += 2500
                wait(lambda: log_count(d, sent) >= n, 120,
                     f"{n} deliveries")
                # ~11 MB a round through 1 MiB segments: a dozen are
                # filled, sealed, reclaimed and reused each round.
                wait(lambda: status()["segments"] <= 4, 20,
                     f"the queue manager knows <= 4 segments "
                     f"(round {rnd}: {status()})")
            used = log_count(d, r"event=segment_switch")
            check(used >= 30, f"only {used} segment switches: the case "
                  "shows nothing")
            print(f"ok: {used} segments used, {status()['segments']} known "
                  f"after {n} deliveries")
    finally:
        sink.terminate()
        sink.wait()


def case_recipients():
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("# valid recipients\nalice@example.com\n@dest.test\n")
        path = f.name
    try:
        with Daemon("--recipients", path,
                    domains=("example.com", "dest.test")) as d:
            s = smtplib.SMTP("127.0.0.1", d.port, timeout=10)
            s.ehlo("c.test")
            s.mail("x@example.org")
            for addr, want in (("alice@example.com", 250),
                               ("ALICE@EXAMPLE.COM", 250),
                               ("bob@example.com", 550),
                               ("anyone@dest.test", 250),
                               ("postmaster@example.com", 250)):
                code, msg = s.rcpt(addr)
                check(code == want, f"RCPT {addr}: {code} {msg!r}")
                if want == 550:
                    check(msg.startswith(b"5.1.1"), f"{addr}: {msg!r}")
            s.quit()
    finally:
        os.unlink(path)


def case_message_across_many_segments():
    """A 12 MB message through 1 MiB segments spans a dozen of them: it is
    queued, delivered intact, and only then are its segments given back
    (the tailer once gave up on messages spanning more than 8 and the
    acknowledged message was lost)."""
    with Daemon("--segment-size", "1M", "--batch-size", "64k",
                "--max-message-size", "32M", delivery=True) as d:
        line = b"0123456789" * 7 + b"\r\n"
        body = b"Subject: big\r\n\r\n" + line * (12 * 1024 * 1024 // 72)
        send(d, "a@example.com", ["big@example.com"], body)
        root = os.path.join(d.tmp, "maildir")
        files = wait(lambda: maildir_files(root, "big@example.com"), 60,
                     "the 12 MB message delivered")
        with open(files[0], "rb") as f:
            got = f.read()
        check(got.endswith(body.replace(b"\r\n", b"\n")),
              f"12 MB body differs ({len(got)} bytes)")
        check(log_count(d, r"event=message_broken") == 0, "message_broken")


def case_readers_leave_atime():
    with Daemon(delivery=True) as d:
        old = 1700000000 * 10**9
        segs = seg_files(d)
        check(segs, "no segment files")
        for p in segs:
            st = os.stat(p)
            os.utime(p, ns=(old, st.st_mtime_ns))
        # The control: under relatime a plain read now moves atime (it
        # is older than mtime); where it does not (noatime) there is
        # nothing to show.
        probe = os.path.join(d.tmp, "atime-probe")
        with open(probe, "wb") as f:
            f.write(b"x")
        os.utime(probe, ns=(old, old + 3600 * 10**9))
        with open(probe, "rb") as f:
            f.read()
        if os.stat(probe).st_atime_ns == old:
            print("skip: atime is not updated on read here (noatime)")
            sys.exit(77)
        root = os.path.join(d.tmp, "maildir")
        for i in range(20):
            send(d, "a@example.com", [f"r{i}@example.com"], message(i))
        wait(lambda: count_files(root) >= 20, 30, "20 deliveries")
        for p in segs:
            st = os.stat(p)
            if st.st_mtime_ns > old:
                check(st.st_atime_ns == old,
                      f"{os.path.basename(p)}: atime moved "
                      f"({st.st_atime_ns} after {old}): a reader "
                      "without O_NOATIME")


def thread_nice(pid):
    """{thread name: [nice values]} of the process's threads."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read()
        except FileNotFoundError:
            continue  # a thread that just ended
        name = st[st.index("(") + 1:st.rindex(")")]
        fields = st[st.rindex(")") + 2:].split()
        out.setdefault(name, []).append(int(fields[16]))  # field 19
    return out


def case_delivery_nice():
    own = os.getpriority(os.PRIO_PROCESS, 0)
    check(own <= 12, f"the test runs at nice {own}: no room to show 7")
    with Daemon("--delivery-nice", "7", "--delivery-threads", "3",
                delivery=True) as d:
        root = os.path.join(d.tmp, "maildir")
        send(d, "a@example.com", ["n@example.com"], message(1))
        wait(lambda: count_files(root) >= 1, 30, "the delivery")
        tn = thread_nice(d.proc.pid)
        want = own + 7
        check(tn.get("fd-deliver") == [want] * 3,
              f"delivery threads at {tn.get('fd-deliver')}, want {want}")
        check(tn.get("fd-dlog") == [want], f"fd-dlog at {tn.get('fd-dlog')}")
        for name in ("fd-worker0", "fd-qmgr"):
            check(tn.get(name) and set(tn[name]) == {own},
                  f"{name} at {tn.get(name)}, "
                  f"want {own} (only delivery yields)")
    with Daemon(delivery=True) as d:
        tn = thread_nice(d.proc.pid)
        check(tn.get("fd-deliver") and set(tn["fd-deliver"]) == {own},
              f"default: delivery threads at {tn.get('fd-deliver')}")


def case_ids_past_the_delivery_log():
    """Message ids after a restart are past every id the delivery log
    names, also with the clock stepped back (a test build's
    FINALDOT_MSGID_SKEW_S). Once a delivered message's segments are
    reclaimed its id is on no disk, but its DELIVERED record stays in the
    log until a checkpoint: ids were seeded from the spool scan alone, so a
    new message could get an old one's id and be taken as delivered at the
    next replay."""
    with Daemon("--segment-size", "1M", "--spare-segments", "1",
                delivery=True) as d:
        ids = [send(d, "a@example.com", [f"u{i}@example.com"],
                    message(i, 60000)) for i in range(40)]
        wait(lambda: log_count(d, r"event=delivery .*status=sent") >= 40,
             60, "40 deliveries")
        check(d.stop() == 0, "clean stop")
        # The next run gives the last segment back: run 1's ids are on no
        # disk now, only in the delivery log.
        d.start()
        d.wait_log(r"event=segment_reclaimed", 30)
        check(d.stop() == 0, "clean stop")
        d.env["FINALDOT_MSGID_SKEW_S"] = "-3600"
        d.start()
        qid = send(d, "a@example.com", ["later@example.com"], message(99))
        newest = max(int(i, 16) for i in ids)
        check(int(qid, 16) > newest,
              f"new id {qid} not past the log's {newest:016X}")
        check("event=msgid_seed_raised" in d.read_run_log(),
              "no msgid_seed_raised line")


def case_delivery_log_missing():
    """A spool with mail and no delivery log (deleted, lost) is reported
    as damage at the start, and its mail queued again: delivering twice
    is better than losing. It started a new log without a word."""
    with Daemon() as d:  # delivery off: the mail stays queued
        for i in range(2):
            send(d, "a@example.com", [f"u{i}@example.com"], message(i))
        check(d.stop() == 0, "clean stop")
        shutil.rmtree(os.path.join(d.spool, "dlog"))
        d.start()
        d.wait_log(r"event=damage what=delivery_log_missing .*messages=2",
                   10)
        q = json.loads(d.ctl("status", "--json")[1])["queue"]
        check(q["queued"] == 2, f"queue after the start: {q}")


CASES = [case_default_route, case_reclaim_and_restart,
         case_segments_forgotten, case_recipients,
         case_message_across_many_segments, case_readers_leave_atime,
         case_delivery_nice, case_ids_past_the_delivery_log,
         case_delivery_log_missing, case_mailbox_spellings,
         case_routes_without_relay_cover_every_domain]

if __name__ == "__main__":
    run_cases(CASES)
