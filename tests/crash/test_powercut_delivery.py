#!/usr/bin/python3
"""Power cuts during delivery (issue 10): the daemon runs with its spool,
its delivery log (SPOOL/dlog) and its Maildir route all on fdpowerfs
(tests/crash/powercut/fdpowerfs.c, docs/powercut.md), delivering while
clients send. Each round: load from several clients recording every body
sent and every 250, kill -9 at a random moment, cut the power (drop, or
keep a random subset of the unflushed 512-byte / 4 KiB sectors), mount
what survived, and check

  (3) before the restart: every recipient the surviving delivery log
      records as DELIVERED has its file in new/ (the daemon will never
      deliver it again: a missing file is a message lost);

then restart the daemon on it, let it drain the queue, and check

  (1) every acknowledged message is in each of its recipients' new/ at
      least once, byte-identical after the Return-Path, Delivered-To and
      Received headers (CRLF as LF, the Maildir convention); copies beyond
      the first are no more than the attempts the restarts reported as
      possibly in flight (event=queue_rebuilt possible_duplicates=N,
      counted per message: a message's recipients share an attempt);
  (2) every file in new/ is complete: it parses and its body is one the
      clients sent (a message written but not yet durable must be absent,
      never truncated); files left in tmp/ are allowed (Maildir) and
      counted.

Usage: test_powercut_delivery.py [ROUNDS] [SEED] [--mutant SPEC]
  --mutant SPEC   run with FINALDOT_DELIVERY_FAULT=SPEC (no-maildir-fsync,
                  no-maildir-dirsync, no-dlog-sync: a durability point of
                  delivery removed) and PASS only if the loop detects it.
Environment: FDPOWERFS (the simulator binary), FINALDOT, FINALDOTCTL;
FDPOWERCUT_KEEP=1 keeps the image of a failed run for a post-mortem.
Exits 0 pass, 1 fail, 77 skip (no FUSE, no simulator, no seam)."""
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                "integration"))
import crashload  # noqa: E402
from fdtest import CRLF, FINALDOTCTL, Daemon, check, fail  # noqa: E402
from powerfs import PowerFS, loop_args, need_powerfs  # noqa: E402

ROUNDS, SEED, MUTANT = loop_args()
CLIENTS = 6
WORKERS = 2
MODES = ("drop", "torn512", "torn4k")
DOMAIN = "example.com"
# Even clients send to one recipient, odd ones to two: the delivery log
# counts recipients by their index in the envelope.
ENVELOPES = (("u@" + DOMAIN,), ("u@" + DOMAIN, "v@" + DOMAIN))
TAG = re.compile(rb"Subject: (r\d+c\d+-\d+)\n")
RECEIVED_ID = re.compile(rb" id ([0-9A-F]{16})[;\n]")


# ---- the delivery log, read as the daemon's replay would -----------------
# (docs/delivery-log.md: little-endian, CRC32C seeded with the file's salt)

def _crc_table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


CRC_T = _crc_table()


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    t = CRC_T
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


DLOG_DELIVERED = 2
DLOG_TYPES = set(range(1, 13)) | {64, 65}


def dlog_header(data):
    """(salt, where records start) from the first readable header copy,
    or None. Copy 1 sits at 64 in a version 1 file, at 4096 in a
    version 2 one; records start at 128 and 8192."""
    for at, want in ((0, None), (64, 1), (4096, 2)):
        h = data[at:at + 64]
        if len(h) < 64 or h[:4] != b"FDLH":
            continue
        ver, hlen = struct.unpack_from("<HH", h, 4)
        if ver not in (1, 2) or (want and ver != want) or hlen != 64 or \
                struct.unpack_from("<I", h, 60)[0] != crc32c(h[:60]):
            continue
        return struct.unpack_from("<Q", h, 32)[0], (128 if ver == 1
                                                    else 8192)
    return None


