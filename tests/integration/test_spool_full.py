#!/usr/bin/python3
"""A spool that fills its disk while the next hop is down gives the room
back once the next hop returns, without a restart.

The spool's filesystem is a small ext4 image (48 MiB) loop-mounted by the
test; the spool uses 1 MiB segments. The next hop is down while fd-loadgen
sends until the spool refuses (452 4.3.1); then fd-sink comes up on the
route's port and `queue flush` retries at once.

  - case_reserve: the spool stops short of its reserve (spool_min_free,
    here a tenth of the filesystem), so the delivery log, in the same
    spool directory, still has room to record the deliveries that free the
    disk: every accepted message is delivered, the spool shrinks, and new
    mail is taken again. Before the reserve the spool took the last block,
    the delivery log failed on its next growth and delivery stopped until
    a restart (with --spool-min-free 0 this case fails so).
  - case_log_waits: something else takes the reserve (a file filling the
    disk). The delivery log's batch then waits for room instead of failing
    for good: status says delivery is WAITING, /metrics says so too; once
    the file is deleted delivery goes on by itself and every message is
    delivered once.

Needs root (mount), mkfs.ext4 and loop devices; skips (77) without them.
"""
import json
import os
import re
import shutil
import smtplib
import subprocess
import tempfile
import time
import urllib.request

from delivtest import wait
from fdtest import Daemon, check, free_port, skip

FS_MIB = 48


class SmallFs:
    """A FS_MIB ext4 image loop-mounted at self.mnt; unmounted and removed
    on exit, also on failure."""

    def __enter__(self):
        if os.geteuid() != 0:
            skip("mounting a small filesystem needs root")
        mkfs = shutil.which("mkfs.ext4") or (
            "/sbin/mkfs.ext4" if os.path.exists("/sbin/mkfs.ext4") else None)
        if not mkfs:
            skip("no mkfs.ext4 (e2fsprogs)")
        self.dir = tempfile.mkdtemp(prefix="fdfull-", dir="/var/tmp")
        self.img = os.path.join(self.dir, "fs.img")
        self.mnt = os.path.join(self.dir, "mnt")
        os.mkdir(self.mnt)
        with open(self.img, "wb") as f:
            f.truncate(FS_MIB << 20)
        r = subprocess.run([mkfs, "-q", "-F", self.img], capture_output=True)
        if r.returncode != 0:
            shutil.rmtree(self.dir)
            skip(f"mkfs.ext4 failed: {r.stderr.decode().strip()}")
        r = subprocess.run(["mount", "-o", "loop", self.img, self.mnt],
                           capture_output=True)
        if r.returncode != 0:
            shutil.rmtree(self.dir)
            skip(f"cannot loop-mount an image here: "
                 f"{r.stderr.decode().strip()}")
        return self

    def avail(self):
        v = os.statvfs(self.mnt)
        return v.f_bavail * v.f_frsize

    def __exit__(self, *exc):
        for _ in range(50):
            if subprocess.run(["umount", self.mnt],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        return False


def tools():
    sink, loadgen = os.environ.get("FD_SINK"), os.environ.get("FD_LOADGEN")
    if not sink or not loadgen:
        skip("FD_SINK/FD_LOADGEN not set (tools not built)")
    return sink, loadgen


def log_count(d, pattern):
    return len(re.findall(pattern, d.read_log(), re.M))


def fill_spool(d, loadgen):
    """Send until the spool refuses; the number of messages it queued."""
    r = subprocess.run([loadgen, "--server", f"127.0.0.1:{d.port}",
                        "--connections", "16", "--messages", "20000",
                        "--size", "4096", "--allow-failures",
                        "--timeout", "20"], capture_output=True, timeout=300)
    check(r.returncode == 0, f"fd-loadgen: {r.returncode} "
          f"{r.stderr.decode()[-500:]}")
    # Every message answered: one whose END found no segment when room
    # ran out gets 452 at once, not silence until its data timeout
    # (fd-loadgen gave up at 20 s, counted as errors).
    m = re.search(r"errors (\d+)", r.stdout.decode())
    check(m and m.group(1) == "0",
          f"fd-loadgen: messages left unanswered: {r.stdout.decode()}")
    queued = log_count(d, r"event=queued")
    check(queued > 1000, f"only {queued} messages queued")
    check(log_count(d, r"452 4\.3\.1|spool_begin_failed err=-28") > 0 or
          "refused" in r.stdout.decode(),
          "the spool never refused: the disk was not filled")
    return queued


def status(d):
    return json.loads(d.ctl("status", "--json")[1])


def metrics(d):
    port = d.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                timeout=10) as r:
        return r.read().decode()


def start_daemon(fs, hop_port, *extra):
    # Retries every few seconds: each appends a record per queued message
    # while the next hop is down, and the test's reserve is only 4 MiB.
    return Daemon("--segment-size", "1M", "--retry-min", "3s",
                  "--retry-max", "6s", "--smtp-connect-timeout", "2s",
                  "--route", f"localhost=smtp:127.0.0.1:{hop_port}",
                  "--control", os.path.join(fs.dir, "control.sock"),
                  *extra, spool=os.path.join(fs.mnt, "spool"),
                  delivery=True)


