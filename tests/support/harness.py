"""Test harness: a real etcd and namespace "hosts" joined by an underlay bridge.

Everything gets names unique to the run (``RUN_ID``) so two test runs never collide, and is
removed by name/PID, never by a broad pattern.

Topology made by :class:`Lab`::

    netns <lab>-ul   (underlay: bridge "ul0", etcd listening on 10.U.V.1)
        | veth
    netns <lab>-h1 ... <lab>-hN   (host i: "eth0" = 10.U.V.(10+i)/24, default route via .1)

Hosts reach etcd at http://10.U.V.1:<port>. The test process (root namespace) talks to etcd
through ``etcdctl`` run inside the underlay namespace, just as an operator would.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network, IPv6Address
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RUN_ID = os.environ.get("NETAGENT_TEST_RUN_ID") or f"{os.getpid() % 10000:04d}{random.randrange(16**2):02x}"
_REQUIRE = os.environ.get("NETAGENT_REQUIRE_PRIVILEGED", "") not in ("", "0", "false")


def need(condition: bool, why: str) -> None:
    """Skip when a privileged prerequisite is missing; fail instead under CI."""
    import pytest

    if condition:
        return
    if _REQUIRE:
        pytest.fail(f"NETAGENT_REQUIRE_PRIVILEGED is set but {why}", pytrace=False)
    pytest.skip(why)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root")
    need(shutil.which("ip") is not None, "needs iproute2")


def need_etcd() -> None:
    need(shutil.which("etcd") is not None and shutil.which("etcdctl") is not None,
         "needs etcd-server and etcd-client (apt-get install etcd-server etcd-client)")


def sh(*args: str, check: bool = True, ns: str | None = None, timeout: float = 30,
       input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = list(args)
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                          env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- namespaces


def add_netns(name: str) -> None:
    sh("ip", "netns", "add", name)
    sh("ip", "link", "set", "lo", "up", ns=name)


def del_netns(name: str) -> None:
    # kill what still runs inside (only processes in *this* namespace), then delete it
    pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    sh("ip", "netns", "del", name, check=False)


@contextlib.contextmanager
def netns(name: str) -> Iterator[str]:
    add_netns(name)
    try:
        yield name
    finally:
        del_netns(name)


# --------------------------------------------------------------------------- etcd


@dataclass
class Etcd:
    """One etcd member started by PID, on free ports, with a temp data dir."""

    host: str = "127.0.0.1"
    ns: str | None = None
    enable_v2: bool = False
    extra: Sequence[str] = ()
    name: str = field(default_factory=lambda: f"t{RUN_ID}")
    client_port: int = 0
    peer_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    data_dir: str = ""
    scheme: str = "http"

    @property
    def _hostport(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self._hostport}:{self.client_port}"

    def start(self, wait: bool = True) -> Etcd:
        need_etcd()
        if not self.client_port:
            self.client_port = free_port() if self.ns is None else random.randrange(20000, 30000)
            self.peer_port = self.client_port + 1 if self.ns else free_port()
        if not self.data_dir:
            self.data_dir = tempfile.mkdtemp(prefix=f"na-etcd-{RUN_ID}-")
        peer = f"http://{self._hostport}:{self.peer_port}"
        cmd = [
            "etcd", "--name", self.name, "--data-dir", self.data_dir,
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--log-level", "error",
        ]
        if "--initial-cluster" not in self.extra:
            cmd += ["--initial-cluster", f"{self.name}={peer}"]
        if self.enable_v2:
            cmd.append("--enable-v2=true")
        cmd += list(self.extra)
        if self.ns:
            cmd = ["ip", "netns", "exec", self.ns, *cmd]
        log = open(Path(self.data_dir) / "etcd.log", "ab")  # noqa: SIM115 - lives with proc
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self) -> Etcd:
        assert self.proc is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited: {(Path(self.data_dir) / 'etcd.log').read_text()}")
            if self.ctl("endpoint", "health", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError("etcd did not become healthy in 20 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def ctl(self, *args: str, check: bool = True, api: int = 3,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, ETCDCTL_API=str(api))
        if api == 2:
            cmd = ["etcdctl", "--endpoints", self.endpoint, *args]
        else:
            cmd = ["etcdctl", "--endpoints", self.endpoint, "--dial-timeout", "3s", *args]
        return sh(*cmd, check=check, ns=self.ns, input=input, env=env)

    def put(self, key: str, value: str) -> None:
        self.ctl("put", key, "--", value) if value.startswith("-") else self.ctl("put", key, value)

    def get(self, key: str) -> str | None:
        out = self.ctl("get", key, "--print-value-only").stdout
        return out[:-1] if out.endswith("\n") else (out or None)

    def get_prefix(self, prefix: str) -> dict[str, str]:
        out = self.ctl("get", "--prefix", prefix, "-w", "json").stdout
        doc = json.loads(out)
        import base64

        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in doc.get("kvs", [])
        }

    def get_json(self, key: str) -> dict[str, object]:
        out = self.ctl("get", key, "-w", "json").stdout
        return json.loads(out)  # type: ignore[no-any-return]


class EtcdCluster:
    """Three members (or `size`) on one address, distinct ports, each killable by PID."""

    def __init__(self, host: str, ns: str | None, size: int = 3) -> None:
        need_etcd()
        base = random.randrange(20000, 29000) if ns else free_port()
        self.members = [
            Etcd(host=host, ns=ns, name=f"c{i}-{RUN_ID}", client_port=base + 2 * i,
                 peer_port=base + 2 * i + 1)
            for i in range(size)
        ]
        cluster = ",".join(f"{m.name}=http://{host}:{m.peer_port}" for m in self.members)
        for m in self.members:
            m.extra = ("--initial-cluster", cluster, "--initial-cluster-state", "new",
                       "--initial-cluster-token", f"tok-{RUN_ID}")

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def start(self) -> EtcdCluster:
        # members wait for each other: start all, then wait for health
        for m in self.members:
            m.start(wait=False)
        for m in self.members:
            m.wait_healthy()
        return self

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        alive = [m for m in self.members if m.proc is not None and m.proc.poll() is None]
        env = dict(os.environ, ETCDCTL_API="3")
        cmd = ["etcdctl", "--endpoints", ",".join(m.endpoint for m in alive),
               "--dial-timeout", "3s", *args]
        return sh(*cmd, check=check, ns=self.members[0].ns, env=env)

    def leader(self) -> Etcd:
        out = json.loads(self.ctl("endpoint", "status", "-w", "json").stdout)
        leader_id = out[0]["Status"]["leader"]
        for st in out:
            if st["Status"]["header"]["member_id"] == leader_id:
                ep = st["Endpoint"]
                return next(m for m in self.members if m.endpoint == ep)
        raise RuntimeError("no leader")

    def cleanup(self) -> None:
        for m in self.members:
            m.cleanup()


# --------------------------------------------------------------------------- lab


@dataclass(frozen=True)
class Segment:
    """A second underlay L2 segment (its own bridge namespace), reached through a router."""

    ns: str  # namespace holding the bridge "ul0"
    prefix: str  # "10.A.B": hosts get .11, .12, ...
    gateway: str  # the router's address on this segment


@dataclass(frozen=True)
class Router:
    """A router namespace joining the lab's segment and a second one (see Lab.add_router)."""

    ns: str
    ip: str  # its address on the lab's own segment
    loopback: str  # an address on its lo, reachable from both segments (a ToR's BGP address)
    segment: Segment


