#!/usr/bin/python3
"""fd-loadgen's TLS modes against the real daemon (tools/bench relies on
their counts being right, so they are checked here, not taken on trust).

One finaldot with an ECDSA P-256 pair made with the openssl CLI, then:

  messages   --starttls --pipelining, DATA and BDAT, 70,000-octet messages
             (each spans several staged TLS writes): every message
             accepted, exactly as many stored, each with a Received header
             "with ESMTPS" and, with its Date and Message-ID masked, byte
             for byte the message the plain path (sendmsg of the same
             segments, no staging) stored; one handshake per connection,
             TLS 1.3 and the EC key in the report, and the daemon logged as
             many tls_established lines.
  resume     --handshakes 5 --tls-resume on 3 slots: 15 handshakes, 3 full
             and 12 resumed, as the daemon's resumed=1 lines say too; the
             same without --tls-resume: all 15 full.
  version    --tls-version 1.2: the report and the daemon say TLSv1.2.
  hold       --hold on 20 sessions: "holding 20" on stderr, nothing queued,
             SIGTERM ends it with 20 QUITs and exit 0, held 20.
  no-tls     a daemon without a certificate: --starttls exits 1 and says
             the server does not advertise STARTTLS.

Environment: FINALDOT, FINALDOTCTL (as the integration tests), FD_LOADGEN.
Exit 0 pass, 1 fail, 77 skipped (no openssl CLI).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
from fdtest import Daemon, check, fail, skip  # noqa: E402

LOADGEN = os.environ.get("FD_LOADGEN", "build/tools/fd-loadgen")
TMP = tempfile.mkdtemp(prefix="fdlgtls-")


def make_pair():
    if not shutil.which("openssl"):
        skip("no openssl CLI to make a certificate")
    key, crt = f"{TMP}/ec.key", f"{TMP}/ec.crt"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec",
                        "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", key, "-out", crt, "-days", "2",
                        "-subj", "/CN=mx.test"],
                       capture_output=True, timeout=60)
    check(r.returncode == 0, f"openssl req: {r.stderr.decode()}")
    return crt, key


def loadgen(d, *args, rc=0):
    r = subprocess.run([LOADGEN, "--server", f"127.0.0.1:{d.port}",
                        "--json", "--timeout", "20", *args],
                       capture_output=True, text=True, timeout=120)
    check(r.returncode == rc,
          f"fd-loadgen {args}: exit {r.returncode}, want {rc}: "
          f"{r.stdout}{r.stderr}")
    return json.loads(r.stdout) if r.stdout.strip() else {}, r.stderr


def count(d, pattern):
    return len(re.findall(pattern, d.read_run_log()))


def wait_count(d, pattern, n, timeout=10):
    """Log lines come from the worker after the client saw its reply."""
    deadline = time.time() + timeout
    while count(d, pattern) < n and time.time() < deadline:
        time.sleep(0.05)
    return count(d, pattern)


def split_received(data):
    end = data.index(b"\r\n")
    while data[end + 2:end + 3] in (b" ", b"\t"):
        end = data.index(b"\r\n", end + 2)
    return data[:end], data[end + 2:]


def masked(msg):
    """The generator's text less what differs per run and per message."""
    msg = re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", msg, 1)
    return re.sub(rb"\r\nMessage-ID: <[^>]*>", b"\r\nMessage-ID: <->", msg,
                  1)


