#!/usr/bin/python3
"""Who may use the control socket: its owner only (mode 0600) unless
--control-group names a group (mode 0660, that group).

finaldotctl runs as the user nobody (setpriv): refused with one clear
"permission denied" line and exit 3 by a default socket; let in through a
--control-group socket when its group is nogroup, refused when it is
another group. Needs root and setpriv; skipped (77) otherwise.
"""
import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import (Daemon, FINALDOT, FINALDOTCTL, check, skip,  # noqa
                    free_port)


def as_user(group, *args):
    r = subprocess.run(["setpriv", "--reuid=nobody", f"--regid={group}",
                        "--clear-groups", FINALDOTCTL, *args],
                       capture_output=True, timeout=60)
    return r.returncode, r.stdout.decode(), r.stderr.decode()


def main():
    if os.geteuid() != 0:
        skip("needs root (to run finaldotctl as another user)")
    if not shutil.which("setpriv"):
        skip("setpriv (util-linux) is not installed")
    try:
        pwd.getpwnam("nobody")
        grp.getgrnam("nogroup")
        grp.getgrnam("daemon")
    except KeyError as e:
        skip(f"no such user or group on this machine: {e}")
    rc, _, err = as_user("nogroup", "--version")
    if rc != 0:
        skip(f"the user nobody cannot run {FINALDOTCTL} here ({err.strip()}"
             "): the build directory is not readable by others")

    with Daemon() as d:
        path = os.path.join(d.tmp, "control.sock")
        os.chmod(d.tmp, 0o755)  # only the socket's own mode decides
        st = os.stat(path)
        check(stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0,
              f"mode {oct(st.st_mode)}")
        rc, out, err = as_user("nogroup", "--control", path, "status")
        check(rc == 3 and out == "" and len(err.splitlines()) == 1 and
              re.search(r"permission denied", err),
              f"nobody on a 0600 socket: exit {rc}: {err!r}")
        rc, _, err = as_user("nogroup", "--control", path, "pause")
        check(rc == 3, f"nobody paused the listener: {rc} {err!r}")

    with Daemon("--control-group", "nogroup") as d:
        path = os.path.join(d.tmp, "control.sock")
        os.chmod(d.tmp, 0o755)
        st = os.stat(path)
        check(stat.S_IMODE(st.st_mode) == 0o660 and
              st.st_gid == grp.getgrnam("nogroup").gr_gid,
              f"mode {oct(st.st_mode)} gid {st.st_gid}")
        rc, out, err = as_user("nogroup", "--control", path, "status")
        check(rc == 0 and "listener: accepting" in out,
              f"a member of the control group: exit {rc}: {err!r}")
        rc, _, err = as_user("daemon", "--control", path, "status")
        check(rc == 3 and re.search(r"permission denied", err),
              f"outside the group: exit {rc}: {err!r}")

    # As a user outside the control group (as the systemd unit ran before
    # it had SupplementaryGroups=): --check-config says so, where it
    # passed and the start failed on chown (EPERM).
    tmp = tempfile.mkdtemp(prefix="fdtest-perm-")
    try:
        os.chmod(tmp, 0o777)
        r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup",
                            "--clear-groups", FINALDOT, "--check-config",
                            "--spool", os.path.join(tmp, "spool"),
                            "--control", os.path.join(tmp, "c.sock"),
                            "--control-group", "daemon"],
                           capture_output=True, text=True, timeout=60)
        out = r.stdout + r.stderr
        check(r.returncode != 0 and "not a member" in out and
              "SupplementaryGroups=daemon" in out,
              f"check-config outside the group: {r.returncode} {out!r}")
        # A member starts, and the directory it makes lets the group in.
        sock = os.path.join(tmp, "run", "c.sock")
        p = subprocess.Popen(["setpriv", "--reuid=nobody",
                              "--regid=nogroup", "--groups=daemon",
                              FINALDOT, "--spool", os.path.join(tmp, "sp"),
                              "--listen", f"127.0.0.1:{free_port()}",
                              "--delivery", "off",
                              "--control", sock, "--control-group",
                              "daemon"],
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 30
            while not os.path.exists(sock) and time.time() < deadline and \
                    p.poll() is None:
                time.sleep(0.05)
            check(os.path.exists(sock), "no socket from a member of the "
                  f"control group: {p.poll()}")
            st = os.stat(os.path.dirname(sock))
            check(st.st_gid == grp.getgrnam("daemon").gr_gid and
                  st.st_mode & 0o050 == 0o050,
                  f"the socket's directory: gid {st.st_gid} mode "
                  f"{oct(st.st_mode)}")
        finally:
            p.terminate()
            p.wait(30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    with Daemon("--control-group", "no-such-group-here",
                wait_ready=False) as d:
        rc = d.proc.wait(30)
        check(rc != 0, "started with a control group that does not exist")
        check(re.search(r"event=control_socket_failed .*no-such-group-here",
                        d.read_log()), "no clear error for a bad group")
    print("ok: 0600 refuses another user (one line, exit 3); "
          "--control-group lets that group in and nobody else")


if __name__ == "__main__":
    main()
