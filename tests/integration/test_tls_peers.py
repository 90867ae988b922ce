#!/usr/bin/python3
"""STARTTLS (RFC 3207) with real clients over the kernel transport.

Certificates are made in the test's temp dir with the openssl CLI: a CA,
server certificates for mx.test and other.test signed by it, and a second
CA that signed nothing of ours (verification against it must fail).

Every message a client sends is read back from finaldot's spool and must be
byte-identical after the Received header, and that header must say "with
ESMTPS" and name the TLS version and cipher the client itself negotiated:

  swaks     --tls (default protocol) with a 200 kB body that spans many
            TLS records, and --tls-protocol tlsv1_2; plain swaks on the
            same daemon gets "with ESMTP" and no "(using ...)".
  postfix   a private Postfix (peers.PostfixPeer plus an smtp client) with
            relayhost [127.0.0.1]:FINALDOT and smtp_tls_security_level =
            encrypt relays a message into finaldot (--tls-required on):
            its log says "TLS connection established" with the version and
            cipher of our Received header. Against a finaldot without a
            certificate the message is deferred for that reason and never
            reaches our spool.
  smtplib   starttls() with verification on (ssl.create_default_context
            with our CA): mx.test verifies; with two pairs, SNI other.test
            gets and verifies other.test's certificate; a name neither
            certificate covers, and an unrelated CA, fail verification.
  s_client  openssl s_client -starttls smtp with -sess_out, then -sess_in:
            with --threads 2, reconnections until both workers served one,
            each must say "Reused" (the ticket keys are shared by the
            workers), for TLS 1.3 and 1.2 and for SNI other.test; a
            restarted daemon has new keys, so the old ticket gets "New";
            a resumed TLS 1.3 session gets a new ticket that resumes the
            next connection (clients use a ticket once, RFC 8446 C.4).

Usage: test_tls_peers.py [CASE...] (default: all; swaks postfix smtplib
s_client). Exit 0 pass, 1 fail, 77 skipped (a case lacked a program or
root; its reason is printed; cases that ran must still have passed).
"""
import os
import re
import shutil
import smtplib
import ssl
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import (Daemon, check, fail, skip, smtplib_body,  # noqa: E402
                    strip_received)
from peers import PostfixPeer  # noqa: E402

CRLF = b"\r\n"


# ------------------------------------------------------------ certificates

