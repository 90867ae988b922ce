#!/usr/bin/python3
"""STARTTLS from the delivery client to the next hop (RFC 3207), per route:
finaldot A delivers to finaldot B (the next hop, queueing only), both on
127.0.0.1, with the route's tls= policy:

  may (the default)  B offers STARTTLS: used; B without a certificate:
                     delivered in the clear
  encrypt            B without a certificate: deferred ("TLS is
                     required"), nothing reaches B
  verify,ca=CA       B's certificate signed by CA and naming the route's
                     host: delivered, logged "verified"; signed by another
                     CA: deferred ("certificate verification failed")

Each delivered message is byte-identical in B's spool (after B's Received,
which says ESMTPS when TLS was used). Certificates are made with the
openssl CLI in the test's temp dir."""
import os
import re
import shutil
import subprocess
import tempfile
import time

from delivtest import message, send, wait
from fdtest import Daemon, check, skip

if not shutil.which("openssl"):
    skip("the openssl command is missing")

TMP = tempfile.mkdtemp(prefix="fdtlsdel-")


def openssl(*args):
    r = subprocess.run(["openssl", *args], capture_output=True, timeout=60)
    check(r.returncode == 0, f"openssl {args}: {r.stderr.decode()}")


def make_ca(name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:P-256", "-nodes", "-keyout",
            f"{TMP}/{name}.key", "-out", f"{TMP}/{name}.crt", "-days", "30",
            "-subj", f"/CN={name}")
    return f"{TMP}/{name}.crt"


def make_leaf(ca, name, san):
    key, csr, crt = (f"{TMP}/{name}.key", f"{TMP}/{name}.csr",
                     f"{TMP}/{name}.crt")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", csr,
            "-subj", f"/CN={name}")
    with open(f"{TMP}/{name}.ext", "w") as f:
        f.write(f"subjectAltName={san}\n")
    openssl("x509", "-req", "-in", csr, "-CA", f"{TMP}/{ca}.crt", "-CAkey",
            f"{TMP}/{ca}.key", "-CAcreateserial", "-out", crt, "-days", "30",
            "-extfile", f"{TMP}/{name}.ext")
    return crt, key


def delivery_line(a, qid, timeout=30):
    """A's event=delivery line for queue id qid once it is final or
    deferred."""
    pat = re.compile(rf"{qid} event=delivery .*status=(sent|deferred)")
    found = {}

    def seen():
        for l in a.read_run_log().splitlines():
            if pat.search(l):
                found["l"] = l
                return True
        return False
    wait(seen, timeout, f"a delivery line for {qid}")
    return found["l"]


def in_b(b, subject):
    """B's stored copy of the message with this subject, or None."""
    for mid, raw in b.export().items():
        if f"Subject: {subject}".encode() in raw:
            return raw
    return None


def case(name, b_args, policy, expect_sent, expect_tls):
    with Daemon(*b_args) as b:
        route = f"example.com=smtp:{policy[0]}:{b.port}{policy[1]}"
        with Daemon("--route", route, "--retry-min", "60s", delivery=True,
                    relay=True) as a:
            subject = f"tls-{name}"
            body = message(1, 3000, subject)
            qid = send(a, "s@client.test", ["u@example.com"], body)
            line = delivery_line(a, qid)
            if not expect_sent:
                check("status=deferred" in line, f"{name}: {line}")
                check(re.search(expect_tls, line), f"{name}: {line}")
                time.sleep(0.3)
                check(in_b(b, subject) is None,
                      f"{name}: the message reached the next hop")
                print(f"ok: {name}: deferred: "
                      f"{re.search(r'reply=(.*)', line).group(1)}")
                return
            check("status=sent" in line, f"{name}: {line}")
            check(re.search(expect_tls, line), f"{name}: tls in {line}")
            raw = None
            for _ in range(100):
                raw = in_b(b, subject)
                if raw:
                    break
                time.sleep(0.05)
            check(raw is not None, f"{name}: not in B's spool")
            head, _, rest = raw.partition(b"\r\n\r\n")
            tls_used = expect_tls != r'tls="none"'
            check((b" with ESMTPS id " in raw[:800]) == tls_used,
                  f"{name}: B's Received: {raw[:400]!r}")
            # A's own Received stays on the message; B's comes first.
            sent = body.encode() if isinstance(body, str) else body
            check(raw.endswith(sent.split(b"\r\n\r\n", 1)[1]),
                  f"{name}: body differs at the next hop")
            how = re.search(r'tls=("[^"]*")', line).group(1)
            print(f"ok: {name}: sent, tls={how}")


def main():
    try:
        ca = make_ca("ca")
        make_ca("otherca")
        crt, key = make_leaf("ca", "mxcert", "IP:127.0.0.1,DNS:localhost")
        b_tls = ["--tls-cert", crt, "--tls-key", key]
        case("may", b_tls, ("127.0.0.1", ""), True,
             r'tls="TLSv1\.[23] with cipher ')
        case("may-clear", [], ("127.0.0.1", ""), True, r'tls="none"')
        case("encrypt-not-offered", [], ("127.0.0.1", ",tls=encrypt"), False,
             r"TLS is required, but the next hop does not offer STARTTLS")
        case("encrypt", b_tls, ("127.0.0.1", ",tls=encrypt"), True,
             r'tls="TLSv1\.[23] with cipher ')
        case("verify-ip", b_tls, ("127.0.0.1", f",tls=verify,ca={ca}"), True,
             r'tls="TLSv1\.[23] with cipher .* verified"')
        case("verify-name", b_tls, ("localhost", f",tls=verify,ca={ca}"),
             True, r'tls="TLSv1\.[23] with cipher .* verified"')
        case("verify-wrong-ca", b_tls,
             ("127.0.0.1", f",tls=verify,ca={TMP}/otherca.crt"), False,
             r"certificate verification failed")
        case("none", b_tls, ("127.0.0.1", ",tls=none"), True, r'tls="none"')
    finally:
        shutil.rmtree(TMP, ignore_errors=True)


main()