def messages(d):
    size, n = 70000, 24
    # the oracle: the same message over the plain path
    j, _ = loadgen(d, "--messages", "1", "--size", str(size))
    check(j["accepted"] == 1, f"plain message not accepted: {j}")
    plain = list(d.export().values())
    check(len(plain) == 1, f"{len(plain)} messages after the plain one")
    received, want = split_received(plain[0])
    check(b"with ESMTP " in received or received.endswith(b"with ESMTP"),
          f"the plain message says: {received[:200]!r}")
    check(len(want) == size, f"plain message stored {len(want)} octets")
    want = masked(want)
    for extra in ([], ["--bdat"]):
        before = count(d, r"event=tls_established")
        j, _ = loadgen(d, "--starttls", "--pipelining", "--connections",
                       "3", "--messages", str(n), "--size", str(size),
                       *extra)
        check(j["accepted"] == n and j["errors"] == 0,
              f"{extra}: accepted {j['accepted']} of {n}: {j}")
        check(j["handshakes"] == 3 and j["hs_full"] == 3,
              f"{extra}: handshakes {j['handshakes']}, want 3")
        check(j["tls_version"] == "TLSv1.3" and j["peer_key"] == "EC-256",
              f"{extra}: negotiated {j['tls_version']} {j['peer_key']}")
        check(j["lat_p50_us"] > 0, f"{extra}: no final-dot latency: {j}")
        got = wait_count(d, r"event=tls_established", before + 3)
        check(got == before + 3,
              f"{extra}: daemon logged {got - before} handshakes, want 3")
    stored = d.export()
    check(len(stored) == 2 * n + 1,
          f"{len(stored)} messages stored, want {2 * n + 1}")
    ids = set()
    for mid, data in stored.items():
        received, msg = split_received(data)
        if data == plain[0]:
            continue
        check(b"with ESMTPS" in received,
              f"{mid}: not received over TLS: {received[:200]!r}")
        m = re.search(rb"\r\nMessage-ID: <([^>]*)>", msg)
        check(m is not None and m.group(1) not in ids,
              f"{mid}: Message-ID missing or repeated")
        ids.add(m.group(1))
        check(len(msg) == size and masked(msg) == want,
              f"{mid}: stored {len(msg)} octets that differ from the "
              f"plain path's (sent {size})")


def resume(d):
    before = count(d, r"resumed=1")
    j, _ = loadgen(d, "--handshakes", "5", "--connections", "3",
                   "--tls-resume")
    check((j["handshakes"], j["hs_full"], j["hs_resumed"], j["hs_failed"])
          == (15, 3, 12, 0), f"with --tls-resume: {j}")
    check(j["accepted"] == 0 and j["hs_per_s"] > 0 and j["hs_p50_us"] > 0,
          f"handshake mode report: {j}")
    got = wait_count(d, r"resumed=1", before + 12)
    check(got - before == 12,
          f"daemon logged {got - before} resumptions, want 12")
    j, _ = loadgen(d, "--handshakes", "5", "--connections", "3")
    check((j["handshakes"], j["hs_full"], j["hs_resumed"]) == (15, 15, 0),
          f"without --tls-resume: {j}")


def version(d):
    j, _ = loadgen(d, "--handshakes", "1", "--tls-version", "1.2")
    check(j["tls_version"] == "TLSv1.2" and j["tls_cipher"].startswith(
        "ECDHE-ECDSA-"), f"--tls-version 1.2: {j}")
    wait_count(d, r"version=TLSv1\.2", 1)
    check(count(d, r"version=TLSv1\.2") >= 1,
          "the daemon did not log a TLSv1.2 handshake")


def hold(d):
    queued = count(d, r"event=queued")
    p = subprocess.Popen([LOADGEN, "--server", f"127.0.0.1:{d.port}",
                          "--json", "--starttls", "--connections", "20",
                          "--hold", "60"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        line = ""
        while time.time() < deadline:
            line = p.stderr.readline()
            if "holding" in line or not line:
                break
        check("holding 20 idle sessions" in line,
              f"no 'holding 20' line: {line!r}")
        check(p.poll() is None, "fd-loadgen ended while holding")
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    check(p.returncode == 0, f"--hold exit {p.returncode}: {err}")
    j = json.loads(out)
    check(j["held"] == 20 and j["handshakes"] == 20 and j["accepted"] == 0,
          f"--hold report: {j}")
    check(count(d, r"event=queued") == queued, "--hold queued a message")


def no_tls():
    with Daemon() as d:
        _, err = loadgen(d, "--starttls", "--messages", "1", rc=1)
        check("does not advertise STARTTLS" in err, f"stderr: {err}")


def main():
    if not os.access(LOADGEN, os.X_OK):
        skip(f"{LOADGEN} not built")
    crt, key = make_pair()
    try:
        with Daemon("--tls-cert", crt, "--tls-key", key) as d:
            messages(d)
            resume(d)
            version(d)
            hold(d)
        no_tls()
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
    print("ok: fd-loadgen TLS modes")


if __name__ == "__main__":
    main()