@dataclass
class Host:
    name: str  # namespace
    ip: str  # underlay address
    index: int
    subnet_file: Path
    state_dir: Path
    ip6: str = ""  # underlay IPv6 address
    agent: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: the underlay segment the host is on (None: the lab's own, with etcd)
    segment: Segment | None = None

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return sh(*args, ns=self.name, check=check, timeout=timeout)

    def status(self) -> dict[str, Any]:
        """The agent's status.json ({} while it is missing or being replaced)."""
        try:
            return json.loads((self.state_dir / "status.json").read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return {}

    def subnet(self) -> IPv4Network:
        """This host's leased subnet, from its subnet.env."""
        return IPv4Interface(read_env_file(self.subnet_file)["FLANNEL_SUBNET"]).network


@dataclass
class Pod:
    name: str  # namespace
    ip: str
    host: Host
    ip6: str = ""  # set when the host's subnet.env has an IPv6 subnet

    def ping(self, ip: str, count: int = 1, wait: float = 1.0) -> bool:
        proc = sh("ping", "-c", str(count), "-W", str(wait), "-i", "0.2", ip, ns=self.name,
                  check=False, timeout=count * (wait + 1) + 5)
        return proc.returncode == 0


def ping_all(pods: Sequence[Pod], timeout: float = 20.0) -> None:
    """Every pod pings every other one; each pair polled (bounded) since the first packets may
    race the peers' programming. The error names the pair that never answered."""
    for a in pods:
        for b in pods:
            if a is not b:
                wait_for(lambda a=a, b=b: a.ping(b.ip), timeout=timeout, interval=0.2,
                         what=f"ping {a.name} ({a.ip}) → {b.name} ({b.ip})")


class PingRun:
    """A continuous ping in the background; `result()` gives (transmitted, received)."""

    def __init__(self, pod: Pod, ip: str, seconds: float, interval: float = 0.2) -> None:
        count = max(1, int(seconds / interval))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", pod.name, "ping", "-n", "-q", "-i", str(interval), "-W", "1",
             "-c", str(count), ip],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.limit = seconds + 30

    def result(self) -> tuple[int, int]:
        out, _ = self.proc.communicate(timeout=self.limit)
        import re

        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        if not m:
            raise AssertionError(f"no ping summary: {out!r}")
        return int(m.group(1)), int(m.group(2))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class Lab:
    """A run-unique underlay namespace with a bridge, etcd on it, and N host namespaces."""

    def __init__(self, tmp: Path, tag: str = "", ipv4: bool = True) -> None:
        """``ipv4=False``: IPv6-only hosts (no IPv4 address or route; etcd on the underlay's
        IPv6 address)."""
        need_root()
        self.ipv4 = ipv4
        self.tag = f"na{RUN_ID}{tag}"
        self.tmp = tmp
        self.ul = f"{self.tag}-ul"
        third = random.randrange(1, 250)
        second = random.randrange(200, 250)
        self.prefix = f"10.{second}.{third}"
        self.etcd_ip = f"{self.prefix}.1"
        #: the underlay's IPv6 /64 (every host has an address in it, used by dual-stack tests)
        self.prefix6 = f"fd00:{second:x}:{third:x}::"
        self.hosts: list[Host] = []
        self.pods: list[Pod] = []
        self._clusters: list[EtcdCluster] = []
        self.etcd: Etcd | None = None
        self._made: list[str] = []
        add_netns(self.ul)
        self._made.append(self.ul)
        sh("ip", "link", "add", "ul0", "type", "bridge", ns=self.ul)
        sh("ip", "addr", "add", f"{self.etcd_ip}/24", "dev", "ul0", ns=self.ul)
        sh("ip", "-6", "addr", "add", f"{self.prefix6}1/64", "dev", "ul0", "nodad", ns=self.ul)
        sh("ip", "link", "set", "ul0", "up", ns=self.ul)

    def start_etcd(self, **kw: object) -> Etcd:
        host = self.etcd_ip if self.ipv4 else f"{self.prefix6}1"
        self.etcd = Etcd(host=host, ns=self.ul, **kw).start()  # type: ignore[arg-type]
        return self.etcd

    def add_host(self, mtu: int = 1500, segment: Segment | None = None) -> Host:
        """A host on the lab's segment, or on `segment` (default route via its router)."""
        i = len(self.hosts) + 1
        host = self._wire_host(i, mtu, segment)
        self.hosts.append(host)
        return host

    def add_router(self) -> Router:
        """A router namespace ``<lab>-rt`` on the lab's segment (.254) and on a second segment
        ``<lab>-ul2`` (another bridge, another /24, router .254): hosts added with
        ``add_host(segment=router.segment)`` are not on the same L2 as the others. Hosts of
        the lab's segment are *not* re-pointed at the router: callers that need it do
        ``ip route replace default via router.ip``. The router has ip_forward on and an
        address on lo (``loopback``, a /32) for a BGP speaker both segments reach."""
        rt, ul2 = f"{self.tag}-rt", f"{self.tag}-ul2"
        for name in (rt, ul2):
            add_netns(name)
            self._made.append(name)
        second, third = self.prefix.split(".")[1:]
        prefix2 = f"10.{second}.{(int(third) + 1) % 250 + 1}"
        router_ip, gw2 = f"{self.prefix}.254", f"{prefix2}.254"
        sh("ip", "link", "add", "ul0", "type", "bridge", ns=ul2)
        sh("ip", "link", "set", "ul0", "up", ns=ul2)
        sh("ip", "link", "add", "eth0", "netns", rt, "type", "veth", "peer", "name", "ulrt",
           "netns", self.ul)
        sh("ip", "link", "set", "ulrt", "master", "ul0", "up", ns=self.ul)
        sh("ip", "link", "add", "eth1", "netns", rt, "type", "veth", "peer", "name", "ulrt",
           "netns", ul2)
        sh("ip", "link", "set", "ulrt", "master", "ul0", "up", ns=ul2)
        sh("ip", "addr", "add", f"{router_ip}/24", "dev", "eth0", ns=rt)
        sh("ip", "addr", "add", f"{gw2}/24", "dev", "eth1", ns=rt)
        loopback = f"10.{second}.255.{int(third) % 250 + 1}"
        sh("ip", "addr", "add", f"{loopback}/32", "dev", "lo", ns=rt)
        for dev in ("eth0", "eth1"):
            sh("ip", "link", "set", dev, "up", ns=rt)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=rt)
        # etcd's namespace answers hosts of the second segment through the router
        sh("ip", "route", "add", f"{prefix2}.0/24", "via", router_ip, ns=self.ul)
        return Router(rt, router_ip, loopback, Segment(ul2, prefix2, gw2))

    def reboot_host(self, host: Host, mtu: int = 1500) -> None:
        """Simulate a reboot: kill the agent, delete the namespace (all its kernel state) and
        recreate it with the same address. The host's files (subnet.env, state dir) survive."""
        self.stop_agent(host, signal.SIGKILL)
        for pod in [p for p in self.pods if p.host is host]:
            del_netns(pod.name)
            self.pods.remove(pod)
        del_netns(host.name)
        sh("ip", "link", "del", f"ulp{host.index}",
           ns=host.segment.ns if host.segment else self.ul, check=False)
        self._wire_host(host.index, mtu, host.segment)

    def _wire_host(self, i: int, mtu: int, segment: Segment | None = None) -> Host:
        name = f"{self.tag}-h{i}"
        add_netns(name)
        if name not in self._made:
            self._made.append(name)
        peer = f"ulp{i}"
        ul = segment.ns if segment else self.ul
        sh("ip", "link", "add", "eth0", "mtu", str(mtu), "netns", name, "type", "veth", "peer",
           "name", peer, "mtu", str(mtu), "netns", ul)
        sh("ip", "link", "set", peer, "master", "ul0", "up", ns=ul)
        prefix = segment.prefix if segment else self.prefix
        ip = f"{prefix}.{10 + i}" if self.ipv4 else ""
        ip6 = f"{self.prefix6}{10 + i:x}"
        if ip:
            sh("ip", "addr", "add", f"{ip}/24", "dev", "eth0", ns=name)
        sh("ip", "-6", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad", ns=name)
        sh("ip", "link", "set", "eth0", "up", ns=name)
        if ip:
            sh("ip", "route", "add", "default", "via",
               segment.gateway if segment else self.etcd_ip, ns=name)
        else:
            sh("ip", "-6", "route", "add", "default", "via", f"{self.prefix6}1", ns=name)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", ns=name)
        d = self.tmp / name
        d.mkdir(parents=True, exist_ok=True)
        return Host(name, ip, i, d / "subnet.env", d / "state", ip6, segment=segment)

    def agent_cmd(self, host: Host, *extra: str) -> list[str]:
        endpoints = self._clusters[-1].endpoints if self._clusters else None
        if endpoints is None:
            assert self.etcd is not None
            endpoints = self.etcd.endpoint
        return [
            sys.executable, "-m", "netagent", "run",
            "--etcd-endpoints", endpoints,
            "--subnet-file", str(host.subnet_file),
            "--state-dir", str(host.state_dir),
            "--iface", "eth0",
            *extra,
        ]

    def start_agent(
        self, host: Host, *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        host.log_path = self.tmp / f"{host.name}.log"
        log = open(host.log_path, "ab")  # noqa: SIM115 - closed with the process
        full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
        host.agent = subprocess.Popen(
            ["ip", "netns", "exec", host.name, *self.agent_cmd(host, *extra)],
            stdout=log, stderr=subprocess.STDOUT, env=full_env,
        )
        return host.agent

    def stop_agent(self, host: Host, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if host.agent is None:
            return None
        if host.agent.poll() is None:
            host.agent.send_signal(sig)
            try:
                host.agent.wait(timeout)
            except subprocess.TimeoutExpired:
                host.agent.kill()
                host.agent.wait(5)
        rc = host.agent.returncode
        host.agent = None
        return rc

    def start_cluster(self, size: int = 3) -> EtcdCluster:
        cluster = EtcdCluster(self.etcd_ip, self.ul, size).start()
        self._clusters.append(cluster)
        return cluster

    def add_pod(self, host: Host, bridge: str = "cni0") -> Pod:
        """A pod namespace on `host`, attached to a bridge holding the subnet's gateway address.

        Plain veth + bridge (what a CNI bridge plugin does), read from the host's subnet.env.
        """
        env = read_env_file(host.subnet_file)
        mtu = env.get("FLANNEL_MTU", "1500")
        k = sum(1 for p in self.pods if p.host is host) + 1
        name = f"{self.tag}-p{host.index}{k}"
        add_netns(name)
        self._made.append(name)
        gw_cidr = env.get("FLANNEL_SUBNET", "")
        if sh("ip", "link", "show", bridge, ns=host.name, check=False).returncode != 0:
            sh("ip", "link", "add", bridge, "mtu", mtu, "type", "bridge", ns=host.name)
            sh("ip", "link", "set", bridge, "up", ns=host.name)
        # (a bridge made before IPv4 was turned on has no IPv4 gateway yet)
        if gw_cidr and gw_cidr not in sh("ip", "-4", "addr", "show", "dev", bridge,
                                         ns=host.name).stdout:
            sh("ip", "addr", "add", gw_cidr, "dev", bridge, ns=host.name)
        hv = f"vp{k}"
        sh("ip", "link", "add", hv, "mtu", mtu, "type", "veth", "peer", "name", "eth0", "mtu", mtu,
           "netns", name, ns=host.name)
        sh("ip", "link", "set", hv, "master", bridge, "up", ns=host.name)
        sh("ip", "link", "set", "eth0", "up", ns=name)
        pod = Pod(name, "", host)
        if gw_cidr:  # IPv4 (absent in an IPv6-only network)
            gw, plen = gw_cidr.split("/")
            base = gw.rsplit(".", 1)[0]
            pod.ip = f"{base}.{int(gw.rsplit('.', 1)[1]) + 9 + k}"
            sh("ip", "addr", "add", f"{pod.ip}/{plen}", "dev", "eth0", ns=name)
            sh("ip", "route", "add", "default", "via", gw, ns=name)
        if "FLANNEL_IPV6_SUBNET" in env:  # dual stack or IPv6-only, no DAD wait
            gw6_cidr = env["FLANNEL_IPV6_SUBNET"]
            gw6, plen6 = gw6_cidr.split("/")
            if gw6_cidr not in sh("ip", "-6", "addr", "show", "dev", bridge, ns=host.name).stdout:
                sh("ip", "-6", "addr", "add", gw6_cidr, "dev", bridge, "nodad", ns=host.name)
            pod.ip6 = str(IPv6Address(int(IPv6Address(gw6)) + 9 + k))
            sh("ip", "-6", "addr", "add", f"{pod.ip6}/{plen6}", "dev", "eth0", "nodad", ns=name)
            sh("ip", "-6", "route", "add", "default", "via", gw6, ns=name)
        self.pods.append(pod)
        return pod

    def start_hosts(self, config: str, n: int, *agent_args: str) -> list[Host]:
        """Put `config`, start n hosts with agents; return once each wrote subnet.env (an agent
        that exits first fails with its log) and sees the n-1 others as peers."""
        assert self.etcd is not None
        self.etcd.put("/coreos.com/network/config", config)
        hosts = [self.add_host() for _ in range(n)]
        for h in hosts:
            self.start_agent(h, *agent_args)
        for h in hosts:
            wait_for(lambda h=h: h.subnet_file.exists() or h.agent.poll() is not None,  # type: ignore[union-attr]
                     timeout=60, what=f"{h.name} subnet.env")
            assert h.subnet_file.exists(), self.log(h)
        for h in hosts:
            wait_for(lambda h=h: h.status().get("peers") == n - 1, timeout=20,
                     what=f"{h.name} to see its {n - 1} peers")
        return hosts

    def mesh(self, config: str, n: int, *agent_args: str) -> list[Host]:
        """Put `config`, start n hosts with agents and a pod each; return once every pod
        reaches every other pod."""
        assert self.etcd is not None
        self.etcd.put("/coreos.com/network/config", config)
        hosts = [self.add_host() for _ in range(n)]
        for h in hosts:
            self.start_agent(h, *agent_args)
        for h in hosts:
            wait_for(h.subnet_file.exists, 30, what=f"{h.name} subnet.env")
        pods = [self.add_pod(h) for h in hosts]
        wait_for(lambda: all(p.ping(q.ip) for p in pods for q in pods if p is not q), 30,
                 interval=0.3, what="all pods reach each other")
        return hosts

    def leases(self, prefix: str = "/coreos.com/network") -> dict[str, str]:
        """subnets/<name> -> value, as etcdctl sees them."""
        assert self.etcd is not None
        base = f"{prefix}/subnets/"
        return {k[len(base):]: v for k, v in self.etcd.get_prefix(base).items()}

    def log(self, host: Host) -> str:
        return host.log_path.read_text(errors="replace") if host.log_path else ""

    def close(self) -> None:
        for h in self.hosts:
            with contextlib.suppress(Exception):
                self.stop_agent(h, signal.SIGKILL)
        if self.etcd is not None:
            self.etcd.cleanup()
        for cluster in self._clusters:
            cluster.cleanup()
        for name in reversed(self._made):
            del_netns(name)


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll `pred` until it returns a truthy value; raise AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def read_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            k, _, v = line.partition("=")
            out[k] = v
    return out


def kernel_state(ns: str, devices: Sequence[str] = (), family: int = 4) -> dict[str, list[str]]:
    """Routes (main table), neighbours and FDB entries of a namespace, as sorted text lines.

    Volatile parts (neighbour reachability of the underlay, link statistics) are left out so
    two snapshots compare equal when nothing was programmed in between.
    """
    fam = f"-{family}"
    routes = sh("ip", fam, "route", "show", "table", "main", ns=ns).stdout.splitlines()
    neigh = [ln for ln in sh("ip", fam, "neigh", "show", "nud", "permanent", ns=ns)
             .stdout.splitlines()]
    fdb = []
    for dev in devices:
        proc = sh("bridge", "fdb", "show", "dev", dev, ns=ns, check=False)
        fdb += [ln for ln in proc.stdout.splitlines() if "dst" in ln]
    return {"routes": sorted(routes), "neigh": sorted(neigh), "fdb": sorted(fdb)}
