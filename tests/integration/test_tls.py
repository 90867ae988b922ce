#!/usr/bin/python3
"""STARTTLS on the kernel transport, against the real daemon (RFC 3207):

 - python3 smtplib starttls(): messages byte-identical in the spool, the
   Received header says ESMTPS with the TLS version and cipher;
 - the injection (STARTTLS and a command in one segment): the command is
   never answered, inside TLS or out;
 - a second STARTTLS is 503 5.5.1; --tls-required: MAIL before STARTTLS
   is 530 5.7.0;
 - a garbage handshake, a client that stalls mid-handshake and one that
   trickles a byte at a time: the session ends (logged with the reason),
   the daemon goes on;
 - --tls-max-handshakes: a handshake beyond the cap waits its turn;
 - 1,000 handshakes cut at random points: no crash, every session ends,
   a normal session works afterwards;
 - an expired certificate, a key that does not match, a missing file: a
   clear start-up error.
Certificates are made in the test's temp dir with the openssl CLI."""
import os
import random
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

from fdtest import (Daemon, by_id, check, fail, free_port, skip,
                    smtplib_body, strip_received, FINALDOT, queued_id)

if not shutil.which("openssl"):
    skip("the openssl command is missing")

TMP = tempfile.mkdtemp(prefix="fdtls-")


def openssl(*args):
    r = subprocess.run(["openssl", *args], capture_output=True, timeout=60)
    check(r.returncode == 0, f"openssl {args}: {r.stderr.decode()}")


def make_pair(name, kind="ec", days="30"):
    key, crt = f"{TMP}/{name}.key", f"{TMP}/{name}.crt"
    alg = (["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
           if kind == "ec" else ["-newkey", "rsa:2048"])
    openssl("req", "-x509", *alg, "-nodes", "-keyout", key, "-out", crt,
            "-days", days, "-subj", "/CN=mx.test",
            "-addext", "subjectAltName=DNS:mx.test")
    return crt, key


def expired_pair():
    """A certificate whose notAfter is in the past: a CA-less 'x509 -req'
    with explicit dates (openssl 3.0 has -not_before/-not_after only in
    'ca', so use the ca command with a throwaway config)."""
    key, csr, crt = (f"{TMP}/old.key", f"{TMP}/old.csr", f"{TMP}/old.crt")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", csr,
            "-subj", "/CN=mx.test")
    d = f"{TMP}/ca"
    os.makedirs(d, exist_ok=True)
    open(f"{d}/index.txt", "w").close()
    with open(f"{d}/serial", "w") as f:
        f.write("01\n")
    with open(f"{d}/ca.cnf", "w") as f:
        f.write(f"""[ca]
default_ca = c
[c]
database = {d}/index.txt
serial = {d}/serial
new_certs_dir = {d}
default_md = sha256
policy = p
[p]
commonName = supplied
""")
    openssl("ca", "-batch", "-config", f"{d}/ca.cnf", "-selfsign",
            "-keyfile", key, "-in", csr, "-out", crt,
            "-startdate", "20200101000000Z", "-enddate", "20210101000000Z")
    return crt, key


def client_ctx():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


EC = make_pair("ec")
RSA = make_pair("rsa", "rsa")
TLS_ARGS = ["--tls-cert", EC[0], "--tls-key", EC[1],
            "--tls-cert", RSA[0], "--tls-key", RSA[1]]


def raw_ehlo(c):
    c.expect(220)
    c.send("EHLO client.test\r\n")
    lines = c.expect(250)
    return lines


def wrap(c, **kw):
    """TLS over the raw client's socket (after the 220)."""
    check(c.buf == b"", f"octets after the 220 in the clear: {c.buf!r}")
    c.sock = client_ctx().wrap_socket(c.sock, server_hostname="mx.test",
                                      **kw)
    return c


