"""flannel's Docker flow with a real dockerd, end to end (issue 14).

Two namespace hosts per backend, each: ``netagent run`` → ``netagent docker-opts`` (flannel's
mk-docker-opts.sh) → ``dockerd $DOCKER_OPTS`` (Debian's docker.io, its containerd and runc, one
daemon per host, see tests/support/docker.py for how it gets a host of its own) → busybox
containers (an image made here from busybox-static: no registry is needed) on different hosts
ping each other, on vxlan (the agent without --ip-masq: Docker masquerades, as with flannel)
and on host-gw (the agent with --ip-masq: Docker does not).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path

import pytest
from support.docker import Dockerd, busybox_tar, docker_opts, docker_unavailable
from support.harness import RUN_ID, Host, Lab, need, need_root, sh, wait_for

from netagent.files import read_env_file

pytestmark = pytest.mark.privileged

PREFIX = "/coreos.com/network"
NETWORK = "172.20.0.0/16"


def need_docker() -> None:
    """Skips without Docker (fails in CI, like every privileged prerequisite)."""
    need_root()
    why = docker_unavailable()
    need(why is None, why or "")


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


@contextlib.contextmanager
def docker_lab(tmp: Path, tag: str, backend: str, *agent_args: str) -> Iterator[DockerLab]:
    need_docker()
    lab = Lab(tmp, tag=tag)
    daemons: list[Dockerd] = []
    try:
        lab.start_etcd()
        config = json.dumps({"Network": NETWORK, "SubnetLen": 24, "Backend": {"Type": backend}})
        hosts = lab.start_hosts(config, 2, *agent_args)
        warnings = []
        for h in hosts:
            opts, stderr = docker_opts(h)
            warnings.append(stderr)
            daemons.append(Dockerd(h, tmp / f"{h.name}-docker", opts))
        for d in daemons:
            # a fresh Debian host: forwarding off until Docker turns it on, and with it sets
            # FORWARD's policy to DROP (only netagent's FLANNEL-FWD lets overlay traffic through)
            d.host.run("sysctl", "-qw", "net.ipv4.ip_forward=0")
            d.start()
        tar = busybox_tar(tmp)
        containers = []
        for d in daemons:
            d.wait_ready()
            d.import_image(tar)
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
