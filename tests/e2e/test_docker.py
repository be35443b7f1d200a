"""flannel's Docker flow with a real dockerd, end to end (issue 14).

Two namespace hosts per backend, each: ``netagent run`` → ``netagent docker-opts`` (flannel's
mk-docker-opts.sh) → ``dockerd $DOCKER_OPTS`` (Debian's docker.io, its containerd and runc, one
daemon per host) → busybox containers (an image made here from busybox-static: no registry is
needed) on different hosts ping each other.

Each dockerd runs in its host's network namespace and a private mount namespace of its own:
``nsenter --net`` (not ``ip netns exec``, which remounts /sys and so hides the cgroup
hierarchies dockerd needs), then a fresh sysfs (so /sys/class/net shows the host's devices) with
the cgroup mounts moved back on top, and a tmpfs on /run (two daemons sharing one /run break
each other: containerd's state and shim sockets live there). Its API socket and data root are in
the test's temporary directory; everything is named for this run and stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from pathlib import Path

import pytest
from support.harness import REPO, RUN_ID, Host, Lab, need, need_root, sh, wait_for

from netagent.files import read_env_file

pytestmark = pytest.mark.privileged

PREFIX = "/coreos.com/network"
NETWORK = "172.20.0.0/16"
IMAGE = f"na{RUN_ID}-busybox:latest"

# run inside the new mount namespace: $1 a scratch dir, the rest the dockerd command line
MOUNTS = (
    'cg="$1/cgroup"; shift; mkdir -p "$cg"; '
    'mount --rbind /sys/fs/cgroup "$cg"; mount -t sysfs sysfs /sys; '
    'mount --move "$cg" /sys/fs/cgroup; mount -t tmpfs tmpfs /run; exec "$@"'
)


def need_docker() -> str:
    """The docker client; skips (fails in CI) without docker.io or a static busybox."""
    need_root()
    docker = shutil.which("docker")
    need(shutil.which("dockerd") is not None and docker is not None,
         "needs Docker (apt-get install docker.io)")
    need(Path("/bin/busybox").exists()
         and sh("ldd", "/bin/busybox", check=False).returncode != 0,
         "needs a static busybox for the test image (apt-get install busybox-static)")
    assert docker is not None
    return docker


@dataclass
class Dockerd:
    """One dockerd for one namespace host, started by PID with the host's docker_opts."""

    host: Host
    root: Path
    opts: list[str]
    docker: str
    proc: subprocess.Popen[bytes] | None = None
    containers: list[str] = field(default_factory=list)

    @property
    def sock(self) -> Path:
        return self.root / "docker.sock"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = ["nsenter", f"--net=/run/netns/{self.host.name}",
               "unshare", "--mount", "--propagation", "private",
               "sh", "-ec", MOUNTS, "sh", str(self.root),
               "dockerd", "--data-root", str(self.root / "data"), "--exec-root", "/run/docker",
               "--pidfile", "/run/docker.pid", "-H", f"unix://{self.sock}",
               "--storage-driver", "overlay2", *self.opts]
        log = open(self.root / "dockerd.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"dockerd on {self.host.name} exited: {self.log()[-3000:]}")
            return self.cli("version", check=False).returncode == 0

        wait_for(up, timeout=40, interval=0.2, what=f"dockerd on {self.host.name}")

    def log(self) -> str:
        return (self.root / "dockerd.log").read_text(errors="replace")

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return sh(self.docker, "-H", f"unix://{self.sock}", *args, check=check, timeout=timeout)

    def run_container(self, name: str) -> str:
        self.cli("run", "-d", "--init", "--name", name, IMAGE, "sleep", "3600")
        self.containers.append(name)
        return name

    def inspect(self, name: str, fmt: str) -> str:
        return self.cli("inspect", "-f", fmt, name).stdout.strip()

    def stop(self) -> None:
        """Containers first (by name), then the daemon by PID; a daemon that will not stop is
        killed, and so is any container process it left behind."""
        if self.proc is None:
            return
        pids = []
        if self.proc.poll() is None:
            for name in self.containers:
                proc = self.cli("inspect", "-f", "{{.State.Pid}}", name, check=False)
                if proc.returncode == 0 and proc.stdout.strip() not in ("", "0"):
                    pids.append(int(proc.stdout.strip()))
            if self.containers:
                self.cli("rm", "-f", *self.containers, check=False)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc = None

    def restart(self) -> None:
        """Stop the daemon only (containers stop with it, as with `systemctl restart docker`)
        and start it again with the same options."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.start()
        self.wait_ready()


@dataclass
class DockerLab:
    lab: Lab
    hosts: list[Host]
    agent_args: tuple[str, ...]
    daemons: list[Dockerd]
    containers: list[str]
    warnings: list[str]  # what `netagent docker-opts` printed on stderr, per host

    def ip(self, i: int) -> str:
        return self.daemons[i].inspect(self.containers[i], "{{.NetworkSettings.IPAddress}}")

    def pid(self, i: int) -> int:
        return int(self.daemons[i].inspect(self.containers[i], "{{.State.Pid}}"))

    def ping(self, i: int, j: int, count: int = 1) -> bool:
        proc = self.daemons[i].cli("exec", self.containers[i], "ping", "-c", str(count), "-W", "1",
                                   self.ip(j), check=False, timeout=count + 10)
        return proc.returncode == 0

    def in_container(self, i: int, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A host tool (iputils ping, iptables) in container i's network namespace."""
        return sh("nsenter", "-t", str(self.pid(i)), "-n", *cmd, check=check)


def busybox_tar(tmp: Path) -> Path:
    """A one-binary root file system: busybox-static and a link per applet."""
    rootfs = tmp / "busybox-rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    applets = sh("/bin/busybox", "--list").stdout.split()
    for applet in applets:
        if applet != "busybox":
            (rootfs / "bin" / applet).symlink_to("busybox")
    tar = tmp / "busybox.tar"
    sh("tar", "-C", str(rootfs), "-cf", str(tar), ".")
    return tar


def docker_opts(lab: Lab, host: Host) -> tuple[list[str], str]:
    """`netagent docker-opts` on the host, as netagent.service's ExecStartPost runs it: the
    dockerd arguments from DOCKER_OPTS, and what the command printed on stderr."""
    out = host.subnet_file.parent / "docker_opts.env"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = sh("ip", "netns", "exec", host.name, sys.executable, "-m", "netagent", "docker-opts",
              "-f", str(host.subnet_file), "-d", str(out), env=env)
    return shlex.split(read_env_file(out)["DOCKER_OPTS"]), proc.stderr


@contextlib.contextmanager
def docker_lab(tmp: Path, tag: str, backend: str, *agent_args: str) -> Iterator[DockerLab]:
    docker = need_docker()
    lab = Lab(tmp, tag=tag)
    daemons: list[Dockerd] = []
    try:
        lab.start_etcd()
        config = json.dumps({"Network": NETWORK, "SubnetLen": 24, "Backend": {"Type": backend}})
        hosts = lab.start_hosts(config, 2, *agent_args)
        warnings = []
        for h in hosts:
            opts, stderr = docker_opts(lab, h)
            warnings.append(stderr)
            daemons.append(Dockerd(h, tmp / f"{h.name}-docker", opts, docker))
        for d in daemons:
            d.start()
        tar = busybox_tar(tmp)
        containers = []
        for d in daemons:
            d.wait_ready()
            d.cli("import", str(tar), IMAGE)
            containers.append(d.run_container(f"na{RUN_ID}{tag}-c{d.host.index}"))
        yield DockerLab(lab, hosts, agent_args, daemons, containers, warnings)
    finally:
        for d in daemons:
            with contextlib.suppress(Exception):
                d.stop()
        lab.close()


@pytest.fixture(scope="module")
def vxlan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerLab]:
    """flannel's default: the agent without --ip-masq, so Docker masquerades."""
    with docker_lab(tmp_path_factory.mktemp("dkv"), "dv", "vxlan") as world:
        yield world