def smtplib_messages(d):
    msgs = [b"Subject: tls one\r\n\r\nHello over TLS.\r\n",
            b"Subject: dots\r\n\r\n.leading\r\n..two\r\n.\r\nend\r\n",
            b"Subject: big\r\n\r\n" +
            b"".join(b"%06d " % i + b"y" * 70 + b"\r\n" for i in range(3000))]
    ids = {}
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.ehlo("client.test")
        check(s.has_extn("starttls"), f"no STARTTLS in {s.esmtp_features}")
        code, resp = s.starttls(context=client_ctx())
        check(code == 220 and resp == b"2.0.0 Ready to start TLS",
              f"STARTTLS reply {code} {resp}")
        check(s.sock.version() in ("TLSv1.2", "TLSv1.3"), s.sock.version())
        s.ehlo("client.test")
        check(not s.has_extn("starttls"), "STARTTLS offered inside TLS")
        for i, m in enumerate(msgs):
            s.mail(f"s{i}@client.test")
            s.rcpt("user@example.com")
            code, resp = s.data(m)
            check(code == 250, f"DATA {code} {resp}")
            ids[queued_id([f"250 {resp.decode()}"])] = m
        version, cipher = s.sock.version(), s.sock.cipher()[0]
    stored = d.export()
    for mid, m in ids.items():
        check(mid in stored, f"{mid} not in the spool")
        check(strip_received(stored[mid]) == smtplib_body(m),
              f"{mid} differs in the spool")
        head = stored[mid][:600].decode()
        check(" with ESMTPS id " in head, f"no ESMTPS: {head}")
        check(f"(using {version} with cipher {cipher} (" in head,
              f"no TLS line for {version} {cipher}: {head}")
    print(f"ok: smtplib over {version} {cipher}: {len(ids)} messages "
          f"byte-identical, Received says ESMTPS")


def injection(d):
    c = d.connect()
    raw_ehlo(c)
    # The attack: one segment, the command behind STARTTLS.
    c.send("STARTTLS\r\nMAIL FROM:<evil@client.test>\r\n")
    c.expect(220, r"2\.0\.0 Ready to start TLS")
    time.sleep(0.2)
    wrap(c)
    # Inside TLS nothing of the injected command may be answered: the
    # first reply we get is the one to our EHLO.
    c.send("EHLO client.test\r\n")
    lines = c.expect(250)
    check(lines[0].startswith("250-mx.test"), f"first reply inside TLS: "
          f"{lines}")
    c.cmd("RCPT TO:<user@example.com>", 503, r"5\.5\.1")
    c.cmd("STARTTLS", 503, r"5\.5\.1 Error: TLS already active")
    c.cmd("QUIT", 221)
    c.close()
    d.wait_log(r"event=starttls_pipelining discarded=30\b", 5)
    print("ok: command pipelined behind STARTTLS discarded; second "
          "STARTTLS 503")


def garbage_handshake(d):
    c = d.connect()
    raw_ehlo(c)
    c.cmd("STARTTLS", 220)
    c.send(b"GET / HTTP/1.0\r\nHost: mx.test\r\n\r\n")
    check(c.closed(5), "garbage handshake: the session did not end")
    c.close()
    d.wait_log(r"event=tls_failed established=0 reason=", 5)
    print("ok: garbage handshake ends the session, logged")


