#!/usr/bin/python3
"""swaks, a real SMTP client, plain and with --pipeline, and an 8-bit body;
the messages are in the spool byte-identical after the Received header."""
import shutil
import subprocess

from fdtest import Daemon, check, skip, strip_received

def swaks(port, *args):
    r = subprocess.run(["swaks", "--server", f"127.0.0.1:{port}",
                        "--helo", "swaks.test", "--from", "s@swaks.test",
                        *args], capture_output=True, timeout=60)
    out = r.stdout.decode("utf-8", "replace")
    check(r.returncode == 0, f"swaks {args} failed ({r.returncode}):\n{out}")
    ids = [l.split()[-1] for l in out.splitlines()
           if "Ok: queued as" in l]
    check(len(ids) == 1, f"one queued id in swaks output:\n{out}")
    return ids[0], out


def main():
    if not shutil.which("swaks"):
        skip("swaks is not installed")
    with Daemon() as d:
        body = "Subject: swaks\n\nline 1\n.dot line\nline 3\n"
        a, _ = swaks(d.port, "--to", "user@example.com", "--data", body)
        b, out = swaks(d.port, "--to", "user@example.com,x@localhost",
                       "--pipeline", "--data", body)
        check("PIPELINING" in out, "swaks saw PIPELINING advertised")
        c, _ = swaks(d.port, "--to", "user@example.com",
                     "--data", "Subject: 8bit\n\nK\u00e4se\n")
        # Refused relay: swaks exits non-zero on a rejected RCPT.
        r = subprocess.run(["swaks", "--server", f"127.0.0.1:{d.port}",
                            "--to", "victim@elsewhere.test", "--from",
                            "s@swaks.test"], capture_output=True, timeout=60)
        out = r.stdout.decode()
        check(r.returncode != 0 and "550 5.7.1" in out,
              f"relay attempt not refused:\n{out}")
        want = b"Subject: swaks\r\n\r\nline 1\r\n.dot line\r\nline 3\r\n\r\n"
        for mid in (a, b):
            got = strip_received(d.cat(mid))
            # swaks appends an empty line after --data's last newline.
            check(got in (want, want[:-2]), f"{mid}: {got!r}")
        got = strip_received(d.cat(c))
        check("K\u00e4se".encode() in got, f"8-bit body kept: {got!r}")
        ids = {m["id"] for m in d.scan()["messages"]}
        check(ids == {a, b, c}, f"spool ids {ids} vs {a, b, c}")
    print("ok: swaks plain, pipelined, 8bit; relay refused")


main()
