#!/usr/bin/python3
"""The DPDK transport's start and stop, on net_tap in a namespace this test
makes (root; skipped with the reason otherwise).

  shutdown_timewait  one message delivered and QUIT (we close first, so the
                     stack holds the connection in TIME_WAIT), then
                     SIGTERM with a long --shutdown-timeout: the daemon
                     exits at once, not at the deadline (TIME_WAIT is
                     nothing to wait for).
  shard_start_fails  two shards, and shard 1's spool directory cannot be
                     made (spool/w01 is a regular file): the daemon never
                     logs event=ready, names the shard and exits non-zero
                     (shard 0 does not serve alone while shard 1's flows
                     go nowhere).
  port_start_fails   the port's start fails half-way (test seam
                     FINALDOT_PORT_FAULT: rte_eth_dev_start(), or the
                     first tx queue's setup after its rx queue took its
                     mbufs): exit 1, never ready, and the device is
                     closed before the mbuf pool is freed (no mbuf still
                     out of the pool when it goes).
  reload_affinity    SIGHUP with a large recipient list (a reload that
                     lasts): the reload thread (fd-reload) runs on the
                     CPUs left to helpers, not on shard 0's polled core;
                     so do the log writers (fd-log, fd-dlog), which start
                     before the EAL pins the process.

Usage: test_dpdk_lifecycle.py [CASE...]   (all cases when none is named)"""
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from fdnet import DPDK_IP, DpdkDaemon, Netns, need_root_netns
from fdtest import check, fail, skip

CLIENT = r'''
import smtplib, sys
s = smtplib.SMTP(sys.argv[1], 25, timeout=10)
s.sendmail("a@ns.test", ["u@example.com"], "Subject: x\r\n\r\nhello\r\n")
s.quit()
'''


def deliver_one(ns):
    r = subprocess.run(ns.argv(["/usr/bin/python3", "-c", CLIENT, DPDK_IP]),
                       capture_output=True, text=True, timeout=60)
    check(r.returncode == 0, f"one message over the tap: {r.stderr[-1500:]}")


def case_shutdown_timewait():
    timeout = 30
    with Netns() as ns:
        with DpdkDaemon(ns, "--shutdown-timeout", f"{timeout}s") as d:
            deliver_one(ns)
            # The client's FIN has reached us once its close returned;
            # give the stack a moment to take it (-> TIME_WAIT).
            time.sleep(0.3)
            t0 = time.time()
            rc = d.stop(timeout=timeout + 15)
            took = time.time() - t0
            check(rc == 0, f"exit status {rc} after SIGTERM")
            check(took < timeout / 3,
                  f"SIGTERM with every session ended took {took:.1f} s "
                  f"of the {timeout} s --shutdown-timeout: the stop "
                  f"waited for a TIME_WAIT entry")
            print(f"ok shutdown_timewait: exit 0 {took:.2f} s after SIGTERM "
                  f"(--shutdown-timeout {timeout}s)")


def case_shard_start_fails():
    tmp = tempfile.mkdtemp(prefix="fdtest-spool-")
    try:
        spool = os.path.join(tmp, "spool")
        os.makedirs(spool)
        open(os.path.join(spool, "w01"), "w").close()
        with Netns() as ns:
            d = DpdkDaemon(ns, lcores="0,1", spool=spool, wait_ready=False)
            try:
                deadline = time.time() + 30
                while d.proc.poll() is None and time.time() < deadline:
                    if "event=ready" in d.read_run_log():
                        break
                    time.sleep(0.05)
                log = d.read_run_log()
                check("event=ready" not in log,
                      f"ready with shard 1 unable to start:\n{log[-3000:]}")
                check(d.proc.poll() is not None,
                      f"still running 30 s after shard 1 failed:\n"
                      f"{log[-3000:]}")
                rc = d.proc.returncode
                check(rc != 0, f"exit status 0 with shard 1 failed:\n"
                      f"{log[-3000:]}")
                check("shard=1 event=shard_start_failed" in log,
                      f"no line naming the failed shard:\n{log[-3000:]}")
                check("event=start_failed transport=dpdk" in log,
                      f"no start_failed line:\n{log[-3000:]}")
            finally:
                d.kill9()
                shutil.rmtree(d.tmp, ignore_errors=True)
        print(f"ok shard_start_fails: exit {rc}, never ready")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def case_port_start_fails():
    if os.environ.get("FINALDOT_SEAM", "on") != "on":
        skip("port_start_fails needs the fault seam (-Dfault_injection)")
    for fault in ("start", "txq"):
        with Netns() as ns:
            d = DpdkDaemon(ns, env={"FINALDOT_PORT_FAULT": fault},
                           wait_ready=False)
            try:
                try:
                    rc = d.proc.wait(60)
                except subprocess.TimeoutExpired:
                    rc = None
                log = d.read_run_log()
                check(rc not in (0, None),
                      f"{fault}: exit status {rc}:\n{log[-3000:]}")
                check("event=ready" not in log and
                      "event=port_setup_failed" in log,
                      f"{fault}: no port_setup_failed, or ready:\n"
                      f"{log[-3000:]}")
                check("event=mbufs_after_close in_use=0" in log,
                      f"{fault}: mbufs still out of the pool when it was "
                      f"freed (the device was not closed first):\n"
                      f"{log[-3000:]}")
            finally:
                d.kill9()
                shutil.rmtree(d.tmp, ignore_errors=True)
    print("ok port_start_fails: start and txq faults: exit 1, device "
          "closed before the pool")


