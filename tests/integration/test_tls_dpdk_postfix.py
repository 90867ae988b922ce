#!/usr/bin/python3
"""Postfix as a TLS relay client into finaldot on the kernel-bypass path.

finaldot runs on a DPDK net_tap vdev (or net_af_packet on a veth pair:
argument af_packet) in a namespace this test makes (as test_tls_dpdk.py,
through fdnet: 198.18.0.2 for the daemon, 198.18.0.1 the kernel's side).
A private Postfix (its own -c config directory, peers.PostfixPeer plus an
smtp client) is started inside the same namespace with `ip netns exec`, so
its smtpd listens on the namespace's 127.0.0.1 and its smtp client reaches
finaldot's DPDK address. Messages are handed to its
smtpd by a small smtplib program run in the namespace; Postfix relays them
to relayhost = [198.18.0.2]:25 with smtp_tls_security_level = encrypt and
smtp_tls_CAfile = the test's CA.

  1. finaldot with a certificate (mx.test, signed by the test CA): three
     messages, one of ~200 kB (a dozen TLS records, lines that need dot
     stuffing), each stored once and byte-identical after finaldot's and
     Postfix's Received headers; finaldot's says "with ESMTPS" and names
     the TLS version and cipher Postfix logged for that delivery in its
     "Trusted TLS connection established" line (the chain verified against
     our CA; encrypt does not check the name).
  2. finaldot with --tls-required on: a message at encrypt is still
     delivered (ESMTPS); one routed (transport_maps) to a second smtp
     transport with smtp_tls_security_level = none gets "530 5.7.0 Must
     issue a STARTTLS command first" at MAIL and is deferred (soft_bounce:
     see below), and nothing of it reaches finaldot's spool.

Postfix treats a 5xx reply to MAIL as permanent and would bounce; the
relay sets soft_bounce = yes so that the refusal leaves the message in its
deferred queue (the shape a real relay would want while its TLS is broken)
instead of a bounce being relayed back into finaldot.

Usage: test_tls_dpdk_postfix.py [tap|af_packet]
Exit 0 pass, 1 fail, 77 skipped (no root, /dev/net/tun, DPDK build,
openssl or Postfix; the reason is printed).
"""
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdnet import DPDK_IP, DpdkDaemon, Netns, need_root_netns  # noqa: E402
from fdtest import check, fail, skip, smtplib_body, strip_received  # noqa
from peers import (PeerError, PostfixPeer, _alive, _ident,  # noqa: E402
                   _socket_inodes, _wait)

CRLF = b"\r\n"
# finaldot accepts these; plain.test goes through Postfix's TLS-less
# transport (transport_maps), everything else through relayhost.
DOMAINS = ("example.com", "plain.test")


def make_pki(tmp):
    """A CA and an ECDSA P-256 pair for mx.test signed by it; returns
    (ca.crt, mx.crt, mx.key)."""
    d = os.path.join(tmp, "pki")
    os.makedirs(d)

    def run(*args):
        r = subprocess.run(["openssl", *args], capture_output=True,
                           text=True, cwd=d, timeout=60)
        check(r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr}")

    run("req", "-x509", "-newkey", "ec", "-pkeyopt",
        "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key", "-out",
        "ca.crt", "-days", "2", "-subj", "/CN=finaldot dpdk test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext",
        "keyUsage=critical,keyCertSign,cRLSign")
    with open(os.path.join(d, "mx.ext"), "w") as f:
        f.write("subjectAltName=DNS:mx.test\nbasicConstraints=CA:FALSE\n"
                "keyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=serverAuth\n")
    run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", "mx.key", "-out", "mx.csr", "-subj",
        "/CN=mx.test")
    run("x509", "-req", "-in", "mx.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-set_serial", "0x" + os.urandom(8).hex(), "-days", "2", "-extfile",
        "mx.ext", "-out", "mx.crt")
    # Postfix's smtp client (user postfix) reads the CA file.
    os.chmod(d, 0o755)
    os.chmod(os.path.join(d, "ca.crt"), 0o644)
    return tuple(os.path.join(d, n) for n in ("ca.crt", "mx.crt", "mx.key"))


