#!/usr/bin/env python3
"""netagent at scale: N fake vxlan peer leases in etcd, one real agent, figures next to references.

Figures (project issue 8), for each N in ``--peers``:

* **program**: program N vxlan peers from scratch (neighbour + FDB + route each) with the
  agent's own backend code (``VxlanBackend.sync`` over ``NetlinkKernel``), leases as listed from
  etcd, vs ``ip -batch`` + ``bridge -batch`` writing the same entries into an identical device
  (a fresh namespace each, interleaved, median of ``--repeat``). ``--simple`` also times the
  one-call-per-entry pyroute2 path.
* **agent**: a real ``netagent run`` in a namespace host with the N leases already in etcd:
  the cold start, from the ``netagent run`` exec until the N-th peer route is in the kernel
  (seen by a netlink listener), next to the C tools doing the same work in the same run:
  ``etcdctl get --prefix`` of the same leases + ``ip -batch``/``bridge -batch`` of the same
  entries into an identical fresh device (median of 3); the agent's CPU seconds per peer for
  that start; start → ready; one peer added/removed while N are programmed (lease put in etcd →
  route in the kernel, seen by a netlink listener in the host's namespace; the reference is the
  same put → event delivery to a plain etcd watcher in this process); restart with N programmed
  (kernel writes seen by the listener, start → ready); RSS and CPU while nothing changes.
* **cluster** (``--hosts``, default 10): every host runs an agent; a fake lease is written
  ``--events`` times; time from the put until the route is in every host's kernel, vs the
  watch delivery to this process.

Needs root and etcd; everything lives in run-unique namespaces (tests/harness.py) and is removed
by name at the end. The process enters the lab's underlay namespace (where etcd listens) right
after creating it, so nothing runs in or changes the root namespace.

    sudo python3 bench/scale.py                                  # N = 500, 2000, 5000
    sudo python3 bench/scale.py --peers 5000 --repeat 5 --json scale.json
    sudo python3 bench/scale.py --peers 20000 --only program --only agent --hosts 0  # not in CI
    sudo python3 bench/scale.py --peers 5000 --only agent --profile /tmp/start.txt  # py-spy
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from support.harness import RUN_ID, Host, Lab, add_netns, del_netns, sh  # noqa: E402
from support.pyroute2kernel import Pyroute2Kernel  # noqa: E402

from netagent.backends.base import HostFacts  # noqa: E402
from netagent.backends.vxlan import VxlanBackend  # noqa: E402
from netagent.config import parse_network_config  # noqa: E402
from netagent.kernel import RTPROT_NETAGENT, NetlinkKernel  # noqa: E402
from netagent.kernel.rtnetlink import _open_netlink  # noqa: E402
from netagent.lease import (  # noqa: E402
    Lease,
    LeaseAttrs,
    canonical_json,
    decode_lease,
    encode_attrs,
    subnet_key,  # noqa: E402
)

NETWORK = IPv4Network("10.128.0.0/9")
#: the agents lease from the first 15 /24s; fake peers live above them
CONFIG = json.dumps({"Network": str(NETWORK), "SubnetLen": 24, "SubnetMin": "10.128.1.0",
                     "SubnetMax": "10.128.15.0", "Backend": {"Type": "vxlan"}})
PREFIX = "/coreos.com/network"
GOALS = {"program_ratio": 1.5, "event_ms": 10.0, "cluster_p99_ms": 100.0, "restart_s": 3.0,
         "rss_mb": 80.0, "cold_ratio": 1.5, "rss_mb_20000": 120.0, "idle_cpu_pct": 0.3}
_CLONE_NEWNET = 0x40000000


# --------------------------------------------------------------------------- fake peers


def peer_subnet(i: int) -> IPv4Network:
    """Peer i's /24 (i < 32,752); the first 16 are left free for the agents' own leases."""
    return IPv4Network((int(NETWORK.network_address) + (i + 16) * 256, 24))


def peer_public(i: int) -> IPv4Address:
    return IPv4Address(int(IPv4Address("172.20.0.10")) + i)


def peer_mac(i: int) -> str:
    return f"0e:5c:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"


def peer_value(i: int) -> str:
    data = canonical_json({"VNI": 1, "VtepMAC": peer_mac(i)})
    return encode_attrs(LeaseAttrs(public_ip=peer_public(i), backend_type="vxlan",
                                   backend_data=data))


def peer_key(i: int) -> str:
    return f"{PREFIX}/subnets/{subnet_key(peer_subnet(i))}"


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))] if s else float("nan")


# --------------------------------------------------------------------------- namespaces


_HOME_NS: list[int] = []


def enter_netns(name: str) -> None:
    """Move this process's main thread into namespace ``name`` (threads started afterwards
    inherit it); :func:`leave_netns` comes back. The lab's clean-up kills every process in its
    namespaces, so we must be out before it runs."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not _HOME_NS:
        _HOME_NS.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY))
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


