"""Network-namespace helpers for the DPDK tests.

A test creates its own namespace with a unique name, runs finaldot on a
net_tap (or net_af_packet) vdev inside it with --no-huge --no-pci and a
unique --file-prefix, gives the kernel side of the tap 198.18.0.1/24 (the
daemon is 198.18.0.2), and runs its clients inside the same namespace. The
namespace is deleted at the end, on failure too. No traffic leaves it.
"""
import os
import shutil
import subprocess
import time
import uuid

from fdtest import FINALDOT, Daemon, fail, skip

KERNEL_IP = "198.18.0.1"
DPDK_IP = "198.18.0.2"


def need_root_netns():
    if os.geteuid() != 0:
        skip("needs root for network namespaces")
    if not os.path.exists("/dev/net/tun"):
        skip("no /dev/net/tun")
    if not shutil.which("ip"):
        skip("iproute2 (ip) is not installed")
    r = subprocess.run([FINALDOT, "--transport", "dpdk", "--check-config"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        skip(f"finaldot built without DPDK: {r.stderr.strip()}")


class Netns:
    def __init__(self):
        self.name = f"fdt{os.getpid()}{uuid.uuid4().hex[:6]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.sh("ip link set lo up")

    def sh(self, cmd, check_rc=True, **kw):
        r = subprocess.run(["ip", "netns", "exec", self.name, "sh", "-c",
                            cmd], capture_output=True, text=True, **kw)
        if check_rc and r.returncode != 0:
            fail(f"in netns: {cmd}: {r.stderr}")
        return r

    def argv(self, argv):
        return ["ip", "netns", "exec", self.name] + list(argv)

    def delete(self):
        subprocess.run(["ip", "netns", "del", self.name],
                       capture_output=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.delete()
        return False


class DpdkDaemon(Daemon):
    """finaldot --transport dpdk inside ns on a tap device."""

    def __init__(self, ns, *args, vdev="tap", lcores="0", port=25, **kw):
        self.ns = ns
        self.iface = f"fdtap{uuid.uuid4().hex[:6]}"
        self.prefix = f"fd{ns.name}"
        if vdev == "tap":
            vdev_arg = f"--vdev=net_tap0,iface={self.iface}"
        else:
            # af_packet / af_xdp on a veth pair; the kernel side (peer)
            # must not leave TCP checksums to an offload: the PMD would
            # hand over frames with bad checksums.
            peer = self.iface + "p"
            ns.sh(f"ip link add {self.iface} type veth peer name {peer} && "
                  f"ip link set {self.iface} up && ip link set {peer} up && "
                  f"ethtool -K {peer} tx off >/dev/null")
            if vdev == "af_xdp":
                vdev_arg = (f"--vdev=net_af_xdp0,iface={self.iface},"
                            f"start_queue=0,queue_count=1")
                kw.setdefault("env", {})["LIBXDP_OBJECT_PATH"] = \
                    "/usr/lib/x86_64-linux-gnu/bpf"
            else:
                vdev_arg = f"--vdev=net_af_packet0,iface={self.iface}"
            self.kernel_iface = peer
        eal = (f"-l {lcores} --no-huge -m 512 --no-pci {vdev_arg} "
               f"--file-prefix {self.prefix} --log-level=lib.eal:error")
        self.vdev = vdev
        super().__init__("--transport", "dpdk", "--dpdk-eal", eal,
                         "--dpdk-ip", f"{DPDK_IP}/24", *args,
                         listen=[f"{DPDK_IP}:{port}"], port=port,
                         wrap=ns.argv([]), **kw)

    def start(self, wait_ready=True):
        if not wait_ready:
            # The test watches the start itself (one that must fail).
            super().start(wait_ready=False)
            return
        try:
            self._start_dpdk()
        except BaseException:
            # A start that failed (no ready line, no ping) exits the test
            # from here, before any `with` owns the daemon: stop the
            # busy-polling process now, not never.
            self.kill9()
            self._remove_runtime()
            raise

    def _remove_runtime(self):
        # EAL's runtime directory of this --file-prefix (they pile up in
        # /var/run/dpdk otherwise).
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)

    def stop(self, *args, **kw):
        try:
            return super().stop(*args, **kw)
        finally:
            if self.proc is None or self.proc.poll() is not None:
                self._remove_runtime()

    def kill9(self):
        super().kill9()
        self._remove_runtime()

    def _start_dpdk(self):
        super().start(wait_ready=False)
        self.wait_log("event=ready transport=dpdk", 30)
        if self.vdev == "tap":
            # The tap appears when the port starts; address its kernel side.
            for _ in range(100):
                if self.ns.sh(f"ip link show {self.iface}",
                              check_rc=False).returncode == 0:
                    break
                time.sleep(0.05)
            self.ns.sh(f"ip addr add {KERNEL_IP}/24 dev {self.iface} && "
                       f"ip link set {self.iface} up")
        else:
            self.ns.sh(f"ip addr add {KERNEL_IP}/24 dev {self.kernel_iface}",
                       check_rc=False)
        self.wait_ping()

    def wait_ping(self, timeout=10):
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.ns.sh(f"ping -c1 -W1 {DPDK_IP}", check_rc=False)
            if r.returncode == 0:
                return
        fail(f"{DPDK_IP} does not answer ping on the tap:\n"
             f"{self.read_log()[-3000:]}")

    def stats_mbufs(self):
        for line in reversed(self.read_log().splitlines()):
            if "event=mbufs " in line:
                return dict(kv.split("=", 1) for kv in line.split()
                            if "=" in kv)
        return {}
