#!/usr/bin/python3
"""Issue 10: the spool attacked between two runs of the daemon.

  - one flipped or zeroed byte in a segment's header block: the next start
    must neither reuse the segment nor lose its messages (they were all
    overwritten before: 62-77 acknowledged messages per trial); recovery
    salvages them and says so (event=segment_damaged);
  - a copy of a segment file under another name: every message kept once
    (before, all of that segment's messages vanished from scan and
    recovery), the copy reported (event=segment_duplicate);
  - a segment file deleted: recovery names it (event=segment_missing).
Each case: messages with 250s, SIGTERM, the damage, a new start, more
messages, SIGTERM; then every message that got a 250 is in the spool."""
import os
import re
import shutil

from fdtest import Daemon, check, queued_id


def send(d, n, tag, size=300):
    ids = []
    c = d.connect()
    c.expect(220)
    c.cmd("EHLO dmg.test", 250)
    for i in range(n):
        c.cmd(f"MAIL FROM:<{tag}{i}@dmg.test>", 250)
        c.cmd("RCPT TO:<u@example.com>", 250)
        c.cmd("DATA", 354)
        line = (f"{tag}-{i} " * 20).encode()[:70] + b"\r\n"
        c.send(f"Subject: {tag} {i}\r\n\r\n".encode() +
               line * (size // len(line) + 1) + b".\r\n")
        ids.append(queued_id(c.expect(250)))
    c.cmd("QUIT", 221)
    c.close()
    return ids


def all_there(d, ids, what):
    got = [m["id"] for m in d.scan()["messages"]]
    missing = set(ids) - set(got)
    check(not missing, f"{what}: {len(missing)} of {len(ids)} acknowledged "
          f"messages lost")
    check(len(got) == len(set(got)), f"{what}: a message listed twice")


def header_damage(pos, zero):
    with Daemon() as d:
        first = send(d, 30, "a")
        check(d.stop() == 0, "clean stop")
        seg = os.path.join(d.spool, "w00", "00000000.seg")
        with open(seg, "r+b") as f:
            f.seek(pos)
            b = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([0 if zero and b else b ^ 0x08]))
        d.start()
        all_there(d, first, f"header byte {pos}, restarted")
        check(re.search(r"event=segment_damaged .*00000000", d.read_log()),
              "the damage is reported")
        second = send(d, 30, "b")
        check(d.stop() == 0, "clean stop")
        all_there(d, first + second, f"header byte {pos}")
        d.start()  # and once more: still recovered, still kept
        all_there(d, first + second, f"header byte {pos}, third start")


def copied_segment():
    with Daemon() as d:
        first = send(d, 20, "c")
        check(d.stop() == 0, "clean stop")
        w = os.path.join(d.spool, "w00")
        shutil.copyfile(os.path.join(w, "00000000.seg"),
                        os.path.join(w, "00000042.seg"))
        all_there(d, first, "finaldotctl spool scan with a copy")
        d.start()
        log = d.read_log()
        check(re.search(r"event=segment_duplicate .*00000042\.seg", log),
              "the copy is reported")
        check(re.search(r"event=recovered .* messages=20 ", log),
              "recovery counts each message once")
        second = send(d, 5, "d")
        check(d.stop() == 0, "clean stop")
        all_there(d, first + second, "after a copy")


def deleted_segment():
    # Small segments so that messages fill several files.
    with Daemon("--segment-size", "1M", "--batch-size", "64k") as d:
        ids = send(d, 60, "e", size=40000)
        check(d.stop() == 0, "clean stop")
        w = os.path.join(d.spool, "w00")
        segs = sorted(x for x in os.listdir(w) if x.endswith(".seg"))
        check(len(segs) >= 4, f"several segments: {segs}")
        victim = segs[1]
        os.unlink(os.path.join(w, victim))
        d.start()
        check(re.search(rf"event=segment_missing .*file={victim[:8]}",
                        d.read_log()),
              f"the deleted {victim} is named")
        check(d.stop() == 0, "clean stop")


# The epoch, the magic, the version (zeroed), the CRC.
for pos, zero in ((33, False), (1, False), (4, True), (61, True)):
    header_damage(pos, zero)
copied_segment()
deleted_segment()
print("ok: a damaged header byte loses nothing and is reported; a copied "
      "segment's messages are kept once; a deleted segment is named")
