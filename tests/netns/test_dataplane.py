"""Privileged: the backends with real netlink in a throwaway network namespace.

Each test gets its own namespace (run-unique name) with a veth pair standing in for the host's
underlay; all reading back goes through iproute2's JSON output, independent of our own dumps.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from support.harness import RUN_ID, add_netns, del_netns, need_root, sh

from netagent.backends.base import HostFacts
from netagent.backends.hostgw import HostGwBackend
from netagent.backends.vxlan import VxlanBackend
from netagent.config import parse_network_config
from netagent.kernel import RTPROT_NETAGENT, NetlinkKernel
from netagent.lease import Lease, LeaseAttrs, canonical_json

pytestmark = pytest.mark.privileged

UNDERLAY = "192.168.77"
N_PEERS = 40
MUTATORS = ("create_vxlan", "delete_link", "set_link", "add_addr", "del_addr", "write",
            "disable_tx_checksum")


class CountingKernel:
    """A NetlinkKernel that counts every call that could change the kernel."""

    def __init__(self, inner: NetlinkKernel) -> None:
        self.inner = inner
        self.changes: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in MUTATORS:
            return attr

        def counted(*args: Any, **kw: Any) -> Any:
            if name == "write":
                self.changes += [f"{op.action} {op.entry}" for op in args[0]]
            else:
                self.changes.append(name)
            return attr(*args, **kw)

        return counted


@dataclass
class Ns:
    name: str
    ua: str
    ua_index: int
    state: Path

    def ip(self, *args: str, check: bool = True) -> Any:
        return sh(*args, ns=self.name, check=check)

    def json(self, *args: str) -> Any:
        out = sh(*args, ns=self.name).stdout
        return json.loads(out) if out.strip() else []

    def facts(self) -> HostFacts:
        addr = IPv4Address(f"{UNDERLAY}.1")
        return HostFacts(self.ua, self.ua_index, 1500, addr, addr, self.state)

    def kernel(self) -> CountingKernel:
        return CountingKernel(NetlinkKernel(netns=self.name))

    def routes(self) -> dict[str, dict[str, Any]]:
        return {r["dst"]: r for r in self.json("ip", "-j", "route", "show", "table", "main")}

    def neighs(self, dev: str) -> dict[str, str]:
        return {n["dst"]: n["lladdr"] for n in self.json(
            "ip", "-j", "neigh", "show", "dev", dev, "nud", "permanent")}

    def fdb(self, dev: str) -> dict[str, str]:
        return {f["mac"]: f.get("dst", "") for f in self.json("bridge", "-j", "fdb", "show",
                                                               "dev", dev)
                if "permanent" in f.get("state", "") or f.get("dst")}

    def snapshot(self, dev: str) -> tuple[Any, ...]:
        return (self.routes(), self.neighs(dev), self.fdb(dev))


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[Ns]:
    need_root()
    name = f"na{RUN_ID}dp"
    ua, ub = f"u{RUN_ID}a", f"u{RUN_ID}b"
    add_netns(name)
    try:
        sh("ip", "link", "add", ua, "type", "veth", "peer", "name", ub, ns=name)
        sh("ip", "addr", "add", f"{UNDERLAY}.1/24", "dev", ua, ns=name)
        sh("ip", "link", "set", ua, "up", ns=name)
        sh("ip", "link", "set", ub, "up", ns=name)
        # peers "behind a router" live in 172.31/16
        sh("ip", "route", "add", "172.31.0.0/16", "via", f"{UNDERLAY}.254", ns=name)
        index = json.loads(sh("ip", "-j", "link", "show", ua, ns=name).stdout)[0]["ifindex"]
        yield Ns(name, ua, index, tmp_path / "state")
    finally:
        del_netns(name)


NET_CFG = '{"Network":"10.5.0.0/16","Backend":%s}'
OWN = Lease(IPv4Network("10.5.1.0/24"), LeaseAttrs(public_ip=IPv4Address(f"{UNDERLAY}.1")))


def sub(i: int) -> IPv4Network:
    return IPv4Network(f"10.5.{i}.0/24")


def vx(i: int, public: str | None = None) -> Lease:
    data = canonical_json({"VNI": 1, "VtepMAC": f"0e:00:00:00:{i // 256:02x}:{i % 256:02x}"})
    return Lease(sub(i), LeaseAttrs(public_ip=IPv4Address(public or f"{UNDERLAY}.{i}"),
                                    backend_type="vxlan", backend_data=data))


def hg(i: int, public: str | None = None) -> Lease:
    return Lease(sub(i), LeaseAttrs(public_ip=IPv4Address(public or f"{UNDERLAY}.{i}"),
                                    backend_type="host-gw"))


def vxlan_up(ns: Ns, kernel: CountingKernel, backend: str = '{"Type":"vxlan"}') -> VxlanBackend:
    b = VxlanBackend(parse_network_config(NET_CFG % backend), ns.facts(),
                     kernel=kernel, csum_workaround=False)  # type: ignore[arg-type]
    b.prepare()
    b.activate(OWN)
    return b


def test_vxlan_program_readback_repair_sweep_restart(ns: Ns) -> None:
    k1 = ns.kernel()
    b = vxlan_up(ns, k1)
    dev = "flannel.1"
    link = ns.json("ip", "-j", "-d", "link", "show", dev)[0]
    info = link["linkinfo"]["info_data"]
    assert (info["id"], info["port"], info["local"], info.get("learning", False)) == (
        1, 8472, f"{UNDERLAY}.1", False)
    assert link["mtu"] == 1450 and link["address"] == b.mac
    assert [a["local"] + "/" + str(a["prefixlen"]) for a in ns.json(
        "ip", "-j", "addr", "show", dev)[0]["addr_info"] if a["family"] == "inet"] == [
        "10.5.1.0/32"]

    peers = {sub(i): vx(i) for i in range(2, 2 + N_PEERS)}
    rep = b.sync(peers)
    assert rep.added == 3 * N_PEERS and rep.failed == 0
    routes, neighs, fdb = ns.snapshot(dev)
    for i in range(2, 2 + N_PEERS):
        r = routes[f"10.5.{i}.0/24"]
        assert (r["gateway"], r["dev"], r["protocol"], "onlink" in r["flags"]) == (
            f"10.5.{i}.0", dev, str(RTPROT_NETAGENT), True)
        m = f"0e:00:00:00:00:{i:02x}"
        assert neighs[f"10.5.{i}.0"] == m and fdb[m] == f"{UNDERLAY}.{i}"
    want = ns.snapshot(dev)

    k1.changes.clear()
    assert b.sync(peers).changes == 0 and k1.changes == []  # second sync: nothing to do

    # drift and leftovers: hand deletions, a stale peer of ours, routes someone else made
    ns.ip("ip", "route", "del", "10.5.3.0/24")
    ns.ip("ip", "neigh", "del", "10.5.4.0", "dev", dev)
    ns.ip("bridge", "fdb", "del", "0e:00:00:00:00:05", "dev", dev, "dst", f"{UNDERLAY}.5")
    ns.ip("ip", "neigh", "add", "10.5.200.0", "lladdr", "0e:00:00:00:00:c8", "dev", dev,
          "nud", "permanent")
    ns.ip("bridge", "fdb", "add", "0e:00:00:00:00:c8", "dev", dev, "dst", f"{UNDERLAY}.200",
          "self", "permanent")
    ns.ip("ip", "route", "add", "10.5.200.0/24", "via", "10.5.200.0", "dev", dev, "onlink",
          "proto", str(RTPROT_NETAGENT))
    ns.ip("ip", "route", "add", "10.5.201.0/24", "via", f"{UNDERLAY}.201", "proto", "static")
    ns.ip("ip", "route", "add", "10.5.202.0/24", "via", f"{UNDERLAY}.202")
    ns.ip("ip", "route", "add", "10.77.0.0/24", "via", f"{UNDERLAY}.203", "proto",
          str(RTPROT_NETAGENT))  # our proto, outside the Network: not a peer route

    # restart: a fresh backend on the same kernel reuses the device with no writes
    k2 = ns.kernel()
    b2 = vxlan_up(ns, k2)
    assert k2.changes == [] and b2.mac == b.mac and b2.ifindex == b.ifindex
    rep = b2.sync(peers)
    assert (rep.added, rep.removed, rep.failed) == (3, 3, 0)
    routes, neighs, fdb = ns.snapshot(dev)
    for foreign in ("10.5.201.0/24", "10.5.202.0/24", "10.77.0.0/24"):
        assert foreign in routes
        del routes[foreign]
    assert (routes, neighs, fdb) == want
    k2.changes.clear()
    assert b2.sync(peers).changes == 0 and k2.changes == []

    # a lease goes: its three entries go, nothing else
    del peers[sub(7)]
    rep = b2.sync(peers, frozenset({sub(7)}))
    assert rep.removed == 3
    routes, neighs, fdb = ns.snapshot(dev)
    assert "10.5.7.0/24" not in routes and "10.5.7.0" not in neighs
    assert "0e:00:00:00:00:07" not in fdb and len(neighs) == N_PEERS - 1


def test_vxlan_reboot_keeps_mac_and_incompatible_device_recreated(ns: Ns) -> None:
    b = vxlan_up(ns, ns.kernel())
    first = b.mac
    ns.ip("ip", "link", "del", "flannel.1")  # what a reboot does to the device
    b2 = vxlan_up(ns, ns.kernel())
    assert b2.mac == first
    b3 = vxlan_up(ns, ns.kernel(), '{"Type":"vxlan","Port":4789}')
    info = ns.json("ip", "-j", "-d", "link", "show", "flannel.1")[0]
    assert info["linkinfo"]["info_data"]["port"] == 4789 and info["address"] == first
    assert b3.ifindex != b2.ifindex


def test_vxlan_device_deleted_by_hand_comes_back_with_peers(ns: Ns) -> None:
    b = vxlan_up(ns, ns.kernel())
    peers = {sub(i): vx(i) for i in range(2, 6)}
    b.sync(peers)
    want = ns.snapshot("flannel.1")
    ns.ip("ip", "link", "del", "flannel.1")
    rep = b.sync(peers)
    assert rep.added == 12 and ns.snapshot("flannel.1") == want


def test_vxlan_direct_routing(ns: Ns) -> None:
    b = vxlan_up(ns, ns.kernel(), '{"Type":"vxlan","DirectRouting":true}')
    peers = {sub(2): vx(2), sub(3): vx(3), sub(4): vx(4, public="172.31.0.4")}
    b.sync(peers)
    routes, neighs, fdb = ns.snapshot("flannel.1")
    for i in (2, 3):
        r = routes[f"10.5.{i}.0/24"]
        assert (r["gateway"], r["dev"]) == (f"{UNDERLAY}.{i}", ns.ua)
    r = routes["10.5.4.0/24"]
    assert (r["gateway"], r["dev"]) == ("10.5.4.0", "flannel.1")
    assert neighs == {"10.5.4.0": "0e:00:00:00:00:04"}
    assert fdb == {"0e:00:00:00:00:04": "172.31.0.4"}
    assert b.sync(peers).changes == 0


def test_hostgw_routes_unreachable_and_repair(ns: Ns) -> None:
    k = ns.kernel()
    b = HostGwBackend(parse_network_config(NET_CFG % '{"Type":"host-gw"}'), ns.facts(),
                      kernel=k)  # type: ignore[arg-type]
    assert b.prepare().mtu == 1500
    b.activate(OWN)
    peers = {sub(i): hg(i) for i in range(2, 12)}
    peers[sub(20)] = hg(20, public="172.31.0.20")  # behind a router
    peers[sub(21)] = hg(21, public="10.250.0.21")  # no route at all
    rep = b.sync(peers)
    assert rep.added == 10
    assert "via gateway" in rep.skipped[sub(20)] and "no route" in rep.skipped[sub(21)]
    routes = ns.routes()
    for i in range(2, 12):
        r = routes[f"10.5.{i}.0/24"]
        assert (r["gateway"], r["dev"], r["protocol"]) == (
            f"{UNDERLAY}.{i}", ns.ua, str(RTPROT_NETAGENT))
    assert "10.5.20.0/24" not in routes and "10.5.21.0/24" not in routes
    k.changes.clear()
    assert b.sync(peers).changes == 0 and k.changes == []
    ns.ip("ip", "route", "del", "10.5.5.0/24")
    ns.ip("ip", "route", "add", "10.5.30.0/24", "via", f"{UNDERLAY}.30", "proto", "static")
    rep = b.sync(peers)
    assert rep.added == 1 and rep.removed == 0 and "10.5.5.0/24" in ns.routes()
    assert "10.5.30.0/24" in ns.routes()
    # someone else's route at a peer's destination, made after our last read-back, is not
    # overwritten by an incremental add (route "create", EEXIST) and is reported
    ns.ip("ip", "route", "add", "10.5.31.0/24", "via", f"{UNDERLAY}.200", "proto", "static")
    peers[sub(31)] = hg(31)
    rep = b.sync(peers, frozenset({sub(31)}))
    assert "not ours" in rep.skipped[sub(31)]
    r = ns.routes()["10.5.31.0/24"]
    assert (r["gateway"], r["protocol"]) == (f"{UNDERLAY}.200", "static")
    rep = b.sync(peers)  # and the next full sync still leaves it alone
    assert "not ours" in rep.skipped[sub(31)] and ns.routes()["10.5.31.0/24"] == r


def test_checksum_workaround_applied_through_ethtool(ns: Ns) -> None:
    b = VxlanBackend(parse_network_config(NET_CFG % '{"Type":"vxlan"}'), ns.facts(),
                     kernel=NetlinkKernel(netns=ns.name), csum_workaround=True)
    b.prepare()
    shown = ns.ip("ethtool", "-k", "flannel.1").stdout
    assert "tx-checksum-ip-generic: off" in shown
    # and in the agent's own namespace pyroute2's ethtool does it (no binary needed)
    code = (
        "from netagent.kernel import NetlinkKernel; k = NetlinkKernel(); "
        "import subprocess; subprocess.run(['ethtool','-K','flannel.1',"
        "'tx-checksum-ip-generic','on'], check=True, "
        "stdout=subprocess.DEVNULL); "
        "print(k.disable_tx_checksum('flannel.1'))"
    )
    import sys

    repo = str(Path(__file__).resolve().parents[2])
    out = sh("env", f"PYTHONPATH={repo}", sys.executable, "-c", code, ns=ns.name).stdout
    assert out.strip() == "pyroute2 ethtool"
    assert "tx-checksum-ip-generic: off" in ns.ip("ethtool", "-k", "flannel.1").stdout


def test_blackhole_route_drops_unused_pod_addresses_under_the_bridge_route(ns: Ns) -> None:
    """--ip-blackhole-route through real netlink: written as type blackhole proto 111, read
    back equal (no false repair), a vxlan peer sync leaves it alone, `ip route get` of an
    unused address of our subnet says blackhole instead of the default route, and while a
    bridge holds the subnet (cni0's kernel prefix route, metric 0) the bridge wins. flannel's
    first versions never installed it (flannel #2328): this checks it is there."""
    from netagent.blackhole import BlackholeRoutes, blackhole_route, our_blackholes

    ns.ip("ip", "route", "add", "default", "via", f"{UNDERLAY}.254")
    probe = "10.5.1.77"

    def dropped() -> bool:
        """The kernel answers a route lookup that hits a blackhole with EINVAL (and a local
        sender's sendto() gets the same): nothing goes out by the default route."""
        got = ns.ip("ip", "route", "get", probe, check=False)
        return got.returncode != 0 and "Invalid argument" in got.stderr

    assert f"via {UNDERLAY}.254" in ns.ip("ip", "route", "get", probe).stdout  # before: leaks
    assert not dropped()
    k = ns.kernel()
    bh = BlackholeRoutes(True, lambda: k)  # type: ignore[arg-type, return-value]
    bh.reconcile([OWN.subnet])
    [r] = [r for r in ns.json("ip", "-j", "route", "show", "table", "main", "type", "blackhole")]
    assert (r["dst"], r["protocol"], r["metric"]) == ("10.5.1.0/24", str(RTPROT_NETAGENT),
                                                      1_000_000)
    assert our_blackholes(k.inner) == [blackhole_route(OWN.subnet)], "read back equal"
    assert dropped()
    ping = sh("ping", "-c", "1", "-W", "1", probe, ns=ns.name, check=False)
    assert ping.returncode != 0 and "Invalid argument" in ping.stderr + ping.stdout
    b = vxlan_up(ns, k)  # the peer sweep must not take it for a stale peer route
    b.sync({sub(2): vx(2)})  # a full compare: read-back and sweep of our stale routes
    b.sync({sub(2): vx(2)})
    k.changes.clear()
    bh.reconcile([OWN.subnet])
    assert k.changes == [], "in place: the re-check writes nothing"
    assert our_blackholes(k.inner) == [blackhole_route(OWN.subnet)]
    # a cni0 holding the subnet: its on-link route (metric 0) wins, pods stay reachable
    br = f"b{RUN_ID}"[:15]
    ns.ip("ip", "link", "add", br, "type", "bridge")
    ns.ip("ip", "addr", "add", "10.5.1.1/24", "dev", br)
    ns.ip("ip", "link", "set", br, "up")
    assert f"dev {br}" in ns.ip("ip", "route", "get", probe).stdout
    ns.ip("ip", "link", "del", br)  # the last pod gone, the bridge deleted
    assert dropped()
    # IPv6 (dual stack): the kernel reports a v6 blackhole on "lo"; it must still read back
    # equal, or every re-check would rewrite it
    from ipaddress import IPv6Network
    own6 = IPv6Network("fd05:0:0:1::/64")
    bh.reconcile([OWN.subnet, own6])
    assert sorted(map(str, (r.dst for r in our_blackholes(k.inner)))) == [
        "10.5.1.0/24", "fd05:0:0:1::/64"]
    k.changes.clear()
    bh.reconcile([OWN.subnet, own6])
    assert k.changes == []
    assert "blackhole fd05:0:0:1::/64 dev lo proto 111 metric 1000000" in ns.ip(
        "ip", "-6", "route", "show", "type", "blackhole").stdout
        # a foreign blackhole is never ours; turning the flag off removes only ours
    ns.ip("ip", "route", "add", "blackhole", "10.9.0.0/24")
    BlackholeRoutes(False, lambda: k).reconcile([OWN.subnet])  # type: ignore[arg-type, return-value]
    assert [r["dst"] for r in ns.json("ip", "-j", "route", "show", "type", "blackhole")] == [
        "10.9.0.0/24"]
    assert "fd05" not in ns.ip("ip", "-6", "route", "show", "type", "blackhole").stdout
    b.shutdown()
