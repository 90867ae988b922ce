#!/usr/bin/python3
"""The daemon under ThreadSanitizer: FINALDOT_TSAN names a finaldot built
with -Db_sanitize=thread (tools/test builds one). The threads that share
state meet: delivery threads connect to next hops (each connection reads
its next hop's TLS policy) while reloads (SIGHUP) rewrite every next hop's
policy, the queue manager takes the workers' announcements, operators'
calls come through the control socket and /metrics is scraped. The
reload's rewrite was a race that a sanitizer run found once (a delivery
thread read the policy while the reload wrote it); this keeps such races
out. Any report fails the test: the sanitizer prints it into the log and
makes the exit status 66.
Skipped (77) when FINALDOT_TSAN is not set; a failure when it names no
program. Exits 0 pass, 1 fail."""
import atexit
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fdtest  # noqa: E402
from fdtest import Daemon, check, free_port, skip  # noqa: E402
from delivtest import send, message, reload  # noqa: E402
from peers import ScriptedHop  # noqa: E402

DOMAINS = [f"d{i}.test" for i in range(8)]
RELOADS = 8


def config(hops, tls):
    lines = [f"smtp_tls = {tls}", "retry_min = 1s", "retry_max = 2s"]
    for i, dom in enumerate(DOMAINS):
        hop = hops[i % len(hops)]
        lines += [f"accept_domain = {dom}", f"route = {dom}={hop.target}"]
    return "\n".join(lines) + "\n"


def delivered(hops):
    return sum(len(h.completed()) for h in hops)


def main():
    tsan = os.environ.get("FINALDOT_TSAN", "")
    if not tsan:
        skip("FINALDOT_TSAN names no ThreadSanitizer build of finaldot "
             "(tools/test makes one)")
    check(os.access(tsan, os.X_OK), f"FINALDOT_TSAN={tsan}: no such "
          "program (its build failed?)")
    fdtest.FINALDOT = tsan  # Daemon starts this binary
    tmp = tempfile.mkdtemp(prefix="fdtsan-")
    atexit.register(shutil.rmtree, tmp, True)
    conf = os.path.join(tmp, "finaldot.conf")
    mport = free_port()
    env = {"TSAN_OPTIONS": "exitcode=66 halt_on_error=0 history_size=4"}
    with ScriptedHop() as h0, ScriptedHop() as h1, ScriptedHop() as h2, \
            ScriptedHop() as h3:
        hops = [h0, h1, h2, h3]
        with open(conf, "w") as f:
            f.write(config(hops, "may"))
        with Daemon("--config", conf, "--metrics", f"127.0.0.1:{mport}",
                    "--delivery-threads", "2", delivery=True, relay=False,
                    domains=(), env=env) as d:
            stop = threading.Event()
            reloads, failed = [0], []

            def reloaded():
                return len(re.findall(r"event=reloaded route_gen=",
                                      d.read_run_log()))

            def reloader():
                # Alternate the default policy: every known next hop's
                # is rewritten at each reload. One at a time, each
                # waited for: signals that come while one is applied
                # make only one more.
                try:
                    while not stop.is_set():
                        tls = "none" if reloads[0] % 2 else "may"
                        reload(d, conf, config(hops, tls))
                        reloads[0] += 1
                except SystemExit:  # check() failed, in this thread
                    failed.append(True)

            t = threading.Thread(target=reloader)
            t.start()
            try:
                # Until eight reloads were applied (the queue manager
                # takes one about every second), or 60 s.
                sent, deadline = 0, time.time() + 60
                while reloaded() < RELOADS and time.time() < deadline:
                    # Each message to the next domain, whose next hop is
                    # another: a delivery thread keeps one connection, so
                    # nearly every delivery connects anew and reads its
                    # next hop's policy.
                    send(d, "s@client.test",
                         [f"u{sent}@{DOMAINS[sent % len(DOMAINS)]}"],
                         message(sent, 600))
                    if sent % 16 == 0:
                        d.ctl("status")
                        urllib.request.urlopen(
                            f"http://127.0.0.1:{mport}/metrics",
                            timeout=10).read()
                    sent += 1
                deadline = time.time() + 60
                while time.time() < deadline and delivered(hops) < sent:
                    time.sleep(0.1)
            finally:
                stop.set()
                t.join()
            got, n = delivered(hops), reloaded()
            sessions = sum(len(h.sessions) for h in hops)
            rc = d.stop(timeout=60)
            log = d.read_log()
            reports = log.count("WARNING: ThreadSanitizer")
            i = log.find("WARNING: ThreadSanitizer")
            check(reports == 0, f"{reports} ThreadSanitizer reports; the "
                  f"first:\n{log[i:i + 4000]}")
            check(rc == 0, f"exit status {rc} (66: a sanitizer report)")
            check(not failed, "a reload was not applied within 10 s")
            check(got == sent, f"{got} of {sent} delivered")
            check(n >= RELOADS, f"only {n} reloads applied")
            check(sessions >= 4 * RELOADS, f"only {sessions} connections "
                  "to the next hops: few read their policy")
    print(f"ok: {sent} messages to {len(hops)} next hops over "
          f"{sessions} connections, {n} reloads, no ThreadSanitizer "
          "report")


if __name__ == "__main__":
    main()
