#!/usr/bin/python3
"""Postfix's smtp-source: 32 parallel sessions, many messages each, a known
pre-formatted message (-F). Every accepted message is in the spool,
byte-identical after the Received header. Run against 1 and 2 workers."""
import os
import shutil
import subprocess

from fdtest import CRLF, Daemon, check, skip, strip_received

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SESSIONS = 32
MESSAGES = 640

def main():
    if not os.access(SMTP_SOURCE, os.X_OK):
        skip("smtp-source (postfix) is not installed")
    for threads in (1, 2):
        with Daemon(threads=threads) as d:
            msgfile = os.path.join(d.tmp, "message.txt")
            lines = [b"From: load@client.test", b"To: user@example.com",
                     b"Subject: smtp-source load", b""]
            lines += [b"line %04d " % i + b"y" * 60 for i in range(200)]
            lines += [b".starts with a dot", b"..two", b"last"]
            with open(msgfile, "wb") as f:
                f.write(b"\n".join(lines) + b"\n")
            # smtp-source -F sends each line with CRLF, then one empty
            # line of its own before the final dot.
            want = CRLF.join(lines) + CRLF + CRLF
            r = subprocess.run(
                [SMTP_SOURCE, "-s", str(SESSIONS), "-m", str(MESSAGES), "-d",
                 "-f", "load@client.test", "-t", "user@example.com",
                 "-M", "client.test", "-F", msgfile,
                 f"127.0.0.1:{d.port}"], capture_output=True, timeout=300)
            check(r.returncode == 0,
                  f"smtp-source failed: {r.stderr.decode()[-2000:]}")
            check(d.stop() == 0, "clean exit")
            st = d.stats()
            check(int(st["messages"]) == MESSAGES,
                  f"daemon committed {st.get('messages')} of {MESSAGES}")
            scan = d.scan()["messages"]
            check(len(scan) == MESSAGES,
                  f"spool holds {len(scan)} of {MESSAGES} messages")
            sums = {m["sha256"] for m in scan}
            # Bodies differ only by their Received header (id, date);
            # check every one byte for byte.
            stored = d.export()
            check(set(stored) == {m["id"] for m in scan},
                  "export and scan agree on the ids")
            for mid, data in stored.items():
                check(strip_received(data) == want, f"message {mid} differs")
            fpm = float(st["flushes_per_message"])
            print(f"ok: threads={threads} {MESSAGES} messages from "
                  f"{SESSIONS} sessions, flushes/message={fpm:.3f}, "
                  f"{len(sums)} distinct stored files")


main()
