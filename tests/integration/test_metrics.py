#!/usr/bin/python3
"""/metrics (--metrics ADDR:PORT), in Prometheus' text format.

  test_metrics.py            the exposition after real traffic: promtool
                             check metrics passes, the counters say what
                             happened (messages, bytes, rejections by
                             reason, paused refusals, the final-dot-to-250
                             histogram, the queue by state), no label
                             carries an id or an address; and the HTTP
                             side: 404, 405, HEAD, 400, 431, HTTP/1.0, an
                             idle connection that does not block a scrape,
                             bytes after the request head that do not cut
                             the response short, 503 when every slot is
                             taken.
  test_metrics.py prometheus a real Prometheus server (its own config and
                             data in a temp dir, scraping finaldot every
                             second on loopback) answers a query for the
                             accepted-message counter after mail was sent.
Skipped (77) with the reason when promtool / prometheus is missing.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import Daemon, FINALDOTCTL, FINALDOT, check, fail, free_port, \
    skip  # noqa: E402
from delivtest import send, message, wait  # noqa: E402


def http(port, raw, timeout=10):
    """Send raw bytes, return everything the server sent until it closed."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(raw)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
    finally:
        s.close()


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                timeout=10) as r:
        check(r.status == 200, f"status {r.status}")
        ctype = r.headers["Content-Type"]
        check(ctype == "text/plain; version=0.0.4; charset=utf-8",
              f"Content-Type {ctype}")
        return r.read().decode()


def samples(text):
    """{'name{labels}': value} of every sample line."""
    res = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, val = line.rsplit(" ", 1)
        res[key] = float(val)
    return res


def ctl(d, *args):
    r = subprocess.run([FINALDOTCTL, "--control",
                        os.path.join(d.tmp, "control.sock"), *args],
                       capture_output=True, timeout=30)
    check(r.returncode == 0, f"finaldotctl {args}: {r.stderr!r}")


def traffic(d):
    """3 messages, one relay refusal, one syntax error, one paused
    refusal."""
    for i in range(3):
        send(d, "a@example.com", ["u@localhost"], message(i))
    c = d.connect()
    c.expect(220)
    c.cmd("EHLO m.test", 250)
    c.cmd("MAIL FROM:<a@example.com>", 250)
    c.cmd("RCPT TO:<x@elsewhere.org>", 550, r"5\.7\.1")
    c.cmd("FROB", 500)
    c.cmd("QUIT", 221)
    c.close()
    ctl(d, "pause")
    c = d.connect()
    c.expect(421, r"4\.3\.2")
    c.close()
    ctl(d, "resume")