def cpu_list(text):
    cpus = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def threads(pid):
    """{tid: (comm, allowed CPUs)} of a process's threads now."""
    out = {}
    for t in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(t + "/comm") as f:
                comm = f.read().strip()
            with open(t + "/status") as f:
                st = f.read()
        except OSError:
            continue  # ended meanwhile
        for line in st.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                out[os.path.basename(t)] = (comm, cpu_list(line.split()[1]))
    return out


def case_reload_affinity():
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        skip("reload_affinity needs 2 CPUs (one polled, one for helpers)")
    lcore, helpers = mine[-1], set(mine[:-1])
    with Netns() as ns:
        tmp = tempfile.mkdtemp(prefix="fdtest-rcpt-")
        try:
            rcpt = os.path.join(tmp, "recipients")
            with open(rcpt, "w") as f:
                for i in range(400000):
                    f.write(f"user{i}@example.com\n")
            with DpdkDaemon(ns, "--recipients", rcpt,
                            lcores=str(lcore)) as d:
                pid = d.proc.pid
                writers = [v for v in threads(pid).values()
                           if v[0] in ("fd-log", "fd-dlog")]
                check(sorted(c for c, _ in writers) == ["fd-dlog", "fd-log"],
                      f"log writer threads: {writers}")
                for comm, cpus in writers:
                    check(cpus == helpers,
                          f"{comm} may run on CPUs {sorted(cpus)}, not "
                          f"the helpers' {sorted(helpers)} (lcore {lcore} "
                          f"polled)")
                before = set(threads(pid))
                os.kill(pid, signal.SIGHUP)
                seen = {}
                deadline = time.time() + 20
                while time.time() < deadline and not any(
                        c == "fd-reload" for c, _ in seen.values()):
                    for tid, v in threads(pid).items():
                        if tid not in before:
                            seen[tid] = v
                    time.sleep(0.002)
                reload = [cpus for c, cpus in seen.values()
                          if c == "fd-reload"]
                check(reload, f"no fd-reload thread seen after SIGHUP "
                      f"(new threads: {seen})")
                check(reload[0] == helpers,
                      f"the reload thread may run on CPUs "
                      f"{sorted(reload[0])}, not the helpers' "
                      f"{sorted(helpers)} (lcore {lcore} polled)")
                d.wait_log("event=reload", 30)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"ok reload_affinity: fd-reload, fd-log and fd-dlog on CPUs "
          f"{sorted(helpers)}, lcore {lcore} left alone")


CASES = {
    "shutdown_timewait": case_shutdown_timewait,
    "shard_start_fails": case_shard_start_fails,
    "reload_affinity": case_reload_affinity,
    "port_start_fails": case_port_start_fails,  # skips without the seam
}


def main():
    names = sys.argv[1:] or list(CASES)
    for n in names:
        if n not in CASES:
            fail(f"no case {n}; cases: {' '.join(CASES)}")
    need_root_netns()
    for n in names:
        CASES[n]()


main()