def start_hop(sink_bin, port):
    p = subprocess.Popen([sink_bin, "--listen", f"127.0.0.1:{port}"],
                         stdout=subprocess.PIPE, text=True)
    return p


def stop_hop(p, queued):
    """Stop fd-sink; it must have taken each queued message once."""
    p.terminate()
    out, _ = p.communicate(timeout=20)
    got = json.loads(out)["messages"]
    check(got == queued, f"next hop got {got} of {queued}")


def drained(d, queued):
    q = status(d)["queue"]
    return (log_count(d, r"event=delivery .*status=sent") >= queued and
            q["queued"] == 0)


def case_reserve():
    sink_bin, loadgen = tools()
    with SmallFs() as fs:
        hop_port = free_port()
        with start_daemon(fs, hop_port, *EXTRA) as d:
            queued = fill_spool(d, loadgen)
            check(log_count(d, r"event=spool_min_free_reached") > 0,
                  "the spool did not stop at its reserve")
            left = fs.avail()
            check(left >= (FS_MIB << 20) // 20,
                  f"only {left} bytes left on the spool's filesystem")
            hop = start_hop(sink_bin, hop_port)
            try:
                d.ctl("queue", "flush")
                wait(lambda: drained(d, queued), 120,
                     f"{queued} messages delivered")
            finally:
                stop_hop(hop, queued)
            log = d.read_log()
            check("event=no_space" not in log and
                  "delivery_stopped" not in log,
                  "the delivery log ran out of room")
            st = status(d)
            check(st["delivery"]["log_error"] == 0, f"{st['delivery']}")
            # The room came back: new mail is taken again.
            wait(lambda: fs.avail() > left + (8 << 20), 30,
                 "the spool to give its segments back")
            s = smtplib.SMTP("127.0.0.1", d.port, timeout=30)
            s.sendmail("a@example.com", ["after@example.com"],
                       b"Subject: after\r\n\r\nroom again\r\n")
            s.quit()
            print(f"ok: {queued} queued on a full spool, all delivered, "
                  f"{left >> 10} KiB kept free, mail taken again")


def case_log_waits():
    sink_bin, loadgen = tools()
    with SmallFs() as fs:
        hop_port = free_port()
        mport = free_port()
        with start_daemon(fs, hop_port, "--metrics",
                          f"127.0.0.1:{mport}") as d:
            d.metrics_port = mport
            queued = fill_spool(d, loadgen)
            # Something else takes the reserve.
            filler = os.path.join(fs.mnt, "filler")
            with open(filler, "wb") as f:
                block = b"\xa5" * (64 << 10)
                try:
                    while True:
                        f.write(block)
                        f.flush()
                except OSError:
                    pass
            # The retries against the down next hop keep appending
            # deferrals until the log's preallocated room is used up.
            d.wait_log(r"dlog event=no_space", 90)
            hop = start_hop(sink_bin, hop_port)
            try:
                d.ctl("queue", "flush")
                # status is published four times a second
                wait(lambda: status(d)["delivery"]["log_no_space"] == 1, 10,
                     "status to say the delivery log waits for room")
                check("delivery WAITING" in d.ctl("status")[1],
                      "finaldotctl status does not say WAITING")
                check(re.search(r"^finaldot_delivery_log_no_space 1$",
                                metrics(d), re.M),
                      "/metrics: finaldot_delivery_log_no_space is not 1")
                # Nothing goes out without its attempt on record.
                time.sleep(2)
                sent = log_count(d, r"event=delivery .*status=sent")
                check(sent == 0, f"{sent} delivered while the log was full")
                os.unlink(filler)
                d.wait_log(r"dlog event=space_again", 30)
                wait(lambda: drained(d, queued), 120,
                     f"{queued} messages delivered after room came back")
            finally:
                stop_hop(hop, queued)
            log = d.read_log()
            check("delivery_stopped" not in log and
                  "dlog event=failed" not in log,
                  "the delivery log failed instead of waiting")
            wait(lambda: status(d)["delivery"]["log_no_space"] == 0, 10,
                 "status to say the delivery log has room again")
            check(status(d)["delivery"]["log_error"] == 0,
                  f"{status(d)['delivery']}")
            print(f"ok: the log waited for room, nothing went out, then "
                  f"all {queued} delivered once")


# tools/test mutant run: FD_SPOOL_FULL_EXTRA="--spool-min-free 0" makes
# case_reserve fail (the spool takes the delivery log's room).
EXTRA = tuple(os.environ.get("FD_SPOOL_FULL_EXTRA", "").split())

if __name__ == "__main__":
    case_reserve()
    case_log_waits()
    print("test_spool_full: ok")