@pytest.fixture(scope="module")
def hostgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerLab]:
    """The recommended set-up: --ip-masq on the agent, so Docker gets --ip-masq=false."""
    with docker_lab(tmp_path_factory.mktemp("dkg"), "dg", "host-gw", "--ip-masq") as world:
        yield world


def both_ways(world: DockerLab) -> None:
    for i, j in ((0, 1), (1, 0)):
        wait_for(lambda i=i, j=j: world.ping(i, j), timeout=20, interval=0.3,
                 what=f"container on {world.hosts[i].name} → container on {world.hosts[j].name}")


def iptables_hooks(host: Host) -> dict[str, list[str]]:
    """netagent's chains and the rules jumping to them (filter FORWARD, nat POSTROUTING)."""
    out = {}
    for table, chain in (("filter", "FORWARD"), ("nat", "POSTROUTING")):
        rules = host.run("iptables", "-w", "-t", table, "-S", chain).stdout.splitlines()
        out[f"{table} {chain}"] = [r for r in rules if "FLANNEL" in r]
    for table, chain in (("filter", "FLANNEL-FWD"), ("nat", "FLANNEL-POSTRTG")):
        proc = host.run("iptables", "-w", "-t", table, "-S", chain, check=False)
        out[f"{table} {chain}"] = proc.stdout.splitlines() if proc.returncode == 0 else []
    return out


