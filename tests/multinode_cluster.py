"""A real two-node SLURM cluster on one machine: a controller and two compute nodes in network namespaces.

The namespaces (`vdep-ctl`, `vdep-node1`, `vdep-node2`) share a private /24 that exists only inside
them: a bridge in the controller's namespace, one veth pair per node (`eth0` inside the node). Nothing
is added to the host's network. Each daemon runs with its own hostname and a private /etc/hosts
(`unshare --uts --mount`, propagation private, so the host's files stay untouched); slurmd is entered
with `nsenter --net` because `ip netns exec` remounts /sys without the cgroup mounts slurmd needs.
Ports 17817/17818, a munged of its own (own socket, started under another name) and its own files let
it run beside tests/slurm_cluster.py's one-node cluster. `stop()` cancels the jobs, stops the daemons it
started, kills what the jobs left inside the namespaces, deletes the namespaces and, if creating them
made /run/netns, removes that mount too; `leftovers()` says what would remain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.slurm_cluster import IDLE, Daemons, SlurmClient, common_settings, daemon_path, install_slurm
from tests.system_packages import install_packages

NETNS_DIR = Path("/run/netns")
SUBNET = "10.77.0"
CONTROLLER = "ctl"
NODES = ("node1", "node2")
CTLD_PORT, SLURMD_PORT = 17817, 17818
MUNGED_NAME = "vdep-mn-munged"  # not "munged": the one-node harness starts its own unless one runs


def install_multinode() -> str | None:
    """SLURM and iproute2, installed when missing; returns why the cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "the two-node SLURM cluster needs root (network namespaces, mounts, daemons as root)"
    reason = install_packages(("ip", "nsenter", "unshare"), ("iproute2", "util-linux"))
    return install_slurm() if reason is None else f"network namespaces: {reason}"


def namespace(host: str) -> str:
    return f"vdep-{host}"