def leave_netns() -> None:
    if _HOME_NS:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(_HOME_NS[0], _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")


class KernelMonitor:
    """A netlink listener inside a namespace: timestamps every change to our entries.

    Only our entries count: routes with proto 111, permanent neighbours and FDB entries (the
    agent's device is the only vxlan device in these namespaces)."""

    RTMGRP_NEIGH, RTMGRP_IPV4_ROUTE = 0x4, 0x40

    def __init__(self, netns: str) -> None:
        self.sock = _open_netlink(netns)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
        self.sock.bind((0, self.RTMGRP_NEIGH | self.RTMGRP_IPV4_ROUTE))
        self.sock.settimeout(0.2)
        self.events: list[tuple[float, str, str]] = []
        self.cond = threading.Condition()
        self.overruns = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:  # ENOBUFS: we fell behind; counted, the figures say so
                self.overruns += 1
                continue
            now = time.monotonic()
            found = []
            off = 0
            while off + 16 <= len(data):
                length, mtype, _f, _seq, _pid = struct.unpack_from("=IHHII", data, off)
                if length < 16:
                    break
                body = data[off + 16:off + length]
                off += (length + 3) & ~3
                ev = self._parse(mtype, body)
                if ev is not None:
                    found.append((now, *ev))
            if found:
                with self.cond:
                    self.events += found
                    self.cond.notify_all()

    @staticmethod
    def _parse(mtype: int, body: bytes) -> tuple[str, str] | None:
        if mtype in (24, 25) and len(body) >= 12:  # RTM_NEWROUTE / DELROUTE
            family, dst_len, _s, _t, _table, proto, _sc, _ty, _fl = struct.unpack_from(
                "=BBBBBBBBI", body)
            if family != 2 or proto != RTPROT_NETAGENT:
                return None
            dst = "0.0.0.0"
            off = 12
            while off + 4 <= len(body):
                ln, kind = struct.unpack_from("=HH", body, off)
                if ln < 4:
                    break
                if kind == 1:
                    dst = str(IPv4Address(body[off + 4:off + 8]))
                off += (ln + 3) & ~3
            return ("route+" if mtype == 24 else "route-", f"{dst}/{dst_len}")
        if mtype in (28, 29) and len(body) >= 12:  # RTM_NEWNEIGH / DELNEIGH
            family, _idx, state, _fl, _ty = struct.unpack_from("=BxxxiHBB", body)
            if not state & 0x80:
                return None
            what = {2: "neigh", 7: "fdb"}.get(family)
            return (what + ("+" if mtype == 28 else "-"), "") if what else None
        return None

    def mark(self) -> int:
        with self.cond:
            return len(self.events)

    def wait(self, kind: str, target: str, since: int, timeout: float) -> float | None:
        """Monotonic time of the first (kind, target) event after index ``since``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, k, d in self.events[since:]:
                    if k == kind and d == target:
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.2))

    def since(self, index: int) -> list[tuple[float, str, str]]:
        with self.cond:
            return list(self.events[index:])


# --------------------------------------------------------------------------- figure 1: program


@dataclass
class ProgramNs:
    """A namespace with an underlay veth and a vxlan device, for one programming run."""

    name: str
    ua: str = "ua0"

    def __post_init__(self) -> None:
        add_netns(self.name)
        try:
            sh("ip", "link", "add", self.ua, "type", "veth", "peer", "name", "ub0", ns=self.name)
            sh("ip", "addr", "add", "172.20.0.1/16", "dev", self.ua, ns=self.name)
            sh("ip", "link", "set", self.ua, "up", ns=self.name)
            sh("ip", "link", "set", "ub0", "up", ns=self.name)
            self.ua_index = json.loads(sh("ip", "-j", "link", "show", self.ua, ns=self.name)
                                       .stdout)[0]["ifindex"]
        except BaseException:
            del_netns(self.name)
            raise

    def close(self) -> None:
        del_netns(self.name)


def our_backend(ns: ProgramNs, state: Path, batched: bool = True) -> VxlanBackend:
    cfg = parse_network_config(CONFIG)
    addr = IPv4Address("172.20.0.1")
    facts = HostFacts(ns.ua, ns.ua_index, 1500, addr, addr, state)
    # batched=False: the pyroute2 reference kernel of the tests, one request per entry
    kernel = NetlinkKernel(ns.name) if batched else Pyroute2Kernel(ns.name)
    b = VxlanBackend(cfg, facts, kernel=kernel,
                     csum_workaround=False)
    b.prepare()
    own = Lease(IPv4Network((int(NETWORK.network_address) + 256, 24)),
                LeaseAttrs(public_ip=addr, backend_type="vxlan"))
    b.activate(own)
    return b


def ref_device(ns: ProgramNs) -> None:
    sh("ip", "link", "add", "flannel.1", "address", "0e:00:00:00:00:01", "type", "vxlan", "id",
       "1", "dev", ns.ua, "local", "172.20.0.1", "dstport", "8472", "nolearning", ns=ns.name)
    sh("ip", "addr", "add", f"{IPv4Address(int(NETWORK.network_address) + 256)}/32", "dev",
       "flannel.1",
       ns=ns.name, check=False)
    sh("ip", "link", "set", "flannel.1", "up", ns=ns.name)


def ref_batches(leases: dict[IPv4Network, Lease], tmp: Path) -> tuple[Path, Path]:
    ip_lines, br_lines = [], []
    for subnet, lease in leases.items():
        m = json.loads(lease.attrs.backend_data)["VtepMAC"]
        gw = subnet.network_address
        ip_lines.append(f"neigh replace {gw} lladdr {m} dev flannel.1 nud permanent")
        br_lines.append(f"fdb replace {m} dev flannel.1 dst {lease.attrs.public_ip} self "
                        "permanent")
        ip_lines.append(f"route replace {subnet} via {gw} dev flannel.1 onlink proto "
                        f"{RTPROT_NETAGENT}")
    ip_f, br_f = tmp / "ip.batch", tmp / "bridge.batch"
    ip_f.write_text("\n".join(ip_lines) + "\n")
    br_f.write_text("\n".join(br_lines) + "\n")
    return ip_f, br_f


def count_entries(netns: str) -> tuple[int, int, int]:
    k = NetlinkKernel(netns)
    try:
        link = k.link("flannel.1")
        if link is None:
            return (0, 0, 0)
        routes = sum(1 for r in k.dump_routes(254) if r.proto == RTPROT_NETAGENT)
        return (len(k.dump_neighs(link.index)), len(k.dump_fdb(link.index)), routes)
    finally:
        k.close()


def bench_program(n: int, leases: dict[IPv4Network, Lease], repeat: int, simple: bool,
                  tmp: Path) -> dict[str, Any]:
    ip_f, br_f = ref_batches(leases, tmp)
    ours, ref, naive, incr, idle_full = [], [], [], [], []
    for r in range(repeat):
        a = ProgramNs(f"na{RUN_ID}pa")
        try:
            b = our_backend(a, tmp / f"state-{r}")
            t0 = time.perf_counter()
            rep = b.sync(leases, None)
            ours.append(time.perf_counter() - t0)
            assert rep.added == 3 * n and not rep.failed, rep
            assert count_entries(a.name) == (n, n, n)
            # one more peer while n are programmed, then a full compare with nothing to do
            extra = {**leases, peer_subnet(n + 1): decode_lease(
                subnet_key(peer_subnet(n + 1)), peer_value(n + 1).encode())}
            t0 = time.perf_counter()
            rep = b.sync(extra, frozenset({peer_subnet(n + 1)}))
            incr.append(time.perf_counter() - t0)
            assert rep.added == 3, rep
            for _ in range(2):  # the second is the steady state of every repair interval
                t0 = time.perf_counter()
                rep = b.sync(extra, None)
                assert rep.changes == 0, rep
            idle_full.append(time.perf_counter() - t0)
        finally:
            a.close()
        c = ProgramNs(f"na{RUN_ID}pb")
        try:
            ref_device(c)
            t0 = time.perf_counter()
            sh("ip", "-n", c.name, "-batch", str(ip_f), timeout=300)
            sh("bridge", "-n", c.name, "-batch", str(br_f), timeout=300)
            ref.append(time.perf_counter() - t0)
            assert count_entries(c.name) == (n, n, n)
        finally:
            c.close()
        if simple:
            d = ProgramNs(f"na{RUN_ID}pc")
            try:
                b = our_backend(d, tmp / f"state-s{r}", batched=False)
                t0 = time.perf_counter()
                b.sync(leases, None)
                naive.append(time.perf_counter() - t0)
            finally:
                d.close()
    out = {"ours_s": statistics.median(ours), "ref_s": statistics.median(ref),
           "incremental_ms": statistics.median(incr) * 1e3,
           "full_compare_noop_ms": statistics.median(idle_full) * 1e3}
    out["ratio"] = out["ours_s"] / out["ref_s"]
    if naive:
        out["simple_s"] = statistics.median(naive)
        out["simple_ratio"] = out["simple_s"] / out["ref_s"]
    return out


# --------------------------------------------------------------------------- etcd side


class Etcd:
    """This process's etcd client (the bench lives in the underlay namespace, next to etcd)."""

    def __init__(self, endpoint: str) -> None:
        from netagent.registry import EtcdSettings, Registry

        self.reg = Registry(EtcdSettings(endpoints=(endpoint,), prefix=PREFIX))
        self.watched: dict[str, float] = {}
        self._stop = threading.Event()
        self._cond = threading.Condition()

    def put_many(self, items: list[tuple[str, str]]) -> None:
        def op(c: Any) -> None:
            for i in range(0, len(items), 100):
                c.transaction(compare=[], success=[c.transactions.put(k, v)
                                                   for k, v in items[i:i + 100]], failure=[])

        self.reg.call("bulk put", op)

    def put(self, key: str, value: str) -> tuple[float, float]:
        """(when the put was sent, when etcd acknowledged it): latencies count from the first,
        so they include the write itself and never come out shorter than they were."""
        t0 = time.monotonic()
        self.reg.put(key, value)
        return t0, time.monotonic()

    def delete(self, key: str) -> tuple[float, float]:
        t0 = time.monotonic()
        self.reg.delete(key)
        return t0, time.monotonic()

    def start_watch(self) -> None:
        """The reference: how long etcd takes to deliver a put to a plain watcher."""
        _, rev = self.reg.list_prefix(f"{PREFIX}/subnets/")

        def run() -> None:
            for ev in self.reg.watch_prefix(f"{PREFIX}/subnets/", rev + 1, self._stop):
                with self._cond:
                    self.watched[f"{getattr(ev, 'kind', '')} {getattr(ev, 'key', '')}"] = \
                        time.monotonic()
                    self._cond.notify_all()

        threading.Thread(target=run, daemon=True).start()
        time.sleep(0.5)

    def watch_time(self, kind: str, key: str, timeout: float = 5) -> float | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while f"{kind} {key}" not in self.watched:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.watched.pop(f"{kind} {key}")

    def close(self) -> None:
        self._stop.set()
        self.reg.close()


def status(host: Host) -> dict[str, Any]:
    try:
        return json.loads((host.state_dir / "status.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def wait_ready(lab: Lab, host: Host, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if status(host).get("ready"):
            return time.monotonic() - t0
        if host.agent is not None and host.agent.poll() is not None:
            raise RuntimeError(f"agent exited:\n{lab.log(host)[-3000:]}")
        time.sleep(0.01)
    raise RuntimeError(f"agent not ready in {timeout} s:\n{lab.log(host)[-3000:]}")


def agent_pid(pid: int) -> int:
    """The python process under ``ip netns exec`` (which execs: normally the same pid)."""
    for _ in range(50):
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if comm.startswith("python"):
            return pid
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not kids:
            break
        pid = int(kids[0])
    return pid


def proc_cpu_rss(pid: int) -> tuple[float, float, float]:
    """(user+system CPU seconds, VmRSS MB, VmHWM MB) of a process."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (int(stat[11]) + int(stat[12])) / tick
    fields = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":" in ln)
    return cpu, int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


# --------------------------------------------------------------------------- figure 2: one agent


class BenchLab(Lab):
    """The tests' Lab; with ``profile`` set, the agent runs under ``py-spy record`` (its
    figures are then not the agent's own: for finding where the start-up goes only)."""

    profile: str | None = None

    def agent_cmd(self, host: Host, *extra: str) -> list[str]:
        cmd = super().agent_cmd(host, *extra)
        if self.profile:
            fmt = "raw" if self.profile.endswith(".txt") else "flamegraph"  # raw: folded stacks
            return [shutil.which("py-spy") or "py-spy", "record", "-r", "250", "-s", "-f", fmt,
                    "-o", self.profile, "--", *cmd]
        return cmd


def cold_reference(endpoint: str, n: int, tmp: Path, repeat: int = 3) -> dict[str, float]:
    """What the C tools take for the cold start's work, median of ``repeat``: list the N
    leases (``etcdctl get --prefix``, output read through a pipe as the agent reads its
    listing) and write their 3·N entries with ``ip -batch`` + ``bridge -batch`` into a fresh
    namespace with the same vxlan device."""
    ip_f, br_f = ref_batches(leases_for(n), tmp)
    lists, batches = [], []
    env = dict(os.environ, ETCDCTL_API="3")
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = subprocess.run(["etcdctl", "--endpoints", endpoint, "get", "--prefix",
                              f"{PREFIX}/subnets/"], stdout=subprocess.PIPE, env=env,
                             check=True, timeout=120).stdout
        lists.append(time.perf_counter() - t0)
        assert got.count(b"/subnets/") == n, "etcdctl listed every lease"
        c = ProgramNs(f"na{RUN_ID}cr")
        try:
            ref_device(c)
            t0 = time.perf_counter()
            sh("ip", "-n", c.name, "-batch", str(ip_f), timeout=300)
            sh("bridge", "-n", c.name, "-batch", str(br_f), timeout=300)
            batches.append(time.perf_counter() - t0)
            assert count_entries(c.name) == (n, n, n)
        finally:
            c.close()
    return {"ref_list_s": statistics.median(lists), "ref_batch_s": statistics.median(batches)}


def all_routes_at(evs: list[tuple[float, str, str]], n: int) -> float | None:
    """Monotonic time the n-th distinct peer route appeared (None: fewer were seen)."""
    seen: set[str] = set()
    for t, kind, dst in evs:
        if kind == "route+" and dst not in seen:
            seen.add(dst)
            if len(seen) == n:
                return t
    return None


def fire_events(etcd: Etcd, mon: KernelMonitor, n: int, events: int, first: int
                ) -> dict[str, Any]:
    """``events`` leases added and removed one at a time (peers ``first``...): put → route
    seen by the netlink listener, against put → etcd watch delivery."""
    add: list[float] = []
    rem: list[float] = []
    w_add: list[float] = []
    w_rem: list[float] = []
    rtt: list[float] = []
    for j in range(events):
        i = first + j
        key, dst = peer_key(i), str(peer_subnet(i))
        for kind, lat, wlat in (("put", add, w_add), ("delete", rem, w_rem)):
            mark = mon.mark()
            if kind == "put":
                t, acked = etcd.put(key, peer_value(i))
            else:
                t, acked = etcd.delete(key)
            seen = mon.wait("route+" if kind == "put" else "route-", dst, mark, 10)
            w = etcd.watch_time(kind, key)
            rtt.append((acked - t) * 1e3)
            if seen is not None:
                lat.append((seen - t) * 1e3)
            if w is not None:
                wlat.append((w - t) * 1e3)
            time.sleep(0.05)
    both = add + rem
    return dict(
        event_add_p50_ms=pct(add, 50), event_add_p99_ms=pct(add, 99),
        event_del_p50_ms=pct(rem, 50), event_del_p99_ms=pct(rem, 99),
        event_p50_ms=pct(both, 50), event_p90_ms=pct(both, 90),
        events_over_10ms=sum(1 for x in both if x > 10),
        events=len(both), put_rtt_p50_ms=pct(rtt, 50),
        watch_p50_ms=pct(w_add + w_rem, 50), watch_p99_ms=pct(w_add + w_rem, 99),
        events_missed=2 * events - len(add) - len(rem), event_max_ms=max(both, default=0.0),
    )


def bench_agent(n: int, events: int, idle: float, tmp: Path,
                profile: str | None = None, repair_events: int = 0,
                repair_interval: float = 1.0) -> dict[str, Any]:
    lab = BenchLab(tmp / f"agent{n}", tag=f"s{n % 100}")
    lab.profile = profile
    mon: KernelMonitor | None = None
    etcd: Etcd | None = None
    try:
        lab.start_etcd()
        assert lab.etcd is not None
        host = lab.add_host()
        enter_netns(lab.ul)
        etcd = Etcd(lab.etcd.endpoint)
        etcd.put_many([(f"{PREFIX}/config", CONFIG)]
                      + [(peer_key(i), peer_value(i)) for i in range(n)])
        mon = KernelMonitor(host.name)
        out: dict[str, Any] = cold_reference(lab.etcd.endpoint, n, tmp)
        out["ref_s"] = out["ref_list_s"] + out["ref_batch_s"]
        # from scratch: exec → the N-th route in the kernel
        mark = mon.mark()
        t0 = time.monotonic()
        lab.start_agent(host)
        out["start_ready_s"] = wait_ready(lab, host, 120 + n / 100)
        time.sleep(0.2)  # the monitor's last events
        evs = mon.since(mark)
        out["start_writes"] = len(evs)
        done = all_routes_at(evs, n)
        out["cold_start_s"] = (done - t0) if done is not None else None
        out["cold_ratio"] = out["cold_start_s"] / out["ref_s"] if done is not None else None
        out["start_monitor_overruns"] = mon.overruns
        assert count_entries(host.name) == (n, n, n), count_entries(host.name)
        assert host.agent is not None
        pid = host.agent.pid
        if profile:  # the agent ran under py-spy: the rest would measure py-spy too
            time.sleep(2)
            lab.stop_agent(host, signal.SIGINT)  # py-spy writes its output on SIGINT
            return out
        pid = agent_pid(pid)
        cpu_start, _, _ = proc_cpu_rss(pid)
        out["start_cpu_s"] = cpu_start
        out["start_cpu_us_per_peer"] = 1e6 * cpu_start / n
        # idle: CPU and RSS while nothing changes (covers ≥ 2 drift repairs at 10 s)
        time.sleep(2)
        cpu0, _, _ = proc_cpu_rss(pid)
        w0 = time.monotonic()
        time.sleep(idle)
        cpu1, rss, hwm = proc_cpu_rss(pid)
        out["idle_cpu_pct"] = 100 * (cpu1 - cpu0) / (time.monotonic() - w0)
        out["rss_mb"], out["rss_peak_mb"] = rss, hwm
        # one peer added / removed while n are programmed
        etcd.start_watch()
        out.update(fire_events(etcd, mon, n, events, n + 100))
        # the agent's own share: put→kernel minus put→watch delivery, at the median
        out["agent_share_p50_ms"] = out["event_p50_ms"] - out["watch_p50_ms"]
        # restart with n programmed
        lab.stop_agent(host)
        (host.state_dir / "status.json").unlink(missing_ok=True)  # it still says "ready"
        time.sleep(0.5)
        mark = mon.mark()
        lab.start_agent(host)
        out["restart_ready_s"] = wait_ready(lab, host, 120)
        time.sleep(1.0)
        out["restart_writes"] = len(mon.since(mark))
        out["monitor_overruns"] = mon.overruns
        lab.stop_agent(host)
        if repair_events:
            # events while drift repairs run: the agent compares everything against the
            # kernel every `repair_interval` s (a full compare at 20,000 peers takes ~0.5 s),
            # so many of these events arrive while one is under way
            lab.start_agent(host, "--repair-interval", f"{repair_interval:g}")
            wait_ready(lab, host, 120)
            time.sleep(2 * repair_interval)
            rep = fire_events(etcd, mon, n, repair_events, n + 100 + events)
            st = status(host)
            out.update({f"repair_{k}": v for k, v in rep.items()})
            out["repair_interval_s"] = repair_interval
            out["repair_reconciles"] = st.get("reconciles")
            lab.stop_agent(host)
        return out
    finally:
        if mon is not None:
            mon.close()
        if etcd is not None:
            etcd.close()
        leave_netns()
        lab.close()


# --------------------------------------------------------------------------- figure 3: cluster


def bench_cluster(hosts: int, events: int, tmp: Path) -> dict[str, Any]:
    lab = Lab(tmp / "cluster", tag="c")
    mons: list[KernelMonitor] = []
    etcd: Etcd | None = None
    try:
        lab.start_etcd()
        assert lab.etcd is not None
        for _ in range(hosts):
            lab.add_host()
        enter_netns(lab.ul)
        etcd = Etcd(lab.etcd.endpoint)
        etcd.put_many([(f"{PREFIX}/config", CONFIG)])
        for h in lab.hosts:
            lab.start_agent(h)
        for h in lab.hosts:
            wait_ready(lab, h, 120)
        mons = [KernelMonitor(h.name) for h in lab.hosts]
        etcd.start_watch()
        lat, watch = [], []
        for j in range(events):
            i = 20_000 + j  # inside the /9 (32,752 peer subnets), clear of the agents' own
            key, dst = peer_key(i), str(peer_subnet(i))
            marks = [m.mark() for m in mons]
            t, _ = etcd.put(key, peer_value(i))
            deadline = time.monotonic() + 10
            seen = [m.wait("route+", dst, k, max(0.0, deadline - time.monotonic()))
                    for m, k in zip(mons, marks, strict=True)]
            w = etcd.watch_time("put", key)
            if all(s is not None for s in seen):
                lat.append((max(s for s in seen if s is not None) - t) * 1e3)
            if w is not None:
                watch.append((w - t) * 1e3)
            etcd.delete(key)
            time.sleep(0.1)
        return {"hosts": hosts, "events": events, "missed": events - len(lat),
                "all_hosts_p50_ms": pct(lat, 50), "all_hosts_p99_ms": pct(lat, 99),
                "watch_p50_ms": pct(watch, 50), "watch_p99_ms": pct(watch, 99)}
    finally:
        for m in mons:
            m.close()
        if etcd is not None:
            etcd.close()
        leave_netns()
        lab.close()


# --------------------------------------------------------------------------- main


def leases_for(n: int) -> dict[IPv4Network, Lease]:
    return {peer_subnet(i): decode_lease(subnet_key(peer_subnet(i)), peer_value(i).encode())
            for i in range(n)}


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), "?")
    return (f"{os.cpu_count()} vCPU {cpu}, kernel {os.uname().release}, Python "
            f"{sys.version.split()[0]}, load {os.getloadavg()[0]:.1f}")


def precompile() -> None:
    """Byte-compile the checkout's packages, as ``pip install`` does for an installed agent.

    The agents run from this checkout; with ``PYTHONDONTWRITEBYTECODE`` set (as in CI shells)
    Python would compile every netagent module on every start (~60 ms of a cold start that no
    installed agent pays). compileall skips symlinked folders: backends/ and cni/ by name."""
    for pkg in ("netagent", "backends", "cni"):
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / pkg)], check=True,
                       stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONDONTWRITEBYTECODE=""))


