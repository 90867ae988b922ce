#!/usr/bin/python3
"""RFC 1047's gap, end to end: a client sends a message, the server's
packets to it are dropped (iptables, in a namespace this test makes) right
after the final dot, so the 250 never arrives; the client gives up and
sends the message again on a new connection. The next hop (a Maildir)
must get ONE copy. Controls: a resend after an acknowledged 250 is
delivered twice; an in-doubt message followed by different content is
delivered twice; in-doubt state survives a kill -9 between the first copy
and the resend. Kernel transport also: a resend that arrives before the
news (a quick reconnect) is suppressed when the news comes; news that
comes after the first copy was delivered and its segment reclaimed finds
the fingerprint in the table of recent ones. DPDK also: a client reset
while its message is being committed (no reply at all) leaves it in doubt.

Usage: test_indoubt.py kernel|dpdk
"""
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import FINALDOTCTL, Daemon, check, fail, skip  # noqa: E402
from fdnet import Netns, DpdkDaemon, DPDK_IP  # noqa: E402
from indoubt import CLIENT, body, send_once, fill  # noqa: E402

TRANSPORT = sys.argv[1] if len(sys.argv) > 1 else "kernel"

class Env:
    def __init__(self, ns, d, host, port):
        self.ns, self.d, self.host, self.port = ns, d, host, port

    def send(self, data, drop=False, **kw):
        return send_once(self.host, self.port, data, drop, self.ns.argv([]),
                         DPDK_IP if TRANSPORT == "dpdk" else None, **kw)

    def send_dropped_async(self, data, give_up=1.5):
        """A dropped send on its own thread: returns (thread, dot_sent);
        the thread's result goes into thread.reply."""
        dot = threading.Event()
        t = threading.Thread(daemon=True)

        def run():
            t.reply = self.send(data, drop=True, give_up=give_up,
                                dot_sent=dot)
        t.run = run
        t.start()
        return t, dot

    def copies(self, tag):
        root = os.path.join(self.d.tmp, "maildir", "example.com", "b", "new")
        n = 0
        for f in os.listdir(root) if os.path.isdir(root) else []:
            with open(os.path.join(root, f), "rb") as fh:
                if f"Message-ID: <{tag}@c.test>".encode() in fh.read():
                    n += 1
        return n