def listens_in_netns(pid, port):
    """pid holds a listening TCP socket on port, looked up in pid's own
    network namespace (/proc/PID/net/tcp; /proc/net is the reader's)."""
    mine = _socket_inodes(pid)
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return False
    for row in rows:
        col = row.split()
        if (len(col) > 9 and col[3] == "0A" and col[9] in mine
                and int(col[1].rsplit(":", 1)[1], 16) == port):
            return True
    return False


class NsPostfixRelay(PostfixPeer):
    """PostfixPeer started inside netns ns, with an SMTP client: what its
    smtpd accepts from 127.0.0.0/8 goes to relayhost [DPDK_IP]:25 at
    smtp_tls_security_level = encrypt, except plain.test, which goes to the
    same host through the transport "plain" at level none.

    tlsmgr is added to master.cf: without it Postfix 3.7's client has no
    PRNG seed, turns TLS off and defers ("TLS is required, but our TLS
    engine is unavailable")."""
    kind = "postfix-relay-ns"

    def __init__(self, ns, cafile, **kw):
        self.ns = ns
        main = {
            "relayhost": f"[{DPDK_IP}]:25",
            "default_transport": "smtp",
            "relay_transport": "smtp",
            "smtpd_relay_restrictions":
                "permit_mynetworks, reject_unauth_destination",
            "smtp_tls_security_level": "encrypt",
            "smtp_tls_CAfile": cafile,
            "smtp_tls_loglevel": "1",
            "smtp_connect_timeout": "10s",
            # A refusal at MAIL stays in the queue (see the file's head).
            "soft_bounce": "yes",
            # A deferred message is not retried while the test looks.
            "minimal_backoff_time": "300s",
            "maximal_backoff_time": "600s",
            "queue_run_delay": "300s",
        }
        super().__init__(main=main, hostname="relay.test", **kw)

    def _write_config(self):
        table = os.path.join(self.etc, "transport")
        self.extra_main["transport_maps"] = f"texthash:{table}"
        with open(table, "w") as f:
            f.write(f"plain.test plain:[{DPDK_IP}]:25\n")
        super()._write_config()
        with open(os.path.join(self.etc, "master.cf"), "a") as f:
            f.write("smtp unix - - n - - smtp\n"
                    "plain unix - - n - - smtp "
                    "-o smtp_tls_security_level=none\n"
                    "tlsmgr unix - - n 1000? 1 tlsmgr\n")

    def _launch(self, port):
        """PostfixPeer's launch, but `postfix start` inside the namespace
        (the master and all it forks stay there), and the listener looked
        up in the master's namespace. The banner check is left to the
        first injection."""
        self.port = port
        self.target = f"smtp:127.0.0.1:{port}"
        self._write_config()
        r = subprocess.run(self.ns.argv([self.postfix, "-c", self.etc,
                                         "start"]),
                           capture_output=True, text=True, env=self._env(),
                           timeout=60, stdin=subprocess.DEVNULL)
        self.master_pid = self._read_master_pid()
        self._master = _ident(self.master_pid) if self.master_pid else None
        if r.returncode != 0 or not self._master:
            raise PeerError(f"postfix -c {self.etc} start in {self.ns.name} "
                            f"failed ({r.returncode}): {r.stdout}{r.stderr}"
                            f"\n{self.log()[-3000:]}")
        ok = _wait(lambda: listens_in_netns(self.master_pid, port)
                   or not _alive(self._master), self.start_timeout)
        if not ok or not _alive(self._master):
            raise PeerError(f"postfix master did not listen on port {port} "
                            f"in {self.ns.name}:\n{self.log()[-3000:]}")

    # The smtplib program run in the namespace: JSON [[from, to, base64
    # body], ...] on stdin, one session per message; prints the queue ids.
    INJECT = r"""
import base64, json, re, smtplib, sys
port = int(sys.argv[1])
ids = []
for sender, rcpt, body in json.load(sys.stdin):
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo("inject.test")
        s.mail(sender)
        code, resp = s.rcpt(rcpt)
        if code != 250:
            sys.exit(f"RCPT {rcpt}: {code} {resp}")
        code, resp = s.data(base64.b64decode(body))
        if code != 250:
            sys.exit(f"DATA: {code} {resp}")
    ids.append(re.search(rb"queued as ([0-9A-Za-z]+)", resp).group(1).decode())
print(json.dumps(ids))
"""

    def inject(self, msgs):
        """Hand [(sender, rcpt, body)] to this Postfix's smtpd, from inside
        the namespace; the queue ids, in order."""
        data = json.dumps([[s, r, base64.b64encode(b).decode()]
                           for s, r, b in msgs])
        r = subprocess.run(self.ns.argv(["/usr/bin/python3", "-c",
                                         self.INJECT, str(self.port)]),
                           input=data, capture_output=True, text=True,
                           timeout=120)
        check(r.returncode == 0, f"injection into postfix: {r.stderr}\n"
              f"{self.log()[-2000:]}")
        return json.loads(r.stdout)

    def deliveries(self):
        """{queue id: (status line, TLS line or None)}: each delivery
        attempt's status line with the TLS line its smtp process logged
        last before it (Postfix's smtp reuses processes, one session at a
        time each; without connection reuse every session starts with its
        own handshake)."""
        out = {}
        last_tls = {}
        for line in self.log().splitlines():
            m = re.search(r" postfix/(\w+)\[(\d+)\]: ", line)
            if not m or m.group(1) not in ("smtp", "plain"):
                continue
            proc = m.group(1) + m.group(2)
            if "TLS connection established to " in line:
                last_tls[proc] = line
            elif "connect to " in line or "SSL_connect" in line:
                last_tls.pop(proc, None)
            s = re.search(r": ([0-9A-F]{6,}): to=<.* status=", line)
            if s and s.group(1) not in out:
                out[s.group(1)] = (line, last_tls.pop(proc, None))
        return out

    def wait_outcomes(self, qids, timeout):
        deadline = time.monotonic() + timeout
        while True:
            got = self.deliveries()
            if all(q in got for q in qids):
                return got
            if time.monotonic() >= deadline:
                fail(f"postfix logged no outcome for "
                     f"{[q for q in qids if q not in got]} in {timeout}s:\n"
                     f"{self.log()[-3000:]}")
            time.sleep(0.1)

    def queued(self, sub):
        """Queue ids in Postfix's queue subdirectory sub (deferred, ...)."""
        return {n for _, _, files in os.walk(os.path.join(self.queue, sub))
                for n in files}


