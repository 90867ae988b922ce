"""fdpowerfs for the power-cut tests (tests/crash/powercut/fdpowerfs.c,
docs/powercut.md): mount it, read its counters, cut the power, mount what
survived. Shared by test_powercut.py and test_powercut_delivery.py."""
import os
import shutil
import subprocess
import sys
import time

from fdtest import check, fail, skip

FDPOWERFS = os.environ.get("FDPOWERFS", "build/tests/crash/powercut/fdpowerfs")


def loop_args():
    """[ROUNDS] [SEED] [--mutant SPEC] of the power-cut loops: (rounds,
    seed, mutant or None)."""
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    mutant = None
    if "--mutant" in sys.argv:
        mutant = sys.argv[sys.argv.index("--mutant") + 1]
        args.remove(mutant)
    rounds = int(args[0]) if args else 3
    seed = int(args[1]) if len(args) > 1 else int(time.time())
    return rounds, seed, mutant


def need_powerfs(mutant=None):
    """Skip (77) without what the simulator needs, or without the fault
    seam a mutant run needs."""
    if not os.path.exists("/dev/fuse"):
        skip("no /dev/fuse")
    if not os.access(FDPOWERFS, os.X_OK):
        skip(f"no simulator at {FDPOWERFS} (libfuse3-dev missing at build)")
    if shutil.which("umount") is None:
        skip("no umount")
    if mutant and os.environ.get("FINALDOT_SEAM") == "off":
        skip("this build has no fault seam (-Dfault_injection=false)")


class PowerFS:
    """fdpowerfs mounted at mnt, its durable state kept in img."""

    def __init__(self, work):
        self.mnt = os.path.join(work, "mnt")
        self.img = os.path.join(work, "image")
        self.log = os.path.join(work, "fdpowerfs.log")
        os.mkdir(self.mnt)
        self.proc = None

    def mount(self):
        self.proc = subprocess.Popen([FDPOWERFS, self.img, self.mnt],
                                     stdout=open(self.log, "a"),
                                     stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.time() + 10
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.time() > deadline:
                fail(f"fdpowerfs did not mount:\n{open(self.log).read()}")
            time.sleep(0.02)

    def stats(self):
        with open(os.path.join(self.mnt, ".powercut")) as f:
            return dict(kv.split("=") for kv in f.read().split())

    def cut(self, mode, seed):
        with open(os.path.join(self.mnt, ".powercut"), "w") as f:
            f.write(f"cut {mode} {seed}")
        self.unmount()

    def unmount(self):
        # Lazy: io_uring may still hold the dead daemon's files a moment
        # (its teardown runs in the kernel after the process is reaped).
        subprocess.run(["umount", "-l", self.mnt], check=False)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            print(f"fdpowerfs (pid {self.proc.pid}) still running 60 s "
                  f"after the unmount:\n{self.diagnose()}")
            self.proc.kill()
            self.proc.wait()
            fail("fdpowerfs did not exit after the unmount")
        check(self.proc.returncode == 0,
              f"fdpowerfs exited {self.proc.returncode}:\n"
              f"{open(self.log).read()[-2000:]}")
        self.proc = None

    def diagnose(self):
        """What fdpowerfs waits in, and which tasks sleep uninterruptibly
        (a detached mount's files no longer show under mnt)."""
        out = []
        for name in ("stack", "wchan"):
            try:
                with open(f"/proc/{self.proc.pid}/{name}") as f:
                    out.append(f"{name}: {f.read().strip()}")
            except OSError:
                pass
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    st = f.read()
                with open(f"/proc/{pid}/wchan") as f:
                    wchan = f.read()
            except OSError:
                continue
            comm, state = st[st.index("(") + 1:st.rindex(")")], \
                st[st.rindex(")") + 2]
            if state == "D" or comm.startswith("iou-"):
                out.append(f"pid {pid} {comm} {state} {wchan}")
        return "\n".join(out[:40])

    def cleanup(self):
        """After a failure: leave no mount and no process behind."""
        if self.proc:
            subprocess.run(["umount", "-l", self.mnt], check=False)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