def dlog_record(data, pos, salt):
    """(type, rcpt, msgid, size) of a valid record at pos, or None."""
    h = data[pos:pos + 56]
    if len(h) < 56 or h[:4] != b"FDDL" or h[4] != 1 or \
            h[5] not in DLOG_TYPES:
        return None
    tlen = struct.unpack_from("<H", h, 6)[0]
    need = 56 + ((tlen + 7) & ~7)
    if tlen > 1024 or h[52:56] != b"\0" * 4 or pos + need > len(data) or \
            any(data[pos + 56 + tlen:pos + need]):
        return None
    text = data[pos + 56:pos + 56 + tlen]
    if struct.unpack_from("<I", h, 8)[0] != crc32c(
            struct.pack("<Q", salt) + h[:8] + b"\0" * 4 + h[12:] + text):
        return None
    rcpt, msgid = struct.unpack_from("<IQ", h, 12)
    return h[5], rcpt, msgid, need


def dlog_delivered(dirpath):
    """{(message id, recipient index)} of every DELIVERED record in any
    readable log file: damage is skipped the way the replay resynchronises
    (the next 8-aligned offset where a valid record starts). Every such
    record was appended after its Maildir delivery returned, so its file
    must be durable, whether or not the record itself was flushed."""
    out = set()
    if not os.path.isdir(dirpath):
        return out
    for name in sorted(os.listdir(dirpath)):
        if not name.endswith(".log"):
            continue
        with open(os.path.join(dirpath, name), "rb") as f:
            data = f.read()
        hdr = dlog_header(data)
        if hdr is None:
            continue
        salt, pos = hdr
        while pos + 56 <= len(data):
            rec = dlog_record(data, pos, salt)
            if rec:
                if rec[0] == DLOG_DELIVERED:
                    out.add((f"{rec[2]:016X}", rec[1]))
                pos += rec[3]
                continue
            pos = data.find(b"FDDL", pos + 8)
            while pos >= 0 and pos % 8:
                pos = data.find(b"FDDL", pos + 1)
            if pos < 0:
                break
    return out


# ---- Maildir --------------------------------------------------------------

def parse_mail(data):
    """(spool id, Delivered-To, body) of a Maildir file as finaldot writes
    it (Return-Path, Delivered-To, its Received header, the message, LF
    line ends), or None if it does not parse (truncated)."""
    rest, dto = data, None
    for name in (b"Return-Path: ", b"Delivered-To: "):
        end = rest.find(b"\n")
        if not rest.startswith(name) or end < 0:
            return None
        if name == b"Delivered-To: ":
            dto = rest[len(name):end].decode(errors="replace")
        rest = rest[end + 1:]
    if not rest.startswith(b"Received: "):
        return None
    end = rest.find(b"\n")
    while end >= 0 and rest[end + 1:end + 2] in (b" ", b"\t"):
        end = rest.find(b"\n", end + 1)
    if end < 0:
        return None
    m = RECEIVED_ID.search(rest[:end + 1])
    if not m:
        return None
    return m.group(1).decode(), dto, rest[end + 1:]


class Mail:
    """What the Maildir holds: complete files per (spool id, address),
    the tag of each id, what is wrong, what tmp/ holds."""

    def __init__(self, root, sent):
        self.files = {}   # (id, addr) -> complete copies
        self.tag = {}     # id -> tag
        self.bad = []     # incomplete or foreign files in new/
        self.tmp = 0
        if not os.path.isdir(root):
            return
        for dom in sorted(os.listdir(root)):
            for user in sorted(os.listdir(os.path.join(root, dom))):
                box = os.path.join(root, dom, user)
                self.tmp += len(os.listdir(os.path.join(box, "tmp")))
                for name in os.listdir(os.path.join(box, "new")):
                    self.add(os.path.join(box, "new", name),
                             f"{user}@{dom}", sent)

    def add(self, path, addr, sent):
        with open(path, "rb") as f:
            data = f.read()
        p = parse_mail(data)
        t = TAG.match(p[2]) if p else None
        want = sent.get(t.group(1).decode()) if t else None
        if not p or p[1] != addr or want is None or \
                p[2] != want.replace(CRLF, b"\n"):
            self.bad.append(f"{path} ({len(data)} bytes"
                            f"{'' if p else ', does not parse'})")
            return
        key = (p[0], addr)
        self.files[key] = self.files.get(key, 0) + 1
        self.tag[p[0]] = t.group(1).decode()