def run_child(args: argparse.Namespace, figure: str, n: int, tmp: Path) -> dict[str, Any]:
    """Each lab figure runs in a child process: it enters a namespace, which we must not."""
    out = tmp / f"{figure}-{n}.json"
    cmd = [sys.executable, __file__, "--child", figure, "--n", str(n), "--out", str(out),
           "--events", str(args.events), "--idle", str(args.idle), "--tmp", str(tmp),
           "--repair-events", str(args.repair_events),
           "--repair-interval", str(args.repair_interval)]
    if args.profile:
        cmd += ["--profile", args.profile]
    proc = subprocess.run(cmd, timeout=1800)
    if proc.returncode != 0:
        return {"error": f"child exited {proc.returncode}"}
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def summary(results: dict[str, Any]) -> str:
    """The figures as a markdown table (what bench/README.md shows)."""
    sizes = sorted({int(n) for part in ("program", "agent") for n in results.get(part, {})})
    head = "| figure | " + " | ".join(f"N={n}" for n in sizes) + " | goal |"
    rows = [head, "|" + "---|" * (len(sizes) + 2)] if sizes else []

    def row(name: str, part: str, fmt: Callable[[dict[str, Any]], str], goal: str) -> None:
        if not sizes:
            return
        cells = []
        for n in sizes:
            r = results.get(part, {}).get(n) or results.get(part, {}).get(str(n))
            try:
                cells.append(fmt(r) if r and "error" not in r else "–")
            except KeyError:  # a partial figure (--profile)
                cells.append("–")
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {goal} |")

    row("program from scratch: ours / ip+bridge -batch", "program",
        lambda r: f"{r['ours_s']*1e3:.0f} / {r['ref_s']*1e3:.0f} ms = **{r['ratio']:.2f}×**",
        "≤ 1.5×")
    row("one-call-per-entry pyroute2 path", "program",
        lambda r: f"{r['simple_ratio']:.1f}×" if "simple_ratio" in r else "–", "(≈ 10×)")
    row("+1 peer, backend sync only (in process)", "program",
        lambda r: f"{r['incremental_ms']:.2f} ms", "—")
    row("full compare, nothing changed (per repair)", "program",
        lambda r: f"{r['full_compare_noop_ms']:.0f} ms", "—")
    row("agent: put → route, add p50 / p99", "agent",
        lambda r: f"{r['event_add_p50_ms']:.1f} / {r['event_add_p99_ms']:.0f} ms", "≤ 10 ms")
    row("agent: put → route gone, delete p50 / p99", "agent",
        lambda r: f"{r['event_del_p50_ms']:.1f} / {r['event_del_p99_ms']:.0f} ms", "≤ 10 ms")
    row("events over 10 ms", "agent", lambda r: f"{r['events_over_10ms']}/{r['events']}", "—")
    row("reference: put → etcd watch delivery p50 / p99", "agent",
        lambda r: f"{r['watch_p50_ms']:.1f} / {r['watch_p99_ms']:.0f} ms", "—")
    row("cold start: exec → N routes / (etcdctl get + ip/bridge -batch)", "agent",
        lambda r: (f"{r['cold_start_s']:.2f} / ({r['ref_list_s']:.2f} + {r['ref_batch_s']:.2f})"
                   f" s = **{r['cold_ratio']:.2f}×**") if r.get("cold_ratio") else "–",
        "≤ 1.5×")
    row("agent CPU for the cold start, per peer", "agent",
        lambda r: f"{r['start_cpu_us_per_peer']:.0f} µs" if "start_cpu_s" in r else "–", "—")
    row("agent start from scratch → ready", "agent", lambda r: f"{r['start_ready_s']:.2f} s",
        "—")
    row("restart with N programmed → ready", "agent",
        lambda r: f"{r['restart_ready_s']:.2f} s", "≤ 3 s")
    row("kernel writes during restart", "agent", lambda r: str(r["restart_writes"]), "0")
    row("RSS", "agent", lambda r: f"{r['rss_mb']:.0f} MB", "≤ 80 MB (≤ 120 MB at 20,000)")
    # memory per peer: RSS / N, and what each peer added over the next smaller N of this run
    # (RSS / N is mostly the interpreter and its libraries at small N)
    rss_at: dict[int, float] = {}
    for n in sizes:
        r = results.get("agent", {}).get(n) or results.get("agent", {}).get(str(n)) or {}
        if "rss_mb" in r:
            rss_at[n] = r["rss_mb"]
    if rss_at:
        cells = []
        for n in sizes:
            if n not in rss_at:
                cells.append("–")
                continue
            cell = f"{rss_at[n] * 1024 / n:.1f} KB"
            below = [k for k in rss_at if k < n]
            if below:
                m = max(below)
                cell += f" ({(rss_at[n] - rss_at[m]) * 1024 / (n - m):.1f} KB over N={m})"
            cells.append(cell)
        rows.append("| RSS per peer (per added peer over the smaller N) | " + " | ".join(cells)
                    + " | — |")
    row("CPU while nothing changes", "agent", lambda r: f"{r['idle_cpu_pct']:.2f} %",
        "≤ 0.3 % at 5,000")
    c = results.get("cluster")
    if c and "error" not in c:
        rows.append(f"\n{c['hosts']} hosts, {c['events']} leases written: put → route on every "
                    f"other host p50 {c['all_hosts_p50_ms']:.1f} ms, **p99 "
                    f"{c['all_hosts_p99_ms']:.1f} ms** (goal ≤ 100 ms); etcd watch delivery p50 "
                    f"{c['watch_p50_ms']:.1f} ms, p99 {c['watch_p99_ms']:.1f} ms; missed "
                    f"{c['missed']}")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", default="500,2000,5000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--events", type=int, default=30)
    ap.add_argument("--idle", type=float, default=25.0)
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--simple", action="store_true", help="also time the one-call-per-entry path")
    ap.add_argument("--only", choices=("program", "agent", "cluster"), action="append")
    ap.add_argument("--json")
    ap.add_argument("--profile", help="agent figure: run the agent under py-spy, write this "
                    "flame graph (the figures are then py-spy's, not the agent's)")
    ap.add_argument("--repair-events", type=int, default=0,
                    help="agent figure: also this many events with the agent restarted with "
                         "--repair-interval (events during drift repairs)")
    ap.add_argument("--repair-interval", type=float, default=1.0,
                    help="the agent's --repair-interval for --repair-events (seconds)")
    ap.add_argument("--no-precompile", action="store_true",
                    help="do not byte-compile the checkout first (each agent start then compiles "
                    "netagent's modules when PYTHONDONTWRITEBYTECODE is set: ~60 ms)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("etcd") is None:
        print("needs root and etcd", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.child:
        tmp = Path(args.tmp)
        if args.child == "agent":
            res = bench_agent(args.n, args.events, args.idle, tmp, args.profile,
                              args.repair_events, args.repair_interval)
        else:
            res = bench_cluster(args.n, args.events, tmp)
        Path(args.out).write_text(json.dumps(res))
        return 0
    only = set(args.only or ("program", "agent", "cluster"))
    if not args.no_precompile:
        precompile()
    sizes = [int(x) for x in args.peers.split(",")]
    results: dict[str, Any] = {"machine": machine(), "run": RUN_ID, "program": {}, "agent": {}}
    tmp = Path(tempfile.mkdtemp(prefix=f"na-scale-{RUN_ID}-"))
    try:
        for n in sizes:
            if "program" in only:
                r = bench_program(n, leases_for(n), args.repeat, args.simple, tmp)
                results["program"][n] = r
                print(f"program N={n}: ours {r['ours_s']*1e3:.0f} ms, ip+bridge -batch "
                      f"{r['ref_s']*1e3:.0f} ms, ratio {r['ratio']:.2f}× (goal ≤ 1.5×)"
                      + (f"; simple path {r['simple_s']*1e3:.0f} ms = {r['simple_ratio']:.1f}×"
                         if "simple_s" in r else "")
                      + f"; +1 peer {r['incremental_ms']:.2f} ms; no-op full compare "
                      f"{r['full_compare_noop_ms']:.0f} ms", flush=True)
            if "agent" in only:
                r = run_child(args, "agent", n, tmp)
                results["agent"][n] = r
                print(f"agent N={n}: " + ", ".join(
                    f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                    flush=True)
        if "cluster" in only and args.hosts > 0:
            r = run_child(args, "cluster", args.hosts, tmp)
            results["cluster"] = r
            print(f"cluster {args.hosts} hosts: {json.dumps(r)}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=1))
    print(summary(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