def wait_copies(env, tag, n, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline and env.copies(tag) < n:
        time.sleep(0.1)
    return env.copies(tag)


def wait_suppressed(d, before, timeout=15):
    """Until the log holds more event=suppressed lines than before (or the
    timeout: the caller checks what it expected)."""
    deadline = time.time() + timeout
    while d.read_log().count("event=suppressed ") <= before and \
            time.time() < deadline:
        time.sleep(0.05)


def scenario(env):
    d = env.d
    # 1. The 250 is lost; the client resends: one copy.
    b1 = body("lost1")
    check(env.send(b1, drop=True) == "NONE", "the 250 was not dropped")
    d.wait_log(r"event=indoubt", 15)
    r = env.send(b1)
    check(r.startswith("250"), f"the resend got {r}")
    d.wait_log(r"event=suppressed duplicate_of=", 15)
    # The operator sees the link (finaldotctl queue show).
    rid = r.split()[-1]
    show = subprocess.run([FINALDOTCTL, "--control",
                           os.path.join(d.tmp, "control.sock"), "queue",
                           "show", rid], capture_output=True, text=True)
    check(show.returncode == 0 and "resend:   of" in show.stdout,
          f"queue show {rid}: {show.returncode} {show.stdout}{show.stderr}")
    time.sleep(1)
    check(wait_copies(env, "lost1", 1) == 1 and env.copies("lost1") == 1,
          f"lost1: {env.copies('lost1')} copies delivered, expected 1")
    # 2. Control: the 250 arrived; a second send is a real second send.
    b2 = body("acked2")
    check(env.send(b2).startswith("250"), "first send")
    check(env.send(b2).startswith("250"), "second send")
    check(wait_copies(env, "acked2", 2) == 2,
          f"acked2: {env.copies('acked2')} copies, expected 2")
    # 3. Control: in doubt, then different content: both delivered.
    check(env.send(body("lost3"), drop=True) == "NONE", "drop 3")
    check(env.send(body("other3")).startswith("250"), "other content")
    check(wait_copies(env, "lost3", 1) == 1 and
          wait_copies(env, "other3", 1) == 1, "lost3/other3 each once")
    # 4. In-doubt state survives kill -9 between the copy and the resend.
    b4 = body("lost4")
    before = d.read_log().count("event=indoubt ")
    check(env.send(b4, drop=True) == "NONE", "drop 4")
    deadline = time.time() + 15
    while d.read_log().count("event=indoubt ") <= before and \
            time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the DLOG_INDOUBT record is written by now
    d.kill9()
    d.start()
    r = env.send(b4)
    check(r.startswith("250"), f"resend after restart: {r}\n"
          f"{d.read_log()[-2500:]}")
    time.sleep(2)
    check(wait_copies(env, "lost4", 1) == 1 and env.copies("lost4") == 1,
          f"lost4: {env.copies('lost4')} copies after kill -9, expected 1")


def scenario_queued(env):
    """The in-doubt message is still queued when the news comes (delivery
    off): its fingerprint is computed then, from the spool (a delivered
    message's was computed while its body went out), and the resend is
    still recognised."""
    d = env.d
    before = d.read_log().count("event=suppressed ")
    b5 = body("queued5")
    check(env.send(b5, drop=True) == "NONE", "drop 5")
    deadline = time.time() + 15
    while "delivered=not_yet" not in d.read_log() and \
            time.time() < deadline:
        time.sleep(0.05)
    check("delivered=not_yet" in d.read_log(),
          f"no in-doubt news for a queued message:\n{d.read_log()[-2000:]}")
    r = env.send(b5)
    check(r.startswith("250"), f"the resend got {r}")
    wait_suppressed(d, before)
    check(d.read_log().count("event=suppressed ") == before + 1,
          "the resend of a queued in-doubt message was not suppressed")


def scenario_news_after_reclaim(env):
    """The news comes after the in-doubt message was delivered and its
    segment reclaimed (the queue has forgotten it): its fingerprint is
    found in the table of recent ones, and the resend is suppressed. The
    client waits 6 s before it gives up; meanwhile 1.5 MB of other mail
    fills the 1 MiB segment, which is sealed, delivered and reclaimed."""
    d = env.d
    before = d.read_log().count("event=suppressed ")
    b7 = body("reclaimed7")
    t, dot = env.send_dropped_async(b7, give_up=6)
    check(dot.wait(15), "the dropped send did not get to its dot")
    time.sleep(0.3)  # the first copy is accepted before the filler
    check(fill(env.host, env.port, 40, 40000, env.ns.argv([])) == 40,
          "the filler was not all accepted")
    d.wait_log(r"event=segment_reclaimed|event=reclaimed", 10)
    t.join(30)
    check(getattr(t, "reply", None) == "NONE", "the 250 was not dropped")
    d.wait_log(r"event=indoubt ", 15)
    log = d.read_log()
    check("fingerprint=unknown" not in log,
          f"the reclaimed message's fingerprint was not remembered:\n"
          f"{log[-2000:]}")
    r = env.send(b7)
    check(r.startswith("250"), f"the resend got {r}")
    wait_suppressed(d, before)
    time.sleep(1)
    check(env.copies("reclaimed7") == 1,
          f"reclaimed7: {env.copies('reclaimed7')} copies, expected 1")


def scenario_resend_before_news(env):
    """A quick reconnect: the resend arrives while the first connection
    still waits for its 250 (before the in-doubt news), and is still
    queued when the news comes (delivery off): it is suppressed then, as
    a duplicate of the first copy."""
    d = env.d
    before = d.read_log().count("event=suppressed ")
    news = d.read_log().count("event=indoubt ")
    b6 = body("early6")
    t, dot = env.send_dropped_async(b6, give_up=3)
    check(dot.wait(15), "the dropped send did not get to its dot")
    time.sleep(0.5)  # the first copy is accepted before the resend
    r = env.send(b6)
    check(r.startswith("250"), f"the resend got {r}")
    check(d.read_log().count("event=indoubt ") == news,
          "the news came before the resend: this case tests nothing")
    t.join(30)
    check(getattr(t, "reply", None) == "NONE", "the 250 was not dropped")
    rid = r.split()[-1].lower()
    wait_suppressed(d, before)
    log = d.read_log()
    check(log.count("event=suppressed ") == before + 1 and
          f"{rid} event=suppressed" in log.lower(),
          f"the resend {rid} that came before the news was not "
          f"suppressed:\n{log[-2000:]}")


def scenario_reset_in_commit(ns):
    """DPDK: the client resets while its message is being committed (the
    spool's flushes held by the fault seam): the stack sees the RST at once
    and the session ends during the commit, before any reply. Once the
    message is durable it is in doubt (the spool tells the worker,
    orphan_done), and the resend is suppressed. Nothing was said before:
    the resend was delivered too."""
    hold = tempfile.mktemp(prefix="fdhold-")
    open(hold, "w").close()
    try:
        d = DpdkDaemon(ns, "--delivery", "on", "--dedup-settle", "2s",
                       delivery=True, domains=("example.com",),
                       env={"FINALDOT_SPOOL_FAULT": f"hold:{hold}"})
        with d:
            env = Env(ns, d, DPDK_IP, 25)
            b = body("reset8")
            p = subprocess.Popen(
                ns.argv([]) + ["/usr/bin/python3", "-c", CLIENT, DPDK_IP,
                               "25", "hold", "0.5", str(len(b))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            p.stdin.write(b)
            p.stdin.flush()
            p.stdout.readline()  # READY: the dot goes on GO
            p.stdin.write(b"GO\n")
            p.stdin.flush()
            out, _ = p.communicate(timeout=30)
            check(out.strip().endswith(b"NONE"),
                  f"a reply while the flushes are held: {out!r}")
            d.wait_log(r"event=disconnect .*state=commit", 10)
            os.unlink(hold)
            d.wait_log(r"event=reply_unacknowledged id=", 10)
            d.wait_log(r"event=indoubt settle_s=", 10)
            check("fingerprint=unknown" not in d.read_run_log(),
                  "the message in doubt was not found by its id")
            r = env.send(b)
            check(r.startswith("250"), f"the resend got {r}")
            d.wait_log(r"event=suppressed duplicate_of=", 15)
            time.sleep(1)
            check(wait_copies(env, "reset8", 1) == 1 and
                  env.copies("reset8") == 1,
                  f"reset8: {env.copies('reset8')} copies, expected 1")
    finally:
        if os.path.exists(hold):
            os.unlink(hold)


def main():
    if os.geteuid() != 0:
        skip("needs root (network namespace, iptables)")
    for tool in ("ip", "iptables"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            skip(f"{tool} is not installed")
    args = ("--dedup-settle", "2s", "--relay", "maildir:MAILDIR")
    with Netns() as ns:
        if TRANSPORT == "dpdk":
            from fdnet import need_root_netns
            need_root_netns()
            d = DpdkDaemon(ns, "--delivery", "on", delivery=True,
                           domains=("example.com",))
            host, port = DPDK_IP, 25
        else:
            ns.sh("true")
            d = Daemon(delivery=True, wrap=ns.argv([]),
                       domains=("example.com",), wait_ready=False,
                       listen=["127.0.0.1:2525"], port=2525)
            host, port = "127.0.0.1", 2525
        with d:
            d.extra = [a.replace("MAILDIR", os.path.join(d.tmp, "maildir"))
                       for a in args] + d.extra
            d.stop()
            d.start()
            scenario(Env(ns, d, host, port))
            if ns.sh("iptables -S", check_rc=False).stdout.count("DROP"):
                fail("a DROP rule was left behind")
        if TRANSPORT == "dpdk":
            scenario_reset_in_commit(ns)
        if TRANSPORT == "kernel":
            with Daemon(*args[:2], wrap=ns.argv([]),
                        domains=("example.com",), wait_ready=False,
                        listen=["127.0.0.1:2526"], port=2526) as d:
                d.stop()
                d.start()
                scenario_queued(Env(ns, d, "127.0.0.1", 2526))
                scenario_resend_before_news(Env(ns, d, "127.0.0.1", 2526))
            if ns.sh("iptables -S", check_rc=False).stdout.count("DROP"):
                fail("a DROP rule was left behind")
            # delivery into the test's Maildir (the default relay)
            with Daemon(*args[:2], "--segment-size", "1M", delivery=True,
                        wrap=ns.argv([]), domains=("example.com",),
                        wait_ready=False, listen=["127.0.0.1:2527"],
                        port=2527) as d:
                d.stop()
                d.start()
                scenario_news_after_reclaim(Env(ns, d, "127.0.0.1", 2527))
            if ns.sh("iptables -S", check_rc=False).stdout.count("DROP"):
                fail("a DROP rule was left behind")
    print(f"ok: {TRANSPORT}")


main()