def envelope_of_tag(tag):
    """The recipients of message tag rRcC-N: client C's."""
    return ENVELOPES[int(re.match(r"r\d+c(\d+)-", tag).group(1)) % 2]


def client(port, tag, rcpts, rng, sent, acked, stop):
    """SMTP in a loop: every body sent goes into sent (tag -> body), every
    250 into acked as (id, tag)."""
    def body(n):
        size = rng.choice([10, 300, 5000, 30000])
        name = f"{tag}-{n}"
        text = (f"{name}-".encode() * (size // 10 + 1))[:size]
        b = (f"Subject: {name}\r\n\r\n".encode() + crashload.lines(text) +
             CRLF)
        sent[name] = b
        return name, b

    def seen(name, _, r):
        if r.startswith(b"250 2.0.0 Ok: queued as "):
            acked.append((r.split()[-1].decode(), name))
        # Paced to what Maildir delivery on fdpowerfs (one thread) keeps
        # up with: unpaced, the spool takes in ten times what is
        # delivered and a cut finds hardly any delivery in flight.
        time.sleep(rng.uniform(0, 0.02))

    crashload.client(port, stop, body, seen,
                     rcpt=[a.encode() for a in rcpts])


def queue_counts(ctl):
    out = subprocess.run([FINALDOTCTL, "--control", ctl, "status", "--json"],
                         capture_output=True, timeout=30)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)["queue"]


def drain(d, ctl, timeout=90):
    """Wait until the queue holds nothing to deliver."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        q = queue_counts(ctl)
        if q and q["queued"] + q["active"] + q["deferred"] + q["held"] == 0:
            return
        if d.proc.poll() is not None:
            fail(f"finaldot exited while draining:\n{d.read_log()[-3000:]}")
        time.sleep(0.1)
    fail(f"the queue did not drain in {timeout}s: {queue_counts(ctl)}")


def main():
    need_powerfs(MUTANT)
    rng = random.Random(SEED)
    print(f"powercut delivery: {ROUNDS} rounds, seed {SEED}, "
          f"mutant {MUTANT or 'none'}", flush=True)
    work = tempfile.mkdtemp(prefix="fdpowercut-dlv-")
    fs = PowerFS(work)
    ctl = os.path.join(work, "ctl.sock")
    sent, acked, cuts = {}, [], []
    found = []  # what went wrong: a failure, or a mutant caught
    possible = dups = logged = 0
    env = {"FINALDOT_DELIVERY_FAULT": MUTANT} if MUTANT else None

    def wrong(what):
        found.append(what)
        if not MUTANT:
            fail(what)

    try:
        fs.mount()
        root = os.path.join(fs.mnt, "maildir")
        os.mkdir(root)  # a configured root is never made by finaldot
        with Daemon("--segment-size", "2M", "--batch-size", "64k",
                    "--control", ctl, "--relay", f"maildir:{root}",
                    "--retry-min", "1s", "--retry-max", "2s",
                    "--dlog-rotate", "256k",
                    threads=WORKERS, spool=os.path.join(fs.mnt, "spool"),
                    delivery=True, domains=(DOMAIN,), env=env) as d:
            for rnd in range(ROUNDS):
                stop = threading.Event()
                threads = [threading.Thread(
                    target=client,
                    args=(d.port, f"r{rnd}c{i}", ENVELOPES[i % 2],
                          random.Random(rng.random()), sent, acked, stop),
                    daemon=True)
                    for i in range(CLIENTS)]
                for t in threads:
                    t.start()
                time.sleep(rng.uniform(0.5, 1.5))
                phase = "load"
                if rng.random() < 0.5:
                    # The cut in the middle of delivery alone: the
                    # clients stop first, the queue drains meanwhile.
                    phase = "delivery"
                    stop.set()
                    for t in threads:
                        t.join(10)
                    time.sleep(rng.uniform(0.05, 0.5))
                d.kill9()
                stop.set()
                for t in threads:
                    t.join(10)
                st = fs.stats()
                if rnd == 0 and not MUTANT:
                    # Trust the simulator only if the durability points
                    # delivery relies on reached it (docs/powercut.md).
                    check(int(st["fsyncs"]) > 0 and
                          int(st["fdatasyncs"]) > 0 and
                          int(st["links"]) > 0,
                          f"no Maildir delivery reached fdpowerfs: {st}")
                # The first cut drops everything unflushed: what the first
                # start made (the Maildir root, the delivery log's
                # directory) must already be durable.
                mode = "drop" if rnd == 0 else rng.choice(MODES)
                cseed = rng.randrange(1 << 32)
                fs.cut(mode, cseed)
                cuts.append(mode)
                fs.mount()

                # (3) what the surviving log says is delivered is there.
                delivered = dlog_delivered(os.path.join(fs.mnt, "spool",
                                                        "dlog"))
                logged += len(delivered)
                mail = Mail(root, sent)
                ids = dict(acked)
                gone = []
                for mid, k in sorted(delivered):
                    tag = ids.get(mid) or mail.tag.get(mid)
                    env_ = envelope_of_tag(tag) if tag else ()
                    if k >= len(env_) or not mail.files.get((mid, env_[k])):
                        gone.append(f"{mid}/{k}")
                if gone:
                    wrong(f"round {rnd}: {len(gone)} recipients the "
                          f"delivery log records as delivered have no "
                          f"complete file after a {mode} cut, e.g. "
                          f"{gone[:5]}")

                d.start()  # on what survived
                d.wait_log(r"event=queue_rebuilt ", 10)
                m = re.findall(r"event=queue_rebuilt .*"
                               r"possible_duplicates=(\d+)",
                               d.read_run_log())
                check(m, "no queue_rebuilt line after the restart")
                possible += int(m[-1])
                t0 = time.time()
                drain(d, ctl)
                t_drain = time.time() - t0

                # (1) and (2), after the drain.
                mail = Mail(root, sent)
                lost, per_msg = [], {}
                for mid, tag in acked:
                    for a in envelope_of_tag(tag):
                        n = mail.files.get((mid, a), 0)
                        if n == 0:
                            lost.append(f"{mid}({tag})->{a}")
                for (mid, _), n in mail.files.items():
                    per_msg[mid] = max(per_msg.get(mid, 0), n - 1)
                dups = sum(per_msg.values())
                print(f"round {rnd}: killed in {phase}, cut={mode} "
                      f"seed={cseed} "
                      f"acknowledged={len(acked)} "
                      f"delivered={len(per_msg)} "
                      f"files={sum(mail.files.values())} "
                      f"duplicates={dups} possible={possible} "
                      f"tmp={mail.tmp} incomplete={len(mail.bad)} "
                      f"dlog_delivered={len(delivered)} "
                      f"dlog_lost={len(gone)} lost={len(lost)} "
                      f"drain={t_drain:.1f}s", flush=True)
                if mail.bad:
                    wrong(f"round {rnd}: {len(mail.bad)} files in new/ "
                          f"are not a complete message: {mail.bad[:3]}")
                if lost:
                    wrong(f"round {rnd}: {len(lost)} acknowledged "
                          f"deliveries missing after a {mode} cut and the "
                          f"drain, e.g. {lost[:5]}")
                if dups > possible:
                    wrong(f"round {rnd}: {dups} duplicate deliveries but "
                          f"only {possible} attempts in flight reported")
                if found:
                    break  # a mutant caught: enough
            check(d.stop() == 0, "clean stop")
        fs.unmount()
    finally:
        fs.cleanup()
        if found and os.environ.get("FDPOWERCUT_KEEP"):
            print(f"kept {work}: mount {fs.img} with fdpowerfs to look")
        else:
            shutil.rmtree(work, ignore_errors=True)
    check(len(acked) > 0, "some messages were acknowledged")
    if MUTANT:
        check(found, f"mutant {MUTANT}: {len(acked)} acknowledged, "
              f"nothing wrong found after {len(cuts)} power cuts: the "
              "loop did not catch the missing durability")
        print(f"ok: mutant {MUTANT} caught: " + "; ".join(found))
        return
    check(logged > 0, "no DELIVERED record survived any cut: check (3) "
          "saw nothing")
    print(f"ok: rounds={ROUNDS} acknowledged={len(acked)} lost=0 "
          f"duplicates={dups} possible={possible} "
          f"dlog_delivered={logged} cuts={','.join(cuts)}")


main()