def exposition():
    if not shutil.which("promtool"):
        skip("promtool is not installed (Debian package prometheus)")
    mport = free_port()
    with Daemon("--metrics", f"127.0.0.1:{mport}", threads=2) as d:
        traffic(d)
        # Workers publish every few ms, the queue manager a few times a
        # second: wait for the whole picture.
        want = {
            "finaldot_messages_accepted_total": 3,
            'finaldot_smtp_rejections_total{class="5xx",reason='
            '"relay_denied"}': 1,
            'finaldot_smtp_rejections_total{class="5xx",reason="syntax"}':
                1,
            'finaldot_smtp_rejections_total{class="4xx",reason="paused"}':
                1,
            'finaldot_connections_refused_total{transport="kernel",'
            'reason="paused"}': 1,
            'finaldot_connections_total{transport="kernel"}': 4,
            "finaldot_final_dot_latency_seconds_count": 3,
            'finaldot_queue_messages{state="deferred"}': 3,
            "finaldot_listener_paused": 0,
            "finaldot_workers": 2,
        }
        got = {}

        def settled():
            got.update(samples(scrape(mport)))
            return all(got.get(k) == v for k, v in want.items())
        try:
            wait(settled, 10, "the counters")
        except SystemExit:
            fail(f"metrics: {[(k, got.get(k), v) for k, v in want.items()]}")
        text = scrape(mport)
        r = subprocess.run(["promtool", "check", "metrics"],
                           input=text.encode(), capture_output=True,
                           timeout=60)
        check(r.returncode == 0, f"promtool check metrics: "
              f"{r.stdout.decode()} {r.stderr.decode()}")
        s = samples(text)
        check(not any(k.startswith("finaldot_dpdk_") for k in s),
              "DPDK series on the kernel transport")
        check(s["finaldot_accepted_message_bytes_total"] > 3 * 2000,
              "accepted bytes")
        check(s['finaldot_build_info{version="%s",transport="kernel"}' %
                subprocess.run([FINALDOT, "--version"], capture_output=True,
                               text=True).stdout.split()[-1]] == 1,
              "build_info")
        # The histogram: cumulative buckets from 50 us to 10 s, +Inf last.
        buckets = [(m.group(1), v) for k, v in s.items()
                   if (m := re.match(r'finaldot_final_dot_latency_seconds_'
                                     r'bucket\{le="([^"]+)"\}', k))]
        check([b for b, _ in buckets][0] == "5e-05" and
              buckets[-2][0] == "10" and buckets[-1][0] == "+Inf",
              f"buckets {buckets}")
        vals = [v for _, v in buckets]
        check(vals == sorted(vals) and vals[-1] == 3, f"cumulative {vals}")
        check(0 < s["finaldot_final_dot_latency_seconds_sum"] < 30,
              "latency sum")
        # Group commit per write: every completed batch in each flush
        # histogram once; the message histogram sums to the messages.
        ok = s['finaldot_spool_batches_total{result="ok"}']
        for h in ("finaldot_spool_flush_messages", "finaldot_spool_flush_bytes"):
            check(s[h + "_count"] == ok and s[h + '_bucket{le="+Inf"}'] == ok,
                  f"{h}: count {s[h + '_count']}, batches {ok}")
        check(s["finaldot_spool_flush_messages_sum"] == 3,
              f"messages over flushes: {s['finaldot_spool_flush_messages_sum']}")
        check(s["finaldot_spool_flush_bytes_sum"] ==
              s["finaldot_spool_written_bytes_total"], "flush bytes sum")
        # The disk's side of the final dot: one flush latency per ok
        # batch, each no longer than the final dot that waited for it.
        h = "finaldot_spool_flush_seconds"
        check(s[h + "_count"] == ok and s[h + '_bucket{le="+Inf"}'] == ok,
              f"{h}: count {s[h + '_count']}, batches {ok}")
        check(0 < s[h + "_sum"] <= s["finaldot_final_dot_latency_seconds_sum"],
              f"{h}_sum {s[h + '_sum']}, final dots "
              f"{s['finaldot_final_dot_latency_seconds_sum']}")
        # Bounded labels: no address, no id, anywhere.
        for k in s:
            for lv in re.findall(r'="([^"]*)"', k):
                check(not re.search(r"\d+\.\d+\.\d+\.\d+|[0-9A-Fa-f]{16}|@",
                                    lv), f"unbounded label value in {k}")
        check(len(s) < 200, f"{len(s)} series")

        # HTTP.
        def status_of(raw):
            head = http(mport, raw).split(b"\r\n", 1)[0]
            return head.decode()
        check(status_of(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") ==
              "HTTP/1.1 404 Not Found", "404")
        resp = http(mport, b"POST /metrics HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Length: 0\r\n\r\n")
        check(resp.startswith(b"HTTP/1.1 405 ") and
              b"\r\nAllow: GET, HEAD\r\n" in resp, f"405: {resp[:200]!r}")
        resp = http(mport, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = resp.split(b"\r\n\r\n", 1)
        check(head.startswith(b"HTTP/1.1 200 ") and body == b"" and
              int(re.search(rb"Content-Length: (\d+)", head).group(1)) >
              1000, f"HEAD: {resp[:300]!r}")
        resp = http(mport, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
        head, body = resp.split(b"\r\n\r\n", 1)
        check(head.startswith(b"HTTP/1.1 200 ") and
              int(re.search(rb"Content-Length: (\d+)", head).group(1)) ==
              len(body) and b"finaldot_workers 2\n" in body,
              "HTTP/1.0 with a query string")
        check(status_of(b"hello\r\n\r\n").startswith("HTTP/1.1 400 "),
              "garbage: 400")
        check(status_of(b"GET /metrics HTTP/2.0\r\n\r\n").startswith(
            "HTTP/1.1 400 "), "HTTP/2.0 text: 400")
        check(status_of(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 5000 +
                        b"\r\n\r\n").startswith("HTTP/1.1 431 "),
              "an oversized head: 431")
        idle = socket.create_connection(("127.0.0.1", mport))
        idle.sendall(b"GET /metr")  # and nothing more
        check("finaldot_workers 2" in scrape(mport),
              "an idle connection blocked a scrape")
        idle.close()
        # Bytes after the request head (a pipelined request, a stray
        # CRLF) while the response still waits in the server's send
        # queue: the whole response arrives, not cut off by a reset.
        for _ in range(3):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            s.settimeout(10)
            s.connect(("127.0.0.1", mport))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.1)
            s.sendall(b"\r\n")
            time.sleep(0.1)
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except OSError as e:
                fail(f"trailing bytes: {e} after {len(data)} bytes")
            finally:
                s.close()
            head, body = data.split(b"\r\n\r\n", 1)
            check(int(re.search(rb"Content-Length: (\d+)", head).group(1))
                  == len(body), f"trailing bytes: {len(body)} of the body")
        # Every connection slot held by an idle client: the others are
        # answered 503, and read it (not a reset in its place).
        # (The connections above are closed by now: a slot is free as
        # soon as the server has read a client's end of file.)
        time.sleep(0.5)
        idle = [socket.create_connection(("127.0.0.1", mport))
                for _ in range(16)]
        time.sleep(0.3)
        busy = 0
        for i in range(100):
            try:
                resp = http(mport, b"GET /metrics HTTP/1.1\r\n\r\n")
            except OSError as e:
                fail(f"busy, client {i}: {e}")
            check(resp.startswith(b"HTTP/1.1 "), f"busy: {resp[:40]!r}")
            busy += resp.startswith(b"HTTP/1.1 503 ")
        check(busy == 100, f"{100 - busy} of 100 served with every slot "
              f"taken")
        for s in idle:
            s.close()
        check(d.stop() == 0, "exit status")
    long_routes()
    many_routes()
    with Daemon() as d:
        check("metrics event=listening" not in d.read_log(),
              "/metrics is on without --metrics")
    r = subprocess.run([FINALDOT, "--metrics", "localhost", "--check-config"],
                       capture_output=True, text=True)
    check(r.returncode == 2 and "metrics: expected ADDR:PORT" in r.stderr,
          f"a bad --metrics: {r.returncode} {r.stderr!r}")
    print("ok: promtool check metrics passes; the counters match the "
          "traffic; labels are bounded; 404/405/HEAD/400/431/HTTP 1.0 and "
          "an idle client")


def long_routes():
    """Two routes whose keys share their first 150 bytes (Maildir paths):
    two series, each valid for promtool, not one label for both."""
    root = tempfile.mkdtemp(prefix="fdroute-")
    try:
        stem = os.path.join(root, "m" + "x" * 150)
        a, b = stem + "-a", stem + "-b"
        os.makedirs(a)
        os.makedirs(b)
        mport = free_port()
        with Daemon("--metrics", f"127.0.0.1:{mport}", "--relay",
                    f"maildir:{a}", "--route", f"example.com=maildir:{b}",
                    delivery=True) as d:
            send(d, "s@example.com", ["u@localhost"], message(1))
            send(d, "s@example.com", ["u@example.com"], message(2))
            got = []

            def both():
                got[:] = [line.rsplit(" ", 1)[0]
                          for line in scrape(mport).splitlines()
                          if line.startswith("finaldot_route_batches_total{")]
                return len(got) >= 2
            try:
                wait(both, 15, "two routes")
            except SystemExit:
                fail(f"long routes: {got}")
            check(len(set(got)) == 2, f"one label for two routes: {got}")
            r = subprocess.run(["promtool", "check", "metrics"],
                               input=scrape(mport).encode(),
                               capture_output=True, timeout=60)
            check(r.returncode == 0, f"promtool, long routes: "
                  f"{r.stdout.decode()} {r.stderr.decode()}")
            check(d.stop() == 0, "exit status")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def route_series(port):
    """{(metric, route, outcome): value} of every per-route sample but the
    histogram's le= buckets (the sum, count and batches stand for them)."""
    res = {}
    for key, val in samples(scrape(port)).items():
        m = re.match(r'(finaldot_(?:route|delivery)\w*)\{(.*)\}$', key)
        if not m or "le=" in m.group(2):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if "route" in labels:
            res[(m.group(1), labels["route"], labels.get("outcome", ""))] \
                = val
    return res


def many_routes():
    """More routes than get their own series (32): each keeps the series
    it got while the process runs, so no counter goes down. The busiest 32
    by name (as before): two routes in "other" that then took 3 messages
    each took two named routes' places, and counts moved between series
    ("other"'s latency sum and buckets went down, two names vanished)."""
    n = 34
    root = tempfile.mkdtemp(prefix="fdroutes-")
    try:
        args = []
        for i in range(n):
            os.makedirs(os.path.join(root, str(i)))
            args += ["--route", f"d{i}.test=maildir:{root}/{i}"]
        mport = free_port()
        domains = tuple(f"d{i}.test" for i in range(n)) + ("example.com",)
        with Daemon("--metrics", f"127.0.0.1:{mport}", *args,
                    domains=domains, delivery=True) as d:
            def delivered(want):
                got = {}

                def done():
                    got.clear()
                    got.update(route_series(mport))
                    return sum(v for (m, _, o), v in got.items()
                               if m == "finaldot_route_deliveries_total" and
                               o == "delivered") >= want
                wait(done, 30, f"{want} deliveries counted by route")
                return dict(got)

            send(d, "s@example.com", [f"u@d{i}.test" for i in range(n)],
                 message(1))
            first = delivered(n)
            dkey = ("finaldot_route_deliveries_total", "other", "delivered")
            named = {r for (_, r, _) in first if r != "other"}
            check(len(named) == 32 and dkey in first,
                  f"32 named routes and other: {sorted(named)}")
            rest = [i for i in range(n) if f"maildir:{root}/{i}" not in
                    named]
            check(len(rest) == 2, f"routes in other: {rest}")
            for k in range(3):
                send(d, "s@example.com", [f"u@d{i}.test" for i in rest],
                     message(2 + k))
            second = delivered(n + 6)
            for key, v in first.items():
                check(key in second, f"{key} vanished")
                check(second[key] >= v,
                      f"{key} went down: {v} -> {second[key]}")
            check(second[dkey] == first[dkey] + 6,
                  "the 6 deliveries counted in other")
            check(d.stop() == 0, "exit status")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("ok: 34 routes: 32 named and other, each keeps its series; no "
          "counter went down")


def prometheus():
    exe = shutil.which("prometheus")
    if not exe:
        skip("prometheus is not installed (Debian package prometheus)")
    mport, pport = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="fdprom-")
    proc = None
    try:
        with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
            f.write("global:\n  scrape_interval: 1s\n"
                    "  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: finaldot\n"
                    "    static_configs:\n"
                    f"      - targets: ['127.0.0.1:{mport}']\n")
        with Daemon("--metrics", f"127.0.0.1:{mport}") as d:
            log = open(os.path.join(tmp, "prometheus.log"), "w")
            proc = subprocess.Popen(
                [exe, f"--config.file={tmp}/prometheus.yml",
                 f"--storage.tsdb.path={tmp}/data",
                 f"--web.listen-address=127.0.0.1:{pport}"],
                stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=tmp)
            base = f"http://127.0.0.1:{pport}"

            def ready():
                if proc.poll() is not None:
                    with open(os.path.join(tmp, "prometheus.log")) as lf:
                        fail(f"prometheus exited: {lf.read()[-2000:]}")
                try:
                    with urllib.request.urlopen(base + "/-/ready",
                                                timeout=2) as r:
                        return r.status == 200
                except (urllib.error.URLError, ConnectionError,
                        socket.timeout):
                    return False
            wait(ready, 60, "prometheus ready")
            for i in range(2):
                send(d, "a@example.com", ["u@localhost"], message(i))

            def query(q):
                url = base + "/api/v1/query?" + urllib.parse.urlencode(
                    {"query": q})
                with urllib.request.urlopen(url, timeout=5) as r:
                    res = json.load(r)
                check(res["status"] == "success", f"query {q}: {res}")
                return [float(x["value"][1]) for x in res["data"]["result"]]
            wait(lambda: query("finaldot_messages_accepted_total") == [2.0],
                 60, "prometheus to see 2 accepted messages")
            check(query('up{job="finaldot"}') == [1.0], "up == 1")
            check(query("finaldot_final_dot_latency_seconds_count") ==
                  [2.0], "the histogram scraped")
    finally:
        if proc and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print("ok: a real Prometheus scraped finaldot and answered "
          "finaldot_messages_accepted_total == 2")


if __name__ == "__main__":
    if sys.argv[1:] == ["prometheus"]:
        prometheus()
    else:
        exposition()