class Pki:
    """A CA and server certificates under dir, all made with openssl."""

    def __init__(self, tmp):
        self.dir = os.path.join(tmp, "pki")
        os.makedirs(self.dir)
        self.ca = self._ca("ca", "finaldot test CA")
        # Signs nothing of ours: a client trusting only it must refuse us.
        self.rogue_ca = self._ca("rogue", "unrelated CA")
        self.pairs = {n: self._leaf(n) for n in ("mx.test", "other.test")}

    def _run(self, *args):
        r = subprocess.run(["openssl", *args], capture_output=True,
                           text=True, cwd=self.dir, timeout=60)
        check(r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr}")

    def _ca(self, stem, cn):
        crt = os.path.join(self.dir, stem + ".crt")
        self._run("req", "-x509", "-newkey", "ec", "-pkeyopt",
                  "ec_paramgen_curve:P-256", "-nodes", "-keyout",
                  stem + ".key", "-out", crt, "-days", "2", "-subj",
                  f"/CN={cn}", "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return crt

    def _leaf(self, name):
        ext = os.path.join(self.dir, name + ".ext")
        with open(ext, "w") as f:
            f.write(f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=serverAuth\n")
        self._run("req", "-new", "-newkey", "ec", "-pkeyopt",
                  "ec_paramgen_curve:P-256", "-nodes", "-keyout",
                  name + ".key", "-out", name + ".csr", "-subj", f"/CN={name}")
        self._run("x509", "-req", "-in", name + ".csr", "-CA", "ca.crt",
                  "-CAkey", "ca.key", "-set_serial",
                  "0x" + os.urandom(8).hex(), "-days", "2", "-extfile", ext,
                  "-out", name + ".crt")
        return (os.path.join(self.dir, name + ".crt"),
                os.path.join(self.dir, name + ".key"))

    def args(self, *names):
        """finaldot's --tls-cert/--tls-key options for names, in order (the
        first is the default certificate)."""
        out = []
        for n in names:
            crt, key = self.pairs[n]
            out += ["--tls-cert", crt, "--tls-key", key]
        return out


# ------------------------------------------------------------ spool checks

def received(stored):
    """finaldot's Received header of a stored message, unfolded."""
    check(stored.startswith(b"Received: "), f"no Received: {stored[:80]!r}")
    head = stored[:len(stored) - len(strip_received(stored))]
    return re.sub(r"\r\n[ \t]+", " ", head.decode("utf-8", "replace")).strip()


USING = re.compile(r"\(using (TLSv1\.[23]) with cipher ([A-Za-z0-9_-]+) "
                   r"\((\d+)/(\d+) bits\)\)")


def check_esmtps(d, msgid, version, cipher, bits=None):
    """The message msgid was received over TLS: its Received header says
    ESMTPS and names the version and cipher the client negotiated."""
    rcv = received(d.cat(msgid))
    check(re.search(r" with ESMTPS id " + msgid + r"\b", rcv),
          f"{msgid}: no 'with ESMTPS id {msgid}' in {rcv!r}")
    m = USING.search(rcv)
    check(m is not None, f"{msgid}: no '(using ... with cipher ...)' in "
          f"{rcv!r}")
    check(m.group(1) == version and m.group(2) == cipher,
          f"{msgid}: Received names {m.group(1)} {m.group(2)}, the client "
          f"negotiated {version} {cipher}: {rcv!r}")
    if bits is not None:
        check(int(m.group(3)) == bits and int(m.group(4)) == bits,
              f"{msgid}: {m.group(3)}/{m.group(4)} bits, want {bits}")
    return rcv


def check_stored(d, msgid, want, alternatives=()):
    got = strip_received(d.cat(msgid))
    check(got == want or got in alternatives,
          f"{msgid}: stored bytes differ from what was sent "
          f"({len(got)} vs {len(want)} bytes)\n got {got[:200]!r}...\n"
          f"want {want[:200]!r}...")


def spool_ids(d):
    return {m["id"] for m in d.scan()["messages"]}


def big_body(tag, lines=3000):
    """About 200 kB in CRLF lines, so the data spans a dozen TLS records;
    some lines start with a dot (RFC 5321 4.5.2 transparency)."""
    out = [f"Subject: {tag}", f"Message-ID: <{tag}@tls.test>", ""]
    for i in range(lines):
        lead = "." if i % 97 == 0 else ""
        out.append(f"{lead}{tag} line {i:05d} " + "abcdefghij" * 5)
    return ("\r\n".join(out) + "\r\n").encode()


def wait_for(cond, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    fail(f"timed out after {timeout}s waiting for {what}")


# ------------------------------------------------------------ 1. swaks

def swaks_tls_supported():
    """swaks --support lists each feature: "=== TLS supported" or
    "*** TLS not available: requires Net::SSLeay"."""
    r = subprocess.run(["swaks", "--support"], capture_output=True,
                       text=True, timeout=60)
    lines = [l for l in (r.stdout + r.stderr).splitlines() if " TLS " in l]
    return any(l.startswith("=== TLS supported") for l in lines), \
        " ".join(lines) or "swaks --support does not mention TLS"


def swaks(port, *args):
    r = subprocess.run(["swaks", "--server", f"127.0.0.1:{port}",
                        "--helo", "swaks.test", "--from", "s@swaks.test",
                        "--to", "user@example.com", *args],
                       capture_output=True, timeout=120)
    out = r.stdout.decode("utf-8", "replace")
    check(r.returncode == 0, f"swaks {args} failed ({r.returncode}):\n"
          f"{out[-3000:]}{r.stderr.decode('utf-8', 'replace')}")
    ids = re.findall(r"Ok: queued as ([0-9A-F]{16})", out)
    check(len(ids) == 1, f"one queued id in swaks output:\n{out[-3000:]}")
    return ids[0], out


def swaks_cipher(out):
    """(version, cipher, bits) from swaks' "TLS started with cipher" line."""
    m = re.search(r"=== TLS started with cipher (TLSv1\.[23]):(\S+):(\d+)",
                  out)
    check(m is not None, f"swaks did not start TLS:\n{out[-3000:]}")
    return m.group(1), m.group(2), int(m.group(3))


def case_swaks(tmp, pki):
    if not shutil.which("swaks"):
        skip("swaks is not installed")
    ok, why = swaks_tls_supported()
    if not ok:
        # Debian's swaks needs Perl's Net::SSLeay (libnet-ssleay-perl).
        skip(f"swaks has no TLS support here: {why}")
    bigfile = os.path.join(tmp, "swaks-big.txt")
    big = big_body("swaksbig")
    with open(bigfile, "wb") as f:
        f.write(big.replace(CRLF, b"\n"))
    small = b"Subject: swaks tls\r\n\r\nline 1\r\n.dot line\r\nline 3\r\n"
    with Daemon(*pki.args("mx.test")) as d:
        a, out = swaks(d.port, "--tls", "--data",
                       small.decode().replace("\r\n", "\n"))
        va, ca, ba = swaks_cipher(out)
        # swaks marks what it read in the clear "<-", inside TLS "<~".
        check(re.search(r"^<- +250[- ]STARTTLS", out, re.M),
              f"STARTTLS not advertised:\n{out[-3000:]}")
        check(re.search(r"^<~ +250[- ]", out, re.M) and
              not re.search(r"^<~ +250[- ]STARTTLS", out, re.M),
              f"EHLO inside TLS must not offer STARTTLS:\n{out[-3000:]}")
        b, out = swaks(d.port, "--tls", "--suppress-data", "--data",
                       "@" + bigfile)
        vb, cb, bb = swaks_cipher(out)
        # A plain session on the same daemon: no ESMTPS, no cipher.
        c, _ = swaks(d.port, "--data", small.decode().replace("\r\n", "\n"))
        v12 = None
        have12 = "tls-protocol" in subprocess.run(
            ["swaks", "--help"], capture_output=True, text=True,
            timeout=60).stdout
        if have12:
            e, out = swaks(d.port, "--tls", "--tls-protocol", "tlsv1_2",
                           "--data", small.decode().replace("\r\n", "\n"))
            v12, c12, b12 = swaks_cipher(out)
            check(v12 == "TLSv1.2", f"--tls-protocol tlsv1_2 gave {v12}")
        else:
            print("note: this swaks has no --tls-protocol; TLS 1.2 via "
                  "swaks not tried")
        # swaks puts an empty line after the data's last newline
        for mid in [a, c] + ([e] if have12 else []):
            check_stored(d, mid, small + CRLF, (small,))
        check_stored(d, b, big + CRLF, (big,))
        check_esmtps(d, a, va, ca, ba)
        check_esmtps(d, b, vb, cb, bb)
        if have12:
            check_esmtps(d, e, v12, c12, b12)
        rc = received(d.cat(c))
        check(" with ESMTP id " in rc and "(using" not in rc,
              f"plain session's Received: {rc!r}")
        want = {a, b, c} | ({e} if have12 else set())
        check(spool_ids(d) == want, f"spool holds {spool_ids(d)}, want "
              f"{want}")
    print(f"ok: swaks --tls ({va} {ca}), 200 kB over TLS"
          + (f", --tls-protocol tlsv1_2 ({c12})" if have12 else "")
          + ", plain swaks says ESMTP")


# ------------------------------------------------------------ 2. Postfix

class PostfixRelay(PostfixPeer):
    """PostfixPeer with an SMTP client: what its smtpd accepts from
    127.0.0.0/8 for other domains goes to `relayhost`.

    The peer's master.cf has no smtp client (it only delivers into
    Maildirs); this adds one, and tlsmgr: without it Postfix 3.7's client
    gets no seed, disables TLS ("no entropy for TLS key generation") and
    defers with "TLS is required, but our TLS engine is unavailable"."""
    kind = "postfix-relay"

    def __init__(self, relay_port, **kw):
        main = {
            "relayhost": f"[127.0.0.1]:{relay_port}",
            "default_transport": "smtp",
            "relay_transport": "smtp",
            "smtpd_relay_restrictions":
                "permit_mynetworks, reject_unauth_destination",
            "smtp_tls_security_level": "encrypt",
            "smtp_tls_loglevel": "1",
            "smtp_connect_timeout": "10s",
            # a deferred message is not retried while the test looks
            "minimal_backoff_time": "300s",
            "queue_run_delay": "300s",
        }
        main.update(kw.pop("main", {}))
        super().__init__(main=main, **kw)

    def _write_config(self):
        super()._write_config()
        with open(os.path.join(self.etc, "master.cf"), "a") as f:
            f.write("smtp unix - - n - - smtp\n"
                    "tlsmgr unix - - n 1000? 1 tlsmgr\n")

    def inject(self, sender, rcpt, body):
        """Hand body to this Postfix's smtpd; its queue id."""
        with smtplib.SMTP(*self.addr, timeout=60) as s:
            s.ehlo("inject.test")
            s.mail(sender)
            code, resp = s.rcpt(rcpt)
            check(code == 250, f"postfix refused RCPT {rcpt}: {code} {resp}")
            code, resp = s.data(body)
            check(code == 250, f"postfix refused the data: {code} {resp}")
        m = re.search(rb"queued as ([0-9A-Za-z]+)", resp)
        check(m is not None, f"postfix queue id in {resp!r}")
        return m.group(1).decode()

    def outcome(self, qid):
        """The first delivery status line of queue id qid, or None."""
        for line in self.log().splitlines():
            if f" {qid}: to=<" in line and " status=" in line:
                return line
        return None


def postfix_message(tag):
    # Full headers, so cleanup(8) has nothing to add; only its Received.
    return (f"From: <sender@src.test>\r\nTo: <user@example.com>\r\n"
            f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n").encode() + \
        big_body(tag)


def case_postfix(tmp, pki):
    with Daemon(*pki.args("mx.test"), "--tls-required", "on") as d, \
            PostfixRelay(d.port) as pf:
        body = postfix_message("pfrelay")
        qid = pf.inject("sender@src.test", "user@example.com", body)
        line = wait_for(lambda: pf.outcome(qid), 90,
                        f"postfix's delivery of {qid}")
        msgid = pf.relayed_id(line, f"127.0.0.1[127.0.0.1]:{d.port}")
        tls = re.search(r"TLS connection established to 127\.0\.0\.1"
                        rf"\[127\.0\.0\.1\]:{d.port}: (TLSv1\.[23]) with "
                        r"cipher (\S+) \((\d+)/(\d+) bits\)", pf.log())
        check(tls is not None, f"no 'TLS connection established' in the "
              f"postfix log:\n{pf.log()[-3000:]}")
        check_esmtps(d, msgid, tls.group(1), tls.group(2),
                     int(tls.group(3)))
        # finaldot's Received, then Postfix's own, then the bytes we gave
        # Postfix, unchanged.
        after = strip_received(d.cat(msgid))
        pf_rcv = after[:len(after) - len(strip_received(after))]
        check(b"by peer.test (Postfix) with ESMTP" in pf_rcv,
              f"second header is not Postfix's Received: {pf_rcv[:300]!r}")
        got = strip_received(after)
        check(got == smtplib_body(body),
              f"relayed message differs ({len(got)} vs {len(body)} "
              f"bytes): {got[:300]!r}")
        check(spool_ids(d) == {msgid}, f"spool: {spool_ids(d)}")
        version, cipher = tls.group(1), tls.group(2)

    # finaldot without a certificate offers no STARTTLS: Postfix must not
    # fall back to plaintext.
    with Daemon() as d, PostfixRelay(d.port) as pf:
        qid = pf.inject("sender@src.test", "user@example.com",
                        postfix_message("pfplain"))
        line = wait_for(lambda: pf.outcome(qid), 90,
                        f"postfix's attempt at {qid}")
        check("status=deferred" in line and
              "TLS is required, but was not offered by host 127.0.0.1"
              in line, f"want a deferral for missing TLS: {line}")
        # Postfix did reach finaldot (not some network error) and left.
        d.wait_log("smtp [0-9a-f]+ event=disconnect", 20)
        check(" event=queued " not in d.read_log(),
              f"finaldot queued something:\n{d.read_log()[-2000:]}")
        check(spool_ids(d) == set(), f"spool: {spool_ids(d)}")
        # The message waits in Postfix's deferred queue, with that reason
        # in its defer log.
        deferred = [n for _, _, files in
                    os.walk(os.path.join(pf.queue, "deferred"))
                    for n in files]
        check(qid in deferred, f"{qid} not in deferred/: {deferred}")
        reasons = []
        for root, _, files in os.walk(os.path.join(pf.queue, "defer")):
            if qid in files:
                with open(os.path.join(root, qid), errors="replace") as f:
                    reasons.append(f.read())
        check(reasons and "TLS is required" in reasons[0],
              f"defer log of {qid}: {reasons}")
    print(f"ok: postfix relayed 200 kB over TLS ({version} {cipher}) into "
          f"a --tls-required finaldot; without a certificate it deferred: "
          f"TLS is required")


# ------------------------------------------------------------ 3. smtplib

def smtplib_tls(port, name, cafile):
    """starttls() verifying the server as name against cafile; returns
    (open SMTP, version, cipher, bits, peer's subject CN)."""
    ctx = ssl.create_default_context(cafile=cafile)
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    # starttls() passes the host it connected to as server_hostname (for
    # SNI and the name check); we connect by address, so name it here.
    s._host = name
    try:
        s.ehlo("client.test")
        s.starttls(context=ctx)
    except BaseException:
        s.close()
        raise
    cn = dict(x[0] for x in s.sock.getpeercert()["subject"])["commonName"]
    ciph = s.sock.cipher()
    return s, s.sock.version(), ciph[0], ciph[2], cn


def smtplib_refused(port, name, cafile, why):
    try:
        s, *_ = smtplib_tls(port, name, cafile)
    except ssl.SSLCertVerificationError as e:
        check(why in str(e), f"{name}: refused for {e}, not '{why}'")
        return
    s.close()
    fail(f"{name} against {cafile}: verification passed, must fail")


def case_smtplib(tmp, pki):
    sent = {}
    with Daemon(*pki.args("mx.test", "other.test")) as d:
        for name in ("mx.test", "other.test"):
            try:
                s, version, cipher, bits, cn = smtplib_tls(d.port, name,
                                                           pki.ca)
            except (ssl.SSLError, smtplib.SMTPException, OSError) as e:
                fail(f"starttls() verifying {name} against our CA: {e!r}")
            with s:
                check(cn == name, f"SNI {name}: the server showed {cn}")
                body = (f"Subject: verified {name}\r\n\r\n.dot\r\n"
                        f"text\r\n").encode()
                s.ehlo("client.test")
                check(not s.has_extn("starttls"),
                      "STARTTLS advertised inside TLS")
                check(s.mail("a@client.test")[0] == 250, "MAIL")
                check(s.rcpt("user@example.com")[0] == 250, "RCPT")
                code, resp = s.data(body)
            m = re.match(rb"2\.0\.0 Ok: queued as ([0-9A-F]{16})$", resp)
            check(code == 250 and m, f"{name}: {code} {resp!r}")
            sent[m.group(1).decode()] = (body, version, cipher, bits)
        # No certificate covers this name: the default one (mx.test) is
        # shown and the client's name check refuses it.
        smtplib_refused(d.port, "nomatch.test", pki.ca, "mismatch")
        # A CA that signed nothing of ours.
        smtplib_refused(d.port, "mx.test", pki.rogue_ca,
                        "unable to get local issuer")
        # The daemon still serves after the failed handshakes.
        s, *_ = smtplib_tls(d.port, "mx.test", pki.ca)
        s.quit()
        for msgid, (body, version, cipher, bits) in sent.items():
            check_stored(d, msgid, smtplib_body(body))
            check_esmtps(d, msgid, version, cipher, bits)
        check(spool_ids(d) == set(sent), f"spool: {spool_ids(d)}")
        for name in ("mx.test", "other.test"):
            d.wait_log(rf"event=tls_established .*sni={name}\b", 20)
    print("ok: smtplib starttls verified mx.test and, by SNI, other.test; "
          "a foreign name and a foreign CA refused")


# ------------------------------------------------------------ 4. s_client

def s_client(port, name, cafile, sess_in=None, sess_out=None, tls12=False,
             tag=None, need_ticket=True):
    """One openssl s_client -starttls smtp session that verifies name; with
    tag, sends a message. Returns ("New"|"Reused", version, cipher, queued
    id or None, the message sent or None)."""
    argv = ["openssl", "s_client", "-starttls", "smtp", "-connect",
            f"127.0.0.1:{port}", "-servername", name, "-CAfile", cafile,
            "-verify_return_error", "-verify_hostname", name, "-ign_eof"]
    if tls12:
        argv.append("-tls1_2")
    if sess_in:
        argv += ["-sess_in", sess_in]
    if sess_out:
        argv += ["-sess_out", sess_out]
    script = b"EHLO sclient.test\r\n"
    body = None
    if tag:
        body = (f"Subject: {tag}\r\n\r\nover s_client\r\n..stuffed\r\n"
                f"end\r\n").encode()
        script += (b"MAIL FROM:<s@sclient.test>\r\n"
                   b"RCPT TO:<user@example.com>\r\nDATA\r\n" + body +
                   b".\r\n")
        body = body.replace(b"\r\n..", b"\r\n.")  # as stored, unstuffed
    script += b"QUIT\r\n"
    r = subprocess.run(argv, input=script, capture_output=True, timeout=60)
    out = r.stdout.decode("utf-8", "replace")
    err = r.stderr.decode("utf-8", "replace")
    check(r.returncode == 0 and "221 2.0.0" in out,
          f"s_client {name} ({r.returncode}):\n{out[-2500:]}\n{err[-1500:]}")
    check("Verify return code: 0 (ok)" in out,
          f"s_client {name}: not verified:\n{out[-2500:]}")
    m = re.search(r"^(New|Reused), (TLSv1\.[23]), Cipher is (\S+)$", out,
                  re.M)
    check(m is not None, f"s_client {name}: no New/Reused line:\n"
          f"{out[-2500:]}")
    q = re.search(r"250 2\.0\.0 Ok: queued as ([0-9A-F]{16})", out)
    if tag:
        check(q is not None, f"s_client {name}: not queued:\n{out[-2500:]}")
    if sess_out and need_ticket:
        check(os.path.exists(sess_out) and os.path.getsize(sess_out) > 0,
              f"s_client {name}: no session ticket saved in {sess_out}")
    return m.group(1), m.group(2), m.group(3), q.group(1) if q else None, \
        body


def worker_of(d, msgid):
    """(worker, resumed, sni) of the session that queued msgid, from the
    log: the session id's top byte is its worker."""
    # The log is written in batches a few times a second: wait for it.
    pat = rf"smtp ([0-9a-f]{{16}}) event=queued id={msgid}\b"
    d.wait_log(pat, 20)
    sid = re.search(pat, d.read_run_log()).group(1)
    d.wait_log(rf"tls {sid} event=tls_established ", 20)
    log = d.read_run_log()
    t = re.search(rf"tls {sid} event=tls_established .*resumed=(\d) "
                  r"sni=(\S+)", log)
    check(t is not None, f"no tls_established line for session {sid}")
    return int(sid, 16) >> 56, t.group(1) == "1", t.group(2)


def resumption(d, pki, tmp, name, tls12, sent):
    """One full handshake, then reconnections with its ticket until each
    of the two workers resumed at least once (and at least 6); every one
    must say Reused, each sends a message (into sent). Returns (version,
    the worker that issued the ticket, {worker: resumptions}, count)."""
    stem = os.path.join(tmp, f"sess-{name}-{'12' if tls12 else '13'}")
    first = stem + ".0.pem"
    how, ver, ciph, mid, body = s_client(d.port, name, pki.ca,
                                         sess_out=first, tls12=tls12,
                                         tag=f"{name} first")
    check(how == "New", f"first connection ({name}) says {how}")
    check(ver == ("TLSv1.2" if tls12 else "TLSv1.3"), f"version {ver}")
    sent[mid] = (body, ver, ciph)
    issuer, resumed, sni = worker_of(d, mid)
    check(not resumed and sni == name, f"first session: resumed={resumed} "
          f"sni={sni}")
    workers = {}
    n = 0
    while n < 6 or len(workers) < 2:
        # SO_REUSEPORT spreads connections by a hash of the 4-tuple; 40
        # all on one of two workers is a 2^-39 chance.
        check(n < 40, f"40 reconnections, all served by worker(s) "
              f"{sorted(workers)}")
        how, v, c, mid, body = s_client(d.port, name, pki.ca,
                                        sess_in=first, tls12=tls12,
                                        tag=f"{name} again {n}")
        check(how == "Reused", f"reconnection {n} ({name}, {ver}) was "
              f"{how}, not Reused")
        check(v == ver and c == ciph, f"resumed with {v} {c}")
        w, resumed, sni = worker_of(d, mid)
        check(resumed, f"finaldot logged resumed=0 for {mid}")
        workers[w] = workers.get(w, 0) + 1
        sent[mid] = (body, v, c)
        n += 1
    return ver, issuer, workers, n


def case_s_client(tmp, pki):
    sent = {}
    report = []
    with Daemon(*pki.args("mx.test", "other.test"), threads=2) as d:
        for name, tls12 in (("mx.test", False), ("mx.test", True),
                            ("other.test", False)):
            ver, issuer, workers, n = resumption(d, pki, tmp, name, tls12,
                                                 sent)
            check(any(w != issuer for w in workers),
                  f"no resumption on a worker other than the issuer {issuer}")
            report.append(f"{name} {ver}: {n} reused on workers "
                          f"{dict(sorted(workers.items()))}")
        for msgid, (body, version, cipher) in sent.items():
            check_stored(d, msgid, body)
            check_esmtps(d, msgid, version, cipher)
        check(spool_ids(d) == set(sent), f"spool: {spool_ids(d)}")
        # A restarted daemon has new ticket keys: the old ticket must not
        # resume (so "Reused" above came from the shared keys, not from
        # something s_client did on its own).
        d.stop()
        d.start()
        stem = os.path.join(tmp, "sess-chain")
        how, *_ = s_client(d.port, "mx.test", pki.ca,
                           sess_in=os.path.join(tmp, "sess-mx.test-13.0.pem"),
                           sess_out=stem + ".0.pem")
        check(how == "New", f"ticket of the previous run: {how}")
        # TLS 1.3 clients use a ticket once (RFC 8446 C.4, 4.6.1), so a
        # resumed session must hand out a new one, or every second
        # connection of such a client is a full handshake. s_client writes
        # -sess_out only when a ticket arrives.
        for i in range(1, 4):
            out = f"{stem}.{i}.pem"
            how, *_ = s_client(d.port, "mx.test", pki.ca,
                               sess_in=f"{stem}.{i - 1}.pem", sess_out=out,
                               need_ticket=False)
            check(how == "Reused", f"chained reconnection {i}: {how}")
            check(os.path.exists(out) and os.path.getsize(out) > 0,
                  f"resumed TLS 1.3 session {i} got no new session ticket: "
                  f"a client that uses each ticket once (RFC 8446 C.4) "
                  f"cannot resume again")
    print("ok: s_client resumption across workers: " + "; ".join(report)
          + "; restarted daemon: New; resumed sessions get new tickets")


# ------------------------------------------------------------ main

CASES = {"swaks": case_swaks, "postfix": case_postfix,
         "smtplib": case_smtplib, "s_client": case_s_client}


def main():
    names = sys.argv[1:] or list(CASES)
    for n in names:
        if n not in CASES:
            fail(f"unknown case {n}; cases: {' '.join(CASES)}")
    if not shutil.which("openssl"):
        skip("openssl is not installed (certificates are made with it)")
    tmp = tempfile.mkdtemp(prefix="fdtls-")
    skipped = []
    try:
        pki = Pki(tmp)
        for n in names:
            try:
                CASES[n](tmp, pki)
            except SystemExit as e:
                if e.code != 77:
                    raise
                skipped.append(n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if skipped:
        # Each skip printed its reason; what ran passed.
        print(f"SKIP: {len(skipped)} of {len(names)} cases skipped: "
              f"{' '.join(skipped)}")
        sys.exit(77)


main()