def address(host: str) -> str:
    return f"{SUBNET}.254" if host == CONTROLLER else f"{SUBNET}.{NODES.index(host) + 1}"


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def namespace_pids(host: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", namespace(host)], check=False, capture_output=True, text=True, timeout=30)
    return [int(pid) for pid in result.stdout.split()] if result.returncode == 0 else []


def is_mount_point(path: Path) -> bool:
    # os.path.ismount misses a bind mount within one file system; mountinfo's 5th field is the mount point.
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return any(line.split()[4] == str(path) for line in lines)


@dataclass
class Network:
    """The namespaces and links; `remove()` undoes exactly what `create()` did."""

    made_netns_dir: bool = False
    namespaces: list[str] = field(default_factory=list)

    def create(self) -> None:
        existing = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout.split()
        clash = [namespace(h) for h in (CONTROLLER, *NODES) if namespace(h) in existing]
        if clash:
            raise RuntimeError(f"network namespaces {clash} exist already (a crashed test run?); remove them "
                               "with `ip netns del NAME` after stopping the processes `ip netns pids NAME` lists")
        self.made_netns_dir = not NETNS_DIR.exists()
        for host in (CONTROLLER, *NODES):
            _ip("netns", "add", namespace(host))
            self.namespaces.append(namespace(host))
            _ip("-n", namespace(host), "link", "set", "lo", "up")
        ctl = namespace(CONTROLLER)
        _ip("-n", ctl, "link", "add", "br0", "type", "bridge")
        _ip("-n", ctl, "addr", "add", f"{address(CONTROLLER)}/24", "dev", "br0")
        _ip("-n", ctl, "link", "set", "br0", "up")
        for host in NODES:
            _ip("-n", ctl, "link", "add", f"v-{host}", "type", "veth", "peer", "name", "eth0", "netns", namespace(host))
            _ip("-n", ctl, "link", "set", f"v-{host}", "master", "br0", "up")
            _ip("-n", namespace(host), "addr", "add", f"{address(host)}/24", "dev", "eth0")
            _ip("-n", namespace(host), "link", "set", "eth0", "up")

    def remove(self) -> None:
        for name in reversed(self.namespaces):  # deleting a namespace deletes its links
            _ip("netns", "del", name)
        self.namespaces.clear()
        if self.made_netns_dir and NETNS_DIR.exists():
            while is_mount_point(NETNS_DIR):  # `ip netns add` bind-mounts it onto itself
                subprocess.run(["umount", str(NETNS_DIR)], check=True, timeout=30)
            NETNS_DIR.rmdir()
            self.made_netns_dir = False


class MultiNodeCluster(SlurmClient):
    """slurmctld on `ctl`, slurmd on `node1` and `node2`; client commands run in ctl's network."""

    def __init__(self, root: Path):
        super().__init__(root / "slurm.conf", prefix=("nsenter", f"--net={NETNS_DIR / namespace(CONTROLLER)}"))
        self.root = root
        self.daemons = Daemons(root / "log")
        self.network = Network()

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge.sock"

    def write_config(self) -> None:
        for sub in ("state", "spool", "log", "bin"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{address(h)} {h}\n" for h in (CONTROLLER, *NODES))
        )
        (self.root / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # the host's resolver is out of reach
        nodes = "".join(f"NodeName={h} NodeAddr={address(h)} CPUs=2 RealMemory=4000 State=UNKNOWN\n" for h in NODES)
        self.conf.write_text(common_settings(self.root, "vdep-mn", f"socket={self.munge_socket},cred_expire=10", ".%n")
                             + f"""\
SlurmctldHost={CONTROLLER}({address(CONTROLLER)})
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
# A node that stops answering is DOWN after ~26 s (default 300 s), and its job is requeued.
SlurmdTimeout=10
{nodes}PartitionName=mn Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def start(self) -> MultiNodeCluster:
        self.write_config()
        try:
            self.network.create()
            munged = self.root / "bin" / MUNGED_NAME
            munged.unlink(missing_ok=True)
            munged.symlink_to(daemon_path("munged"))
            self.daemons.spawn([str(munged), "--force", "--foreground", f"--socket={self.munge_socket}",
                                f"--pid-file={self.root}/munged.pid", f"--seed-file={self.root}/munged.seed",
                                f"--log-file={self.root}/log/munged.log"], "munged", self.env)
            self.daemons.spawn(self.in_host(CONTROLLER, daemon_path("slurmctld"), "-D", "-f", str(self.conf)),
                               "slurmctld", self.env)
            for host in NODES:
                self.start_node(host)
            self.wait_for_nodes(IDLE, 90, self.root / "log")
        except BaseException:
            self.stop()
            raise
        return self

    def in_host(self, host: str, *command: str) -> list[str]:
        """`command` as it runs on `host`: its network, its hostname, the cluster's hosts file (exec chain:
        the PID Popen sees is the daemon's)."""
        setup = (f"hostname {host} && mount --bind {self.root}/hosts /etc/hosts && "
                 f"mount --bind {self.root}/resolv.conf /etc/resolv.conf && exec \"$@\"")
        return ["nsenter", f"--net={NETNS_DIR / namespace(host)}", "unshare", "--uts", "--mount",
                "--propagation", "private", "sh", "-c", setup, "sh", *command]

    def start_node(self, host: str) -> None:
        self.daemons.spawn(self.in_host(host, daemon_path("slurmd"), "-D", "-f", str(self.conf), "-N", host),
                           f"slurmd-{host}", self.env)

    def crash_node(self, host: str) -> list[int]:
        """SIGKILL every process in the node's namespace (slurmd, slurmstepd, the ranks), as a power cut
        would end them; returns their PIDs."""
        pids = namespace_pids(host)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process = self.daemons.processes.pop(f"slurmd-{host}", None)
        if process is not None:
            process.wait(timeout=30)
        return pids

    def leftovers(self) -> list[str]:
        """What a stopped cluster would leave behind (namespaces, /run/netns, processes): [] when clean."""
        names = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
        found = [f"namespace {namespace(h)}" for h in (CONTROLLER, *NODES) if namespace(h) in names.split()]
        found += [f"process {name}" for name, p in self.daemons.processes.items() if p.poll() is None]
        if self.network.made_netns_dir and (NETNS_DIR.exists() or is_mount_point(NETNS_DIR)):
            found.append(f"{NETNS_DIR} (created by this cluster)")
        return found

    def stop(self) -> None:
        if self.daemons.processes.get("slurmctld") is not None:
            self.run("scancel", "--user=root", "--full", check=False)
            time.sleep(1)
        self.daemons.stop_all()  # slurmd on each node, slurmctld, then munged
        for host in (CONTROLLER, *NODES):  # what the jobs left: slurmstepd, ranks (all started by this cluster)
            for pid in namespace_pids(host):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        while any(namespace_pids(h) for h in (CONTROLLER, *NODES) if namespace(h) in self.network.namespaces):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes left in the cluster's namespaces: "
                                   f"{ {h: namespace_pids(h) for h in (CONTROLLER, *NODES)} }")
            time.sleep(0.2)
        self.network.remove()