def big_body(tag, lines=3000):
    """~200 kB in CRLF lines, some starting with a dot (RFC 5321 4.5.2)."""
    out = [f"Subject: {tag}", f"Message-ID: <{tag}@relay.test>", ""]
    for i in range(lines):
        lead = "." if i % 97 == 0 else ""
        out.append(f"{lead}{tag} line {i:05d} " + "abcdefghij" * 5)
    return ("\r\n".join(out) + "\r\n").encode()


def message(tag, body):
    # Full headers, so cleanup(8) adds nothing but its Received.
    return (f"From: <sender@src.test>\r\nTo: <user@example.com>\r\n"
            f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n").encode() + body


def small(tag):
    return message(tag, (f"Subject: {tag}\r\nMessage-ID: <{tag}@relay.test>"
                         f"\r\n\r\nline 1\r\n.dot line\r\n..two dots\r\n.\r\n"
                         f"end\r\n").encode())


USING = re.compile(r"\(using (TLSv1\.[23]) with cipher ([A-Za-z0-9_-]+) "
                   r"\((\d+)/(\d+) bits\)\)")
PF_TLS = re.compile(r"(Trusted|Verified|Untrusted|Anonymous) TLS connection "
                    r"established to " + re.escape(DPDK_IP) + r"\[" +
                    re.escape(DPDK_IP) + r"\]:25: (TLSv1\.[23]) with cipher "
                    r"(\S+) \((\d+)/(\d+) bits\)")


def received(stored):
    """finaldot's Received header of a stored message, unfolded."""
    head = stored[:len(stored) - len(strip_received(stored))]
    return re.sub(r"\r\n[ \t]+", " ", head.decode("utf-8", "replace")).strip()


def check_relayed(d, pf, sent, outcomes):
    """Every message of sent {postfix qid: body} was relayed over TLS:
    Postfix's status=sent names finaldot's id, its TLS line says Trusted,
    finaldot's Received says ESMTPS with that version and cipher, and the
    stored bytes after the two Received headers are what was handed to
    Postfix. Returns {finaldot id: (version, cipher)}."""
    stored = d.export()
    got = {}
    for qid, body in sent.items():
        line, tls = outcomes[qid]
        mid = pf.relayed_id(line, f"{DPDK_IP}[{DPDK_IP}]:25", f" {qid}")
        check(tls is not None, f"{qid}: no 'TLS connection established' "
              f"line before its delivery:\n{pf.log()[-3000:]}")
        t = PF_TLS.search(tls)
        check(t is not None, f"{qid}: unexpected TLS line: {tls}")
        check(t.group(1) == "Trusted",
              f"{qid}: Postfix did not verify the chain to the test CA: "
              f"{tls}")
        check(mid in stored, f"{mid} ({qid}) is not in finaldot's spool")
        raw = stored[mid]
        rcv = received(raw)
        check(re.search(r" with ESMTPS id " + mid + r"\b", rcv),
              f"{mid}: no 'with ESMTPS id {mid}' in {rcv!r}")
        u = USING.search(rcv)
        check(u is not None, f"{mid}: no '(using ... with cipher ...)' in "
              f"{rcv!r}")
        check(u.group(1) == t.group(2) and u.group(2) == t.group(3) and
              u.group(3) == t.group(4),
              f"{mid}: Received names {u.groups()}, Postfix negotiated "
              f"{t.groups()[1:]}: {rcv!r}")
        after = strip_received(raw)
        pf_rcv = after[:len(after) - len(strip_received(after))]
        check(b"by relay.test (Postfix) with ESMTP" in pf_rcv,
              f"{mid}: second header is not Postfix's Received: "
              f"{pf_rcv[:300]!r}")
        want = smtplib_body(body)
        rest = strip_received(after)
        check(rest == want, f"{mid}: relayed message differs ({len(rest)} vs "
              f"{len(want)} bytes): {rest[:300]!r}")
        got[mid] = (t.group(2), t.group(3))
    return got


class Dpdk(DpdkDaemon):
    """DpdkDaemon that does not outlive a failed start: a start that fails
    (no ready line, no ping) exits from the constructor, before any
    with-block could stop the process, and a busy-polling daemon left
    behind takes its lcore from everything after it."""

    def start(self, wait_ready=True):
        try:
            super().start(wait_ready)
        except BaseException:
            if self.proc is not None and self.proc.poll() is None:
                self.kill9()
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


def tls_dpdk_args(crt, key):
    return ("--tls-cert", crt, "--tls-key", key,
            "--tls-handshake-timeout", "5s")


def stop_daemon(d):
    """Stop finaldot inside its with-block, so that a slow or unclean exit
    fails with its log printed (the block's exit prints it)."""
    status = d.stop()
    check(status == 0, f"finaldot exited {status} at SIGTERM")


def drop_veth(ns, d):
    """With af_packet the veth pair outlives the daemon, its kernel side
    still holding 198.18.0.1/24: the next daemon's pair would share the
    route. (A tap goes away with its daemon.)"""
    if d.vdev != "tap":
        ns.sh(f"ip link del {d.iface}", check_rc=False)


def remove_eal_dir(ns):
    """DPDK's EAL leaves its runtime directory (named by --file-prefix,
    fdnet: "fd" + the namespace's name) behind; it is ours alone."""
    shutil.rmtree(f"/var/run/dpdk/fd{ns.name}", ignore_errors=True)


def main():
    vdev = sys.argv[1] if len(sys.argv) > 1 else "tap"
    if vdev not in ("tap", "af_packet"):
        fail(f"unknown vdev {vdev}: tap or af_packet")
    need_root_netns()
    if not shutil.which("openssl"):
        skip("openssl is not installed (certificates are made with it)")
    if not os.access("/usr/sbin/postfix", os.X_OK):
        skip("Postfix is not installed (/usr/sbin/postfix)")
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="fdtlspf-")
    ns_used = None
    try:
        ca, crt, key = make_pki(tmp)
        with Netns() as ns, NsPostfixRelay(ns, ca) as pf:
            ns_used = ns
            # 1. three messages, one of ~200 kB, at encrypt.
            with Dpdk(ns, *tls_dpdk_args(crt, key), vdev=vdev,
                            domains=DOMAINS) as d:
                bodies = [small("pfdpdk1"), message("pfdpdk2",
                                                    big_body("pfdpdk2")),
                          small("pfdpdk3")]
                qids = pf.inject([("sender@src.test", "user@example.com", b)
                                  for b in bodies])
                outcomes = pf.wait_outcomes(qids, 60)
                ids = check_relayed(d, pf, dict(zip(qids, bodies)),
                                    outcomes)
                check(set(d.export()) == set(ids),
                      f"spool holds {sorted(d.export())}, want {sorted(ids)}")
                ciphers = sorted(set(ids.values()))
                stop_daemon(d)
            drop_veth(ns, d)
            print(f"ok: postfix relayed 3 messages (200 kB among them) over "
                  f"TLS into finaldot on DPDK: {ciphers}; byte-identical, "
                  f"ESMTPS, Postfix verified our CA")
            # 2. --tls-required on: encrypt still delivers; TLS off gets
            # 530 5.7.0 and stays queued.
            with Dpdk(ns, *tls_dpdk_args(crt, key), "--tls-required",
                            "on", vdev=vdev, domains=DOMAINS) as d:
                enc = small("pfdpdkreq")
                plain = small("pfdpdkplain").replace(b"user@example.com",
                                                     b"user@plain.test")
                qe, qp = pf.inject([
                    ("sender@src.test", "user@example.com", enc),
                    ("sender@src.test", "user@plain.test", plain)])
                outcomes = pf.wait_outcomes([qe, qp], 60)
                ids = check_relayed(d, pf, {qe: enc}, outcomes)
                line, tls = outcomes[qp]
                # soft_bounce logs the refusal as SOFTBOUNCE (a deferral).
                check(re.search(r"status=(deferred|SOFTBOUNCE) ", line) and
                      "530 5.7.0 Must issue a STARTTLS command first" in line
                      and "in reply to MAIL FROM command" in line,
                      f"want a deferral for 530 5.7.0 at MAIL: {line}")
                check(tls is None, f"{qp} went over TLS: {tls}")
                check(f"relay={DPDK_IP}[{DPDK_IP}]:25" in line,
                      f"{qp} deferred by someone else: {line}")
                check(qp in pf.queued("deferred"),
                      f"{qp} not in Postfix's deferred queue: "
                      f"{pf.queued('deferred')}")
                stored = d.export()
                check(set(stored) == set(ids),
                      f"spool holds {sorted(stored)}, want {sorted(ids)}")
                check(not any(b"pfdpdkplain" in v for v in stored.values()),
                      "the TLS-less message reached the spool")
                stop_daemon(d)
            print("ok: --tls-required on: encrypt delivered (ESMTPS); "
                  "smtp_tls_security_level=none got 530 5.7.0 and deferred, "
                  "nothing stored")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if ns_used is not None:
            remove_eal_dir(ns_used)
    print(f"ok: {vdev}, {time.monotonic() - t0:.1f} s")


main()
