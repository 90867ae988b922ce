#!/usr/bin/python3
"""Power cut after a delivery into Maildir directories that existed but
were not durable (made by another program, or by a start or a delivery
that died before syncing their parents): finding a directory is not
knowing it durable. The daemon syncs what it found before it reports the
message delivered, so a cut right after the delivery keeps the mailbox
and the message (issue 10; docs/powercut.md).

Without the sync the cut takes back the directories, and with them a
message the delivery log records as delivered: lost for good.
Exits 0 pass, 1 fail, 77 skip (no FUSE, no simulator)."""
import os
import shutil
import smtplib
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                "integration"))
from fdtest import Daemon, check  # noqa: E402
from powerfs import PowerFS, need_powerfs  # noqa: E402

DOMAIN = "example.com"


def new_files(root, lp):
    d = os.path.join(root, DOMAIN, lp, "new")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def main():
    need_powerfs()
    work = tempfile.mkdtemp(prefix="fdpowercut-premade-")
    fs = PowerFS(work)
    try:
        fs.mount()
        # Two levels below the mount (nothing else the daemon syncs
        # holds it), made and never synced: all of it volatile.
        root = os.path.join(fs.mnt, "mail", "root")
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(root, DOMAIN, "u", sub))
        with Daemon("--relay", f"maildir:{root}",
                    spool=os.path.join(fs.mnt, "spool"), delivery=True,
                    domains=(DOMAIN,)) as d:
            s = smtplib.SMTP("127.0.0.1", d.port, timeout=30)
            body = b"Subject: premade\r\n\r\nkeep me\r\n"
            s.sendmail("a@client.test", ["u@" + DOMAIN], body)
            s.quit()
            d.wait_log(r"event=delivery .*status=sent", 20)
            check(len(new_files(root, "u")) == 1, "delivered before the cut")
            d.kill9()
            fs.cut("drop", 1)
        fs.mount()
        got = new_files(root, "u")
        check(len(got) == 1, f"after a drop cut the delivered message is "
              f"gone (new/ holds {got}): a directory found was taken "
              f"for durable")
        with open(os.path.join(root, DOMAIN, "u", "new", got[0]), "rb") as f:
            check(b"keep me" in f.read(), "the message is complete")
        fs.unmount()
    finally:
        fs.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print("ok: a delivery into unsynced, pre-made Maildir directories "
          "survives a power cut right after it")


main()