def client_hello():
    """A real ClientHello, from an in-memory client."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_ctx().wrap_bio(inc, out, server_hostname="mx.test")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def stalls(d):
    hello = client_hello()
    # Half a ClientHello, then nothing.
    c = d.connect(timeout=15)
    raw_ehlo(c)
    c.cmd("STARTTLS", 220)
    c.send(hello[:len(hello) // 2])
    t0 = time.time()
    check(c.closed(10), "stalled handshake: the session did not end")
    took = time.time() - t0
    check(took < 8, f"stalled handshake ended after {took:.1f}s")
    c.close()
    d.wait_log(r'event=tls_failed established=0 reason="handshake timeout"',
               5)
    # A byte every 0.3 s: each resets the idle timer, the deadline holds.
    c = d.connect(timeout=15)
    raw_ehlo(c)
    c.cmd("STARTTLS", 220)
    t0 = time.time()
    ended = False
    for b in hello:
        try:
            c.sock.sendall(bytes([b]))
        except OSError:
            ended = True
            break
        if c.closed(0.3):
            ended = True
            break
        if time.time() - t0 > 10:
            break
    check(ended, "trickled handshake: the session did not end in 10 s")
    c.close()
    print(f"ok: stalled handshake ended after {took:.1f}s (timeout 2s); "
          f"a trickled one too")


def handshake_cap(d):
    """--tls-max-handshakes 1: while one handshake is stuck, another
    waits; it goes on once the first ends."""
    hello = client_hello()
    a = d.connect(timeout=15)
    raw_ehlo(a)
    a.cmd("STARTTLS", 220)
    a.send(hello[:20])  # holds the only handshake slot
    time.sleep(0.3)
    b = d.connect(timeout=15)
    raw_ehlo(b)
    b.cmd("STARTTLS", 220)
    done = {}

    def hs():
        try:
            wrap(b)
            done["t"] = time.time()
        except Exception as e:  # noqa: BLE001 - reported below
            done["err"] = e
    th = threading.Thread(target=hs)
    th.start()
    time.sleep(1.0)
    check("t" not in done and "err" not in done,
          f"second handshake did not wait for the slot: {done}")
    t_close = time.time()
    a.close()  # frees the slot
    th.join(10)
    check("t" in done, f"second handshake never completed: {done}")
    b.send("EHLO client.test\r\n")
    b.expect(250)
    b.cmd("QUIT", 221)
    b.close()
    print(f"ok: handshake cap 1: the second waited, then completed "
          f"{done['t'] - t_close:.2f}s after the first ended")


def truncated_handshakes(d, n=1000):
    """n real handshakes whose client->server stream is cut at a random
    point (then the client closes); no crash, every session ends."""
    rnd = random.Random(1047)
    cut_counts = {"hello": 0, "later": 0, "complete": 0}
    ctx = client_ctx()  # one: it loads the system's CA store each time
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        f = s.makefile("rb")
        s.sendall(b"EHLO c\r\nSTARTTLS\r\n")
        # 220 greeting, EHLO reply lines, 220 Ready.
        while True:
            line = f.readline()
            check(line, "connection closed before the 220 to STARTTLS")
            if line.startswith(b"220 2.0.0"):
                break
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(inc, out, server_hostname="mx.test")
        budget = rnd.randrange(1, 600)
        sent = 0
        finished = False
        for _ in range(10):
            try:
                obj.do_handshake()
                finished = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                break
            data = out.read()
            take = data[:max(0, budget - sent)]
            if take:
                s.sendall(take)
                sent += len(take)
            if finished or sent >= budget:
                break
            s.settimeout(2)
            try:
                got = s.recv(65536)
            except (socket.timeout, TimeoutError):
                break
            if not got:
                break
            inc.write(got)
        if finished:
            cut_counts["complete"] += 1
        elif sent < 200:
            cut_counts["hello"] += 1
        else:
            cut_counts["later"] += 1
        # Half the time a clean close, half the time a reset.
        if i % 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                         b"\x01\x00\x00\x00\x00\x00\x00\x00")
        f.close()
        s.close()
    check(d.proc.poll() is None, "finaldot died during the truncations")
    print(f"ok: {n} truncated handshakes ({cut_counts}); daemon alive")


def pipelined(d, n=4000):
    """n commands in one write, in the clear and inside TLS: every reply
    arrives (replies fill the output; the session must go on when they
    drain)."""
    for tls in (False, True):
        c = d.connect(timeout=30)
        c.expect(220)
        if tls:
            c.send("EHLO client.test\r\n")
            c.expect(250)
            c.cmd("STARTTLS", 220)
            wrap(c)
        t0 = time.time()
        c.send(b"EHLO c\r\n" + b"RSET\r\nNOOP\r\n" * (n // 2) +
               b"QUIT\r\n")
        c.expect(250)
        for i in range(n):
            c.expect(250)
        c.expect(221)
        c.close()
        print(f"ok: {n} pipelined commands, tls={tls}: all replies in "
              f"{time.time() - t0:.2f}s")


def metrics(port):
    """The TLS counters in /metrics, after everything above."""
    import urllib.request
    time.sleep(1.2)  # workers publish about once a second
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                  timeout=10).read().decode()
    vals = {}
    for line in text.splitlines():
        if line.startswith("finaldot_") and " " in line:
            k, v = line.rsplit(" ", 1)
            vals[k] = float(v)

    def get(prefix):
        return sum(v for k, v in vals.items() if k.startswith(prefix))
    ok = get('finaldot_tls_handshakes_total{transport="kernel",result="ok"')
    bad = get(
        'finaldot_tls_handshakes_total{transport="kernel",result="failed"')
    started = get("finaldot_starttls_total")
    injected = get("finaldot_starttls_pipelining_total")
    check(injected == 1, f"starttls_pipelining_total {injected}")
    # smtplib twice, the injection, the trickle (may or may not finish),
    # and the truncated handshakes that completed.
    check(ok >= 3, f"handshakes ok {ok}")
    check(bad >= 500, f"handshakes failed {bad}")
    check(started >= ok + bad, f"starttls {started} < {ok} + {bad}")
    print(f"ok: /metrics: starttls={started:.0f} handshakes ok={ok:.0f} "
          f"failed={bad:.0f} pipelining={injected:.0f}")


def peer_cn(port):
    """The CN of the certificate a new STARTTLS session gets."""
    import ssl as _ssl
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        s.starttls(context=client_ctx())
        der = s.sock.getpeercert(binary_form=True)
    pem = _ssl.DER_cert_to_PEM_cert(der)
    r = subprocess.run(["openssl", "x509", "-noout", "-subject"],
                       input=pem.encode(), capture_output=True, timeout=30)
    return r.stdout.decode().strip()


def reload_certificates():
    """SIGHUP re-reads the files: new sessions get the renewed
    certificate; a broken file keeps the one serving."""
    import signal
    crt, key = f"{TMP}/live.crt", f"{TMP}/live.key"
    shutil.copy(EC[0], crt)
    shutil.copy(EC[1], key)
    with Daemon("--tls-cert", crt, "--tls-key", key) as d:
        before = peer_cn(d.port)
        check("mx.test" in before, f"first certificate: {before}")
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt",
                "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out",
                crt, "-days", "30", "-subj", "/CN=renewed.test")
        # A session in TLS across the reload keeps working.
        held = smtplib.SMTP("127.0.0.1", d.port, timeout=30)
        held.ehlo("client.test")
        held.starttls(context=client_ctx())
        held.ehlo("client.test")
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_log(r"event=tls_reloaded", 10)
        after = peer_cn(d.port)
        check("renewed.test" in after, f"after SIGHUP: {after}")
        code, _ = held.noop()
        check(code == 250, "the session in TLS across the reload")
        held.quit()
        with open(crt, "w") as f:
            f.write("not a certificate\n")
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_log(r"event=tls_reload_failed kept=previous", 10)
        still = peer_cn(d.port)
        check("renewed.test" in still, f"after a failed reload: {still}")
    print("ok: SIGHUP: renewed certificate for new sessions, open ones go "
          "on; a broken file keeps the previous one")


def startup_errors():
    port_args = ["--listen", "127.0.0.1:1", "--spool", f"{TMP}/nospool"]
    cases = [
        ("expired", [*expired_pair()], r"expired on"),
        ("mismatch", [EC[0], RSA[1]], r"does not match"),
        ("missing", [f"{TMP}/nope.crt", EC[1]], r"cannot read certificate"),
    ]
    for name, (crt, key), pat in cases:
        r = subprocess.run([FINALDOT, *port_args, "--tls-cert", crt,
                            "--tls-key", key], capture_output=True,
                           timeout=30, stdin=subprocess.DEVNULL)
        err = r.stderr.decode()
        check(r.returncode == 2, f"{name}: exit {r.returncode}: {err}")
        import re
        check(re.search(pat, err), f"{name}: stderr {err!r}")
        print(f"ok: {name} certificate: exit 2, {err.strip()}")
    r = subprocess.run([FINALDOT, *port_args, "--tls-cert", EC[0]],
                       capture_output=True, timeout=30)
    check(r.returncode == 2 and b"pairs" in r.stderr,
          f"cert without key: {r.returncode} {r.stderr!r}")


def required():
    with Daemon(*TLS_ARGS, "--tls-required", "on") as d:
        c = d.connect()
        raw_ehlo(c)
        c.cmd("MAIL FROM:<a@client.test>", 530,
              r"5\.7\.0 Must issue a STARTTLS command first")
        c.cmd("STARTTLS", 220)
        wrap(c)
        c.send("EHLO client.test\r\n")
        c.expect(250)
        c.cmd("MAIL FROM:<a@client.test>", 250)
        c.cmd("QUIT", 221)
        c.close()
    print("ok: --tls-required: 530 5.7.0 before STARTTLS, 250 after")


def main():
    try:
        startup_errors()
        required()
        reload_certificates()
        mport = free_port()
        with Daemon(*TLS_ARGS, "--tls-handshake-timeout", "2s",
                    "--metrics", f"127.0.0.1:{mport}", threads=2) as d:
            smtplib_messages(d)
            pipelined(d)
            injection(d)
            garbage_handshake(d)
            stalls(d)
            truncated_handshakes(d)
            smtplib_messages(d)  # still serving, still byte-identical
            metrics(mport)
        with Daemon(*TLS_ARGS, "--tls-max-handshakes", "1",
                    "--tls-handshake-timeout", "20s") as d:
            handshake_cap(d)
        with Daemon() as d:
            c = d.connect()
            lines = raw_ehlo(c)
            check(not any("STARTTLS" in l for l in lines),
                  f"STARTTLS offered without a certificate: {lines}")
            c.cmd("STARTTLS", 502)
            c.close()
        print("ok: without a certificate STARTTLS is neither offered nor "
              "accepted")
    finally:
        shutil.rmtree(TMP, ignore_errors=True)


main()
