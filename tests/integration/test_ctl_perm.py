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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fdtest import Daemon, FINALDOTCTL, check, skip  # noqa: E402


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
