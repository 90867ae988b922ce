"""Helpers shared by the delivery tests: send a message through a running
finaldot with smtplib, find what a Maildir holds, wait for log lines."""
import os
import re
import signal
import smtplib
import sys
import time

from fdtest import check, fail


def reload(d, conf, text, logged=r"event=reloaded route_gen="):
    """Write text to the config file conf, SIGHUP daemon d, and wait (10 s
    at most) until this run logs `logged` after it: the reload applied."""
    with open(conf, "w") as f:
        f.write(text)
    n = len(d.read_run_log())
    os.kill(d.proc.pid, signal.SIGHUP)
    deadline = time.time() + 10
    while time.time() < deadline:
        if re.search(logged, d.read_run_log()[n:]):
            return
        time.sleep(0.05)
    check(False, f"no /{logged}/ after the reload")


def send(d, sender, rcpts, body, mail_options=(), rcpt_options=()):
    """One message through daemon d; returns its queue id."""
    s = smtplib.SMTP("127.0.0.1", d.port, timeout=30)
    try:
        s.ehlo("client.test")
        s.mail(sender, list(mail_options))
        for r in rcpts:
            code, msg = s.rcpt(r, list(rcpt_options))
            check(code == 250, f"RCPT {r}: {code} {msg!r}")
        code, msg = s.data(body)
        check(code == 250, f"DATA: {code} {msg!r}")
        m = re.search(rb"queued as ([0-9A-F]{16})", msg)
        check(m is not None, f"no queue id in {msg!r}")
        s.quit()
        return m.group(1).decode().lower()
    finally:
        s.close()


def message(n, size=2000, subject="test"):
    """A message with CRLF line ends, a unique Message-ID, lines that
    start with a dot (transparency), and roughly `size` body bytes."""
    lines = ["From: a@example.com", "To: b@dest.test",
             f"Subject: {subject} {n}",
             f"Message-ID: <m{n}.{time.time_ns()}@client.test>", ""]
    body = []
    i = total = 0
    while total < size:  # (a running total: summing each time was
        # quadratic, two minutes for 5 MiB)
        body.append(("." if i % 7 == 0 else "") + f"line {i} of {n} " +
                    "x" * 50)
        total += len(body[-1]) + 2
        i += 1
    return ("\r\n".join(lines + body) + "\r\n").encode()


def maildir_files(root, addr):
    """Files in the Maildir finaldot writes for addr under root."""
    local, dom = addr.lower().rsplit("@", 1)
    new = os.path.join(root, dom, local, "new")
    try:
        return sorted(os.path.join(new, f) for f in os.listdir(new))
    except FileNotFoundError:
        return []


def wait(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    fail(f"timed out after {timeout}s waiting for {what}")


def settled_log(d, quiet=0.05, timeout=3.0):
    """The daemon's log once it stopped growing for `quiet` seconds: log
    lines are written by a writer thread every few milliseconds, so an
    event that is visible elsewhere (a file delivered) may not be in the
    log yet."""
    deadline = time.time() + timeout
    text = d.read_log()
    while time.time() < deadline:
        time.sleep(quiet)
        again = d.read_log()
        if again == text:
            break
        text = again
    return text


def log_count(d, pattern):
    return len(re.findall(pattern, settled_log(d)))


def strip_our_received(raw):
    """The message as the client sent it, from what a next hop received
    from us: our Received header (with its continuation lines) removed."""
    lines = raw.split(b"\r\n")
    check(lines[0].startswith(b"Received: "), f"no Received first: {raw[:80]!r}")
    i = 1
    while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


def run_cases(cases):
    """A test script's main: each case in order (only those named on the
    command line, if any; --part=K/N: every N-th from the K-th, so that
    the suite can run a long script as N tests side by side), a line
    before and after each."""
    part = [a for a in sys.argv[1:] if a.startswith("--part=")]
    only = [a for a in sys.argv[1:] if not a.startswith("--part=")]
    k, n = (int(x) for x in part[-1][7:].split("/")) if part else (1, 1)
    unknown = set(only) - {c.__name__ for c in cases}
    if unknown:  # a misspelt name ran nothing and said ok
        print(f"no such case: {', '.join(sorted(unknown))}", flush=True)
        sys.exit(2)
    for i, c in enumerate(cases):
        if only and c.__name__ not in only:
            continue
        if i % n != k - 1:
            continue
        print(f"# {c.__name__}", flush=True)
        t0 = time.monotonic()
        c()
        print(f"ok: {c.__name__} ({time.monotonic() - t0:.1f} s)",
              flush=True)
    print("ok")


# RCPT TO probes against a daemon (recipient validation):
def rcpt(port, addr):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("sender@client.test")
        code, msg = s.rcpt(addr)
        s.rset()
    return code, msg.decode()


def until(port, addr, code, timeout=10):
    """RCPT again until the answer is code (the probe came back)."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = rcpt(port, addr)
        if last[0] == code:
            return last
        time.sleep(0.1)
    check(False, f"{addr}: still {last} after {timeout}s, expected {code}")
