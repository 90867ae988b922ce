#!/usr/bin/python3
"""tools/bench's TLS anchor: a private Postfix smtpd with STARTTLS.

Started the way the integration tests start their Postfix next hop
(tests/integration/peers.py, PostfixPeer: `postfix -c DIR start` with its
own main.cf and master.cf in DIR, listening only on 127.0.0.1:PORT,
everything it writes under DIR (its log too, unless --log FILE), stopped
by its own PIDs), plus:

  smtpd_tls_cert_file/key_file   --cert/--key: a pair tools/bench made
                                 (Postfix's RSA slot; an ECDSA pair there
                                 works too, as the messages load has it)
  smtpd_tls_eccert_file/eckey_file
                                 --eccert/--eckey: Postfix's ECDSA slot
                                 (the handshake loads give one slot each,
                                 so which key signs is certain)
  smtpd_tls_security_level       may (STARTTLS offered, not required)
  tlsmgr in master.cf            smtpd's TLS session-ticket keys and PRNG
  smtpd_data_restrictions        check_client_access static:HOLD: every
                                 accepted message goes to the hold queue,
                                 durable (Postfix fsyncs the queue file
                                 before its 250) but never delivered, as
                                 finaldot --delivery off only queues; so
                                 the figure is acceptance against
                                 acceptance, with no delivery agents
                                 taking the CPU
  recipients                     alice@dest.test (and any local part of
                                 dest.test): the bench sends --to there

Session resumption is Postfix's default: tlsmgr makes the ticket keys
(RFC 5077; TLS 1.3 tickets too) and smtpd issues tickets while
smtpd_tls_session_cache_timeout (3600s) is not 0; no server-side session
cache database is configured.

With --cgroup DIR (a directory the bench made in the cgroup v2 hierarchy)
this process moves itself into DIR before it starts Postfix, so the master
and everything it forks, exited processes included, are counted in
DIR/cpu.stat: the bench reads Postfix's CPU there.

It writes "PORT MASTER_PID" to --ready FILE once smtpd greets, then waits
for SIGTERM or SIGINT, stops Postfix and exits 0. Exit 77 when Postfix,
root or the postfix user is missing (the reason on stdout), 1 when Postfix
would not start (its log on stderr).
"""
import argparse
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
from peers import PeerError, PostfixPeer  # noqa: E402


class PostfixTLS(PostfixPeer):
    def _write_config(self):
        super()._write_config()
        # smtpd asks tlsmgr for its ticket keys and PRNG seed; the peer's
        # master.cf has no TLS services of its own.
        with open(os.path.join(self.etc, "master.cf"), "a") as f:
            f.write("tlsmgr unix - - n 1000? 1 tlsmgr\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", required=True,
                    help="Postfix's directory (config, queue, log); its "
                    "parents must be traversable by the postfix user")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", help="smtpd_tls_cert_file")
    ap.add_argument("--key", help="smtpd_tls_key_file")
    ap.add_argument("--eccert", help="smtpd_tls_eccert_file")
    ap.add_argument("--eckey", help="smtpd_tls_eckey_file")
    ap.add_argument("--cgroup",
                    help="cgroup v2 directory to move into before Postfix "
                    "starts (its cpu.stat then counts all of Postfix)")
    ap.add_argument("--log",
                    help="Postfix's log file (default DIR/maillog); the "
                    "bench puts it on tmpfs, as it does finaldot's")
    ap.add_argument("--ready", required=True,
                    help="file to write 'PORT MASTER_PID' into when up")
    a = ap.parse_args()
    if bool(a.cert) != bool(a.key) or bool(a.eccert) != bool(a.eckey) or \
            not (a.cert or a.eccert):
        ap.error("give --cert and --key, or --eccert and --eckey, or both")
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    main_cf = {
        "smtpd_tls_security_level": "may",
        "smtpd_tls_loglevel": "0",
        "smtpd_data_restrictions": "check_client_access static:HOLD",
    }
    if a.cert:
        main_cf["smtpd_tls_cert_file"] = os.path.abspath(a.cert)
        main_cf["smtpd_tls_key_file"] = os.path.abspath(a.key)
    if a.eccert:
        main_cf["smtpd_tls_eccert_file"] = os.path.abspath(a.eccert)
        main_cf["smtpd_tls_eckey_file"] = os.path.abspath(a.eckey)
    if a.cgroup:
        # Before `postfix start`: the master inherits the cgroup, and so
        # does every process it forks from then on.
        try:
            with open(os.path.join(a.cgroup, "cgroup.procs"), "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as e:
            print(f"bench_postfix_tls: cannot join {a.cgroup}: {e}",
                  file=sys.stderr)
            return 1
    if a.log:
        log = os.path.abspath(a.log)
        main_cf["maillog_file"] = log
        main_cf["maillog_file_prefixes"] = os.path.dirname(log)
    try:
        pf = PostfixTLS(tmpdir=a.dir, port=a.port, main=main_cf,
                        hostname="anchor.bench.test")
    except PeerError as e:
        print(f"bench_postfix_tls: {e}", file=sys.stderr)
        return 1
    with pf:
        # after the peer's own SIGTERM handling was installed: ours only
        # asks the loop below to end, so the with-block stops Postfix
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        tmp = a.ready + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{pf.port} {pf.master_pid}\n")
        os.rename(tmp, a.ready)
        while not stop["now"]:
            time.sleep(0.2)  # not pause(): a signal may come before it
    return 0


if __name__ == "__main__":
    sys.exit(main())