def count_sources(world: DockerLab, receiver: int, sender: int, sources: list[str]) -> dict[str, int]:
    """Which source address container `receiver` sees on echo requests from `sender`: a counting
    rule per candidate in the receiver's INPUT, three pings, the counters read back."""
    for src in sources:
        world.in_container(receiver, "iptables", "-w", "-A", "INPUT", "-p", "icmp", "-s", src)
    assert world.ping(sender, receiver, count=3)
    listing = world.in_container(receiver, "iptables", "-w", "-nvxL", "INPUT").stdout
    counts = {}
    for src in sources:
        m = re.search(rf"^\s*(\d+)\s+\d+\s+(?:icmp|1)\s+--\s+\*\s+\*\s+{re.escape(src)}\s", listing, re.M)
        assert m, listing
        counts[src] = int(m.group(1))
    world.in_container(receiver, "iptables", "-w", "-F", "INPUT")
    return counts


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("which", ["vxlan", "hostgw"])
def test_docker_gets_the_hosts_subnet_and_mtu(which: str, request: pytest.FixtureRequest) -> None:
    """docker0 carries --bip (the leased subnet's first address), containers get addresses from
    the subnet and eth0 has FLANNEL_MTU; a full-size packet with DF set crosses to the other
    host's container, so the MTU really fits the path."""
    world: DockerLab = request.getfixturevalue(which)
    both_ways(world)
    for i, (h, d) in enumerate(zip(world.hosts, world.daemons, strict=True)):
        env = read_env_file(h.subnet_file)
        mtu = int(env["FLANNEL_MTU"])
        assert f"--bip={env['FLANNEL_SUBNET']}" in d.opts and f"--mtu={mtu}" in d.opts
        addr = json.loads(h.run("ip", "-j", "-4", "addr", "show", "docker0").stdout)[0]
        info = addr["addr_info"][0]
        assert f"{info['local']}/{info['prefixlen']}" == env["FLANNEL_SUBNET"]
        assert addr["mtu"] == mtu, "docker0 drops to --mtu once a container joins"
        assert IPv4Interface(f"{world.ip(i)}/24") in IPv4Interface(env["FLANNEL_SUBNET"]).network
        eth0 = world.daemons[i].cli("exec", world.containers[i], "cat",
                                    "/sys/class/net/eth0/mtu").stdout.strip()
        assert int(eth0) == mtu
    mtu = int(read_env_file(world.hosts[0].subnet_file)["FLANNEL_MTU"])
    assert mtu == (1450 if which == "vxlan" else 1500)
    proc = world.in_container(0, "ping", "-M", "do", "-s", str(mtu - 28), "-c", "2", "-W", "2",
                              world.ip(1), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    too_big = world.in_container(0, "ping", "-M", "do", "-s", str(mtu - 27), "-c", "1", "-W", "1",
                                 world.ip(1), check=False)
    assert too_big.returncode != 0


def test_without_ip_masq_docker_masquerades_and_says_so(vxlan: DockerLab) -> None:
    """flannel's behaviour, kept: docker_opts says --ip-masq=true, so the receiving container
    sees the sending host's flannel.1 address; `docker-opts` warns and names the fix."""
    for w, d in zip(vxlan.warnings, vxlan.daemons, strict=True):
        assert "--ip-masq=true" in d.opts
        assert "warning" in w and "run the agent with --ip-masq" in w
    addr = json.loads(vxlan.hosts[0].run("ip", "-j", "-4", "addr", "show", "flannel.1").stdout)
    flannel1 = addr[0]["addr_info"][0]["local"]
    both_ways(vxlan)
    seen = count_sources(vxlan, 1, 0, [vxlan.ip(0), flannel1])
    assert seen == {vxlan.ip(0): 0, flannel1: 3}


def test_with_ip_masq_containers_keep_their_address(hostgw: DockerLab) -> None:
    for w, d in zip(hostgw.warnings, hostgw.daemons, strict=True):
        assert "--ip-masq=false" in d.opts and w == ""
    both_ways(hostgw)
    assert count_sources(hostgw, 1, 0, [hostgw.ip(0)]) == {hostgw.ip(0): 3}


def test_agent_restart_while_containers_ping_loses_nothing(vxlan: DockerLab) -> None:
    both_ways(vxlan)
    lab, host = vxlan.lab, vxlan.hosts[0]
    ready_before = lab.log(host).count("ready: subnet")
    count, interval = 80, 0.1
    ping = subprocess.Popen(
        [vxlan.daemons[0].docker, "-H", f"unix://{vxlan.daemons[0].sock}", "exec",
         vxlan.containers[0], "ping", "-q", "-c", str(count), "-i", str(interval), "-W", "1",
         vxlan.ip(1)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = time.monotonic()
    try:
        time.sleep(1)
        assert lab.stop_agent(host) == 0
        lab.start_agent(host, *vxlan.agent_args)
        wait_for(lambda: lab.log(host).count("ready: subnet") > ready_before, timeout=30,
                 what=f"the restarted agent on {host.name} to be ready")
        restarted_in = time.monotonic() - started
        out, _ = ping.communicate(timeout=count * interval + 30)
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait(5)
    assert restarted_in < count * interval, "the ping ended before the agent was back: lengthen it"
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
    assert m, out
    assert (int(m.group(1)), int(m.group(2))) == (count, count), out


def test_dockerd_restart_keeps_netagents_iptables_hooks(hostgw: DockerLab) -> None:
    """The agent is stopped first (SIGTERM leaves its rules), so nothing re-adds what a
    restarting dockerd might remove: the rules afterwards are Docker's doing alone."""
    lab, host, daemon = hostgw.lab, hostgw.hosts[0], hostgw.daemons[0]
    before = iptables_hooks(host)
    assert before["filter FORWARD"] and before["nat POSTROUTING"], before
    assert before["filter FLANNEL-FWD"] and before["nat FLANNEL-POSTRTG"], before
    assert "-P FORWARD DROP" in host.run("iptables", "-w", "-S", "FORWARD").stdout, \
        "Docker sets FORWARD to DROP: FLANNEL-FWD is what lets overlay traffic through"
    ready_before = lab.log(host).count("ready: subnet")
    assert lab.stop_agent(host) == 0
    daemon.restart()
    assert iptables_hooks(host) == before
    lab.start_agent(host, *hostgw.agent_args)
    wait_for(lambda: lab.log(host).count("ready: subnet") > ready_before, timeout=30,
             what=f"the restarted agent on {host.name} to be ready")
    daemon.cli("start", hostgw.containers[0])
    both_ways(hostgw)
    assert iptables_hooks(host) == before
