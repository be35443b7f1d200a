"""Privileged: the batched netlink path programs exactly what the simple path programs.

Two twin namespaces (run-unique names), each with the same underlay veth and the same vxlan
device. The same op lists go to ``Pyroute2Kernel`` (tests/support: one pyroute2 request per
entry, the reference) in one twin and to the batched raw-rtnetlink ``NetlinkKernel`` in the other; the
kernels are then compared through iproute2's JSON output, which neither path uses, and the
per-op results (which op failed, with which errno) must match too. Batches are also cut small
on purpose so that failures land in the middle and at the end of a batch.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from support.harness import RUN_ID, add_netns, del_netns, need_root, sh
from support.pyroute2kernel import Pyroute2Kernel

from netagent.kernel import (
    RTPROT_NETAGENT,
    Fdb,
    KernelError,
    Neigh,
    NetlinkKernel,
    Op,
    Route,
)

pytestmark = pytest.mark.privileged

DEV = "flannel.1"
MAC = "0e:aa:00:00:00:01"


class Twin:
    """One namespace with an underlay veth (``ua``) and a vxlan device built by iproute2."""

    def __init__(self, name: str) -> None:
        self.name = name
        add_netns(name)
        self.ip("ip", "link", "add", "ua", "type", "veth", "peer", "name", "ub")
        self.ip("ip", "addr", "add", "192.168.77.1/24", "dev", "ua")
        self.ip("ip", "link", "set", "ua", "up")
        self.ip("ip", "link", "set", "ub", "up")
        self.ip("ip", "link", "add", DEV, "address", MAC, "type", "vxlan", "id", "1", "dev",
                "ua", "local", "192.168.77.1", "dstport", "8472", "nolearning")
        self.ip("ip", "link", "set", DEV, "up")
        self.ua = self.index("ua")
        self.dev = self.index(DEV)

    def ip(self, *args: str, check: bool = True) -> Any:
        return sh(*args, ns=self.name, check=check)

    def json(self, *args: str) -> Any:
        out = sh(*args, ns=self.name).stdout
        return json.loads(out) if out.strip() else []

    def index(self, name: str) -> int:
        return int(self.json("ip", "-j", "link", "show", name)[0]["ifindex"])

    def state(self) -> dict[str, Any]:
        """Everything either path could have written, as iproute2 shows it."""
        routes = sorted(json.dumps(r, sort_keys=True)
                        for r in self.json("ip", "-j", "-d", "route", "show", "table", "main"))
        neighs = sorted(json.dumps(n, sort_keys=True)
                        for n in self.json("ip", "-j", "neigh", "show", "nud", "permanent"))
        fdb = sorted(json.dumps(f, sort_keys=True)
                     for f in self.json("bridge", "-j", "fdb", "show", "dev", DEV))
        return {"routes": routes, "neigh": neighs, "fdb": fdb}

    def close(self) -> None:
        del_netns(self.name)


@pytest.fixture
def twins() -> Iterator[tuple[Twin, Twin]]:
    need_root()
    made: list[Twin] = []
    try:
        made.append(Twin(f"na{RUN_ID}bs"))
        made.append(Twin(f"na{RUN_ID}bb"))
        assert (made[0].ua, made[0].dev) == (made[1].ua, made[1].dev)
        yield made[0], made[1]
    finally:
        for t in made:
            t.close()


def peer_ops(dev: int, ua: int, count: int, start: int = 2) -> list[Op]:
    """Neighbour, FDB and route per vxlan peer, plus a few host-gw-style and metric routes."""
    ops: list[Op] = []
    for i in range(start, start + count):
        subnet = IPv4Network(f"10.{5 + i // 256}.{i % 256}.0/24")
        gw = subnet.network_address
        m = f"0e:00:00:00:{i // 256:02x}:{i % 256:02x}"
        ops += [Op("replace", Neigh(dev, gw, m)),
                Op("replace", Fdb(dev, m, IPv4Address(f"172.20.{i // 256}.{i % 256}"))),
                Op("create" if i % 2 else "replace", Route(subnet, gw, dev, onlink=True))]
    ops += [
        Op("replace", Route(IPv4Network("10.99.1.0/24"), IPv4Address("192.168.77.5"), ua)),
        Op("create", Route(IPv4Network("10.99.2.0/24"), IPv4Address("192.168.77.6"), ua,
                           metric=7)),
        Op("replace", Route(IPv4Network("10.99.3.0/25"), IPv4Address("192.168.77.7"), ua,
                            onlink=True, metric=100)),
    ]
    return ops


def results(res: list[Exception | None]) -> list[int | None]:
    return [None if r is None else getattr(r, "errno", -1) for r in res]


def apply_both(a: Twin, b: Twin, ops: list[Op], max_batch: int | None = None
               ) -> tuple[list[int | None], list[int | None]]:
    simple, batched = Pyroute2Kernel(a.name), NetlinkKernel(b.name)
    try:
        if max_batch is not None:
            batched.rt.max_batch = max_batch
        ra = results(simple.write(ops))
        rb = results(batched.write(ops))
        return ra, rb
    finally:
        simple.close()
        batched.close()


def test_same_entries_from_scratch_and_after_changes(twins: tuple[Twin, Twin]) -> None:
    a, b = twins
    ops = peer_ops(a.dev, a.ua, 300)
    ra, rb = apply_both(a, b, ops)
    assert ra == rb == [None] * len(ops)
    assert a.state() == b.state()
    assert len(a.state()["neigh"]) == 300 and len(a.state()["fdb"]) >= 300

    # changes: new MACs and remotes for some peers (replace in place), others deleted,
    # a route moved to another gateway and metric kept
    change: list[Op] = []
    for i in range(2, 60):
        subnet = IPv4Network(f"10.{5 + i // 256}.{i % 256}.0/24")
        gw = subnet.network_address
        m = f"0e:00:00:00:{i // 256:02x}:{i % 256:02x}"
        old_remote = IPv4Address(f"172.20.{i // 256}.{i % 256}")
        if i % 3 == 0:
            change += [Op("delete", Route(subnet, gw, a.dev, onlink=True)),
                       Op("delete", Fdb(a.dev, m, old_remote)),
                       Op("delete", Neigh(a.dev, gw, m))]
        else:
            m2 = f"0e:bb:00:00:{i // 256:02x}:{i % 256:02x}"
            change += [Op("replace", Neigh(a.dev, gw, m2)),
                       Op("replace", Fdb(a.dev, m2, IPv4Address("172.21.0.9"))),
                       Op("delete", Fdb(a.dev, m, old_remote))]
    change.append(Op("replace", Route(IPv4Network("10.99.1.0/24"), IPv4Address("192.168.77.9"),
                                      a.ua)))
    ra, rb = apply_both(a, b, change)
    assert ra == rb == [None] * len(change)
    assert a.state() == b.state()


def test_same_failures_in_the_same_places(twins: tuple[Twin, Twin]) -> None:
    a, b = twins
    base = peer_ops(a.dev, a.ua, 20)
    assert apply_both(a, b, base) == ([None] * len(base),) * 2
    foreign = IPv4Network("10.200.0.0/24")
    for t in (a, b):
        t.ip("ip", "route", "add", str(foreign), "via", "192.168.77.50", "proto", "static")
    gone = IPv4Network("10.201.0.0/24")
    ops = [
        Op("create", Route(foreign, IPv4Address("192.168.77.51"), a.ua)),  # EEXIST
        Op("replace", Neigh(a.dev, IPv4Address("10.202.0.0"), "0e:00:00:00:99:01")),
        Op("delete", Route(gone, IPv4Address("192.168.77.52"), a.ua)),  # ESRCH: not there
        Op("delete", Route(foreign, IPv4Address("192.168.77.50"), a.ua)),  # ESRCH: not ours
        Op("replace", Neigh(9999, IPv4Address("10.203.0.0"), "0e:00:00:00:99:02")),  # ENODEV
        Op("replace", Route(IPv4Network("10.204.0.0/24"), IPv4Address("10.204.0.0"), 9999,
                            onlink=True)),  # ENODEV
        Op("delete", Neigh(a.dev, IPv4Address("10.205.0.0"), "0e:00:00:00:99:03")),  # ENOENT
        Op("replace", Fdb(a.dev, "0e:00:00:00:99:04", IPv4Address("172.22.0.4"))),
        Op("replace", Route(IPv4Network("10.206.0.0/24"), IPv4Address("192.168.99.9"),
                            a.ua)),  # gateway not reachable: ENETUNREACH
        Op("replace", Route(IPv4Network("10.207.0.0/24"), IPv4Address("192.168.77.53"),
                            a.ua)),  # the last op of the batch succeeds
    ]
    # batches of 3: failures at the start, middle and end of a batch
    ra, rb = apply_both(a, b, ops, max_batch=3)
    assert ra == rb
    assert ra[0] == errno.EEXIST and ra[2] == errno.ESRCH and ra[3] == errno.ESRCH
    assert ra[4] == errno.ENODEV and ra[6] == errno.ENOENT and ra[9] is None
    assert [i for i, r in enumerate(ra) if r is None] == [1, 7, 9]
    assert a.state() == b.state()
    # and as one batch whose last op fails
    ops2 = [Op("replace", Route(IPv4Network("10.208.0.0/24"), IPv4Address("192.168.77.54"),
                                a.ua)), ops[0]]
    ra, rb = apply_both(a, b, ops2)
    assert ra == rb == [None, errno.EEXIST]
    assert a.state() == b.state()


def test_many_batches(twins: tuple[Twin, Twin]) -> None:
    """More ops than one send holds: every op gets its own result, in order."""
    a, b = twins
    ops = peer_ops(a.dev, a.ua, 900)
    ra, rb = apply_both(a, b, ops, max_batch=128)
    assert ra == rb == [None] * len(ops)
    assert a.state() == b.state()
    # the same again: every "create" now fails with EEXIST, every "replace" succeeds
    ra, rb = apply_both(a, b, ops, max_batch=128)
    assert ra == rb
    assert {r for op, r in zip(ops, ra, strict=True) if op.action == "create"} == {errno.EEXIST}
    assert {r for op, r in zip(ops, ra, strict=True) if op.action == "replace"} == {None}


def test_dumps_match_pyroute2(twins: tuple[Twin, Twin]) -> None:
    """The raw dumps return what the pyroute2 dumps return, foreign entries included."""
    a, _ = twins
    simple, batched = Pyroute2Kernel(a.name), NetlinkKernel(a.name)
    try:
        assert batched.write(peer_ops(a.dev, a.ua, 50)) == [None] * 153
        a.ip("ip", "route", "add", "10.210.0.0/24", "via", "192.168.77.60", "proto", "static",
             "metric", "5")
        a.ip("ip", "route", "add", "blackhole", "10.211.0.0/24")
        a.ip("ip", "route", "add", "10.212.0.0/24", "via", "192.168.77.61", "table", "100")
        a.ip("ip", "neigh", "add", "192.168.77.70", "lladdr", "0e:00:00:00:77:70", "dev", "ua",
             "nud", "permanent")
        a.ip("ip", "neigh", "add", "10.213.0.0", "lladdr", "0e:00:00:00:77:71", "dev", DEV,
             "nud", "reachable")  # not permanent: never ours
        for table in (254, 100):
            assert sorted(map(repr, batched.dump_routes(table))) == sorted(
                map(repr, simple.dump_routes(table)))
        assert sorted(map(repr, batched.dump_neighs(a.dev))) == sorted(
            map(repr, simple.dump_neighs(a.dev)))
        assert sorted(map(repr, batched.dump_fdb(a.dev))) == sorted(
            map(repr, simple.dump_fdb(a.dev)))
        assert len(batched.dump_neighs(a.dev)) == 50
        assert any(r.proto == RTPROT_NETAGENT for r in batched.dump_routes(254))
        assert not any(str(n.dst) == "192.168.77.70" for n in batched.dump_neighs(a.dev))
    finally:
        simple.close()
        batched.close()


def test_netns_socket_leaves_this_thread_where_it_was(twins: tuple[Twin, Twin]) -> None:
    """Opening the raw socket in a namespace must not move the caller (setns is undone)."""
    import os

    a, _ = twins
    before = os.readlink("/proc/thread-self/ns/net")
    k = NetlinkKernel(a.name)
    try:
        k.dump_routes(254)
        assert os.readlink("/proc/thread-self/ns/net") == before
    finally:
        k.close()
    with pytest.raises(KernelError):
        NetlinkKernel(f"na{RUN_ID}absent").dump_routes(254)


def test_backend_sync_same_kernel_state_either_path(twins: tuple[Twin, Twin],
                                                    tmp_path: Any) -> None:
    """The whole vxlan backend (DirectRouting on) through either path: same kernel, same report."""
    from netagent.backends.base import HostFacts
    from netagent.backends.vxlan import VxlanBackend
    from netagent.config import parse_network_config
    from netagent.lease import Lease, LeaseAttrs, canonical_json

    cfg = parse_network_config(
        '{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan","DirectRouting":true}}')

    def lease(i: int, public: str, m: int | None = None) -> Lease:
        data = canonical_json({"VNI": 1, "VtepMAC": f"0e:00:00:01:{(m or i) // 256:02x}:"
                                                    f"{(m or i) % 256:02x}"})
        return Lease(IPv4Network(f"10.{5 + i // 256}.{i % 256}.0/24"),
                     LeaseAttrs(public_ip=IPv4Address(public), backend_type="vxlan",
                                backend_data=data))

    # most peers behind a router (vxlan entries), some on our segment (direct routes)
    peers = {}
    for i in range(2, 400):
        public = f"192.168.77.{100 + i % 50}" if i % 7 == 0 else f"172.31.{i // 256}.{i % 256}"
        lz = lease(i, public)
        peers[lz.subnet] = lz
    reports = []
    backends = []
    for t, batched in ((a := twins[0], False), (twins[1], True)):
        t.ip("ip", "route", "add", "172.31.0.0/16", "via", "192.168.77.254")
        addr = IPv4Address("192.168.77.1")
        facts = HostFacts("ua", t.ua, 1500, addr, addr, tmp_path / t.name)
        kernel = NetlinkKernel(t.name) if batched else Pyroute2Kernel(t.name)
        b = VxlanBackend(cfg, facts, kernel=kernel,
                         csum_workaround=False)
        b.prepare()
        b.activate(Lease(IPv4Network("10.5.1.0/24"), LeaseAttrs(public_ip=addr)))
        rep = b.sync(peers)
        reports.append((rep.added, rep.removed, rep.failed, rep.entries))
        backends.append(b)
    assert reports[0] == reports[1] and reports[0][2] == 0
    assert a.state() == twins[1].state()

    # a second round through each: MACs change, peers go, one moves onto our segment
    changed = dict(peers)
    for i in range(2, 60):
        s = IPv4Network(f"10.{5 + i // 256}.{i % 256}.0/24")
        if i % 4 == 0:
            del changed[s]
        elif i % 4 == 1:
            changed[s] = lease(i, str(changed[s].attrs.public_ip), m=1000 + i)
        elif i % 4 == 2:
            changed[s] = lease(i, "192.168.77.30")
    reports = []
    for b in backends:
        rep = b.sync(changed, frozenset(changed) ^ frozenset(peers) | {
            s for s in changed if changed[s] != peers.get(s)})
        reports.append((rep.added, rep.removed, rep.failed, rep.entries))
    assert reports[0] == reports[1] and reports[0][2] == 0
    assert a.state() == twins[1].state()
    # and a full compare on each finds nothing left to do
    assert [b.sync(changed).changes for b in backends] == [0, 0]


def test_links_addresses_lookups_same_either_path(twins: tuple[Twin, Twin]) -> None:
    """Device and address calls and route lookups, raw vs pyroute2: same kernel, same answers."""
    from ipaddress import IPv4Interface

    from netagent.kernel import VxlanSpec

    a, b = twins
    simple, raw = Pyroute2Kernel(a.name), NetlinkKernel(b.name)
    try:
        reader = NetlinkKernel(a.name)  # reads compared in one namespace (veth MACs differ)
        try:
            for name in ("ua", DEV, "lo"):
                assert simple.link(name) == reader.link(name)
            assert simple.link("nosuchdev") is None and reader.link("nosuchdev") is None
        finally:
            reader.close()
        for k, t in ((simple, a), (raw, b)):
            spec = VxlanSpec(name="flannel.7", vni=7, port=4789, local=IPv4Address("192.168.77.1"),
                             underlay_index=t.ua, mtu=1400, learning=True, gbp=True)
            k.create_vxlan(spec, "0e:77:00:00:00:07")
            idx = t.index("flannel.7")
            k.set_link(idx, mtu=1380, up=True, mac="0e:77:00:00:00:08")
            k.add_addr(idx, IPv4Interface("10.7.0.0/32"))
            k.add_addr(idx, IPv4Interface("10.7.9.1/24"))
            k.del_addr(idx, IPv4Interface("10.7.9.1/24"))
            t.ip("ip", "route", "add", "172.31.0.0/16", "via", "192.168.77.254")
        la, lb = simple.link("flannel.7"), raw.link("flannel.7")
        assert la is not None and la == lb
        assert (la.vni, la.port, la.learning, la.gbp, la.mtu, la.up, la.mac) == (
            7, 4789, True, True, 1380, True, "0e:77:00:00:00:08")
        assert la.addrs == (IPv4Interface("10.7.0.0/32"),)

        def shown(t: Twin) -> Any:
            doc = t.json("ip", "-d", "-j", "addr", "show", "flannel.7")[0]
            for volatile in ("operstate", "linkinfo"):
                doc.pop(volatile, None)
            info = t.json("ip", "-d", "-j", "link", "show", "flannel.7")[0]["linkinfo"]
            return doc, info

        assert shown(a) == shown(b)
        with pytest.raises(KernelError) as ea:
            simple.create_vxlan(VxlanSpec("flannel.7", 7, 4789, IPv4Address("192.168.77.1"),
                                          a.ua, 1400), "0e:77:00:00:00:07")
        with pytest.raises(KernelError) as eb:
            raw.create_vxlan(VxlanSpec("flannel.7", 7, 4789, IPv4Address("192.168.77.1"),
                                       b.ua, 1400), "0e:77:00:00:00:07")
        assert ea.value.errno == eb.value.errno == errno.EEXIST

        dsts = [IPv4Address(x) for x in ("192.168.77.5", "172.31.4.4", "203.0.113.9",
                                         "192.168.77.1", "127.0.0.1")]
        want = {ip: simple.lookup_route(ip) for ip in dsts}
        assert raw.lookup_routes(dsts) == want
        assert want[IPv4Address("172.31.4.4")] is not None
        assert want[IPv4Address("172.31.4.4")].gateway == IPv4Address("192.168.77.254")
        assert want[IPv4Address("203.0.113.9")] is None  # no default route in a twin
        raw.rt.max_batch = 2  # lookups spread over several sends keep their order
        assert raw.lookup_routes(dsts) == want

        for k, t in ((simple, a), (raw, b)):
            k.set_link(t.index("flannel.7"), up=False)
            k.delete_link(t.index("flannel.7"))
        assert simple.link("flannel.7") is None and raw.link("flannel.7") is None
    finally:
        simple.close()
        raw.close()


def test_remembered_dumps_still_see_every_change(twins: tuple[Twin, Twin]) -> None:
    """Dumps skip parsing answers they saw last time; hand changes must still show, and an
    entry equal to the wanted one comes back as that very object."""
    a, _ = twins
    simple, batched = Pyroute2Kernel(a.name), NetlinkKernel(a.name)
    try:
        ops = peer_ops(a.dev, a.ua, 40)
        assert batched.write(ops) == [None] * len(ops)
        want: dict[str, dict[Any, Any]] = {"neigh": {}, "fdb": {}, "route": {}}
        for op in ops:
            want[op.entry.kind][op.entry.key] = op.entry

        def same() -> None:
            for _ in range(2):  # the second dump answers from memory
                assert sorted(map(repr, batched.dump_neighs(a.dev, want["neigh"]))) == sorted(
                    map(repr, simple.dump_neighs(a.dev)))
                assert sorted(map(repr, batched.dump_fdb(a.dev, want["fdb"]))) == sorted(
                    map(repr, simple.dump_fdb(a.dev)))
                assert sorted(map(repr, batched.dump_routes(254, want["route"]))) == sorted(
                    map(repr, simple.dump_routes(254)))

        same()
        got = {r.key: r for r in batched.dump_routes(254, want["route"])}
        assert all(got[k] is r for k, r in want["route"].items())
        assert all(n is want["neigh"][n.key] for n in batched.dump_neighs(a.dev, want["neigh"]))
        # hand changes of every kind
        a.ip("ip", "neigh", "replace", "10.5.3.0", "lladdr", "0e:cc:00:00:00:03", "dev", DEV,
             "nud", "permanent")
        a.ip("ip", "neigh", "del", "10.5.4.0", "dev", DEV)
        a.ip("ip", "neigh", "replace", "10.5.5.0", "lladdr", "0e:00:00:00:00:05", "dev", DEV,
             "nud", "reachable")  # no longer permanent: no longer ours
        a.ip("bridge", "fdb", "replace", "0e:00:00:00:00:06", "dev", DEV, "dst", "172.29.0.6",
             "self", "permanent")
        a.ip("bridge", "fdb", "del", "0e:00:00:00:00:07", "dev", DEV, "dst", "172.20.0.7")
        a.ip("ip", "route", "replace", "10.5.8.0/24", "via", "10.5.8.0", "dev", DEV, "onlink",
             "proto", str(RTPROT_NETAGENT), "metric", "0")
        a.ip("ip", "route", "change", "10.5.9.0/24", "via", "192.168.77.9", "dev", "ua",
             "proto", str(RTPROT_NETAGENT))
        a.ip("ip", "route", "del", "10.5.10.0/24")
        same()
        got = {r.key: r for r in batched.dump_routes(254, want["route"])}
        changed = want["route"][(254, IPv4Network("10.5.9.0/24"), 0)]
        assert got[changed.key] != changed and (254, IPv4Network("10.5.10.0/24"), 0) not in got
    finally:
        simple.close()
        batched.close()


def test_dumps_keep_no_interned_addresses(twins: tuple[Twin, Twin]) -> None:
    """The address objects a dump interned are let go after it (issue 18: a copy of every
    peer subnet and gateway at 20,000 peers); a remembered dump still answers with the very
    objects wanted."""
    a, _ = twins
    k = NetlinkKernel(a.name)
    try:
        ops = peer_ops(a.dev, a.ua, 20)
        assert k.write(ops) == [None] * len(ops)
        want = {op.entry.key: op.entry for op in ops if op.entry.kind == "route"}
        assert len(k.dump_neighs(a.dev)) == 20 and len(k.dump_fdb(a.dev)) == 20
        assert k._interned.addrs == {} and k._interned.nets == {}
        for _ in range(2):  # parsed, then from memory
            got = {r.key: r for r in k.dump_routes(254, want)}
            assert all(got[key] is r for key, r in want.items())
            assert k._interned.nets == {}
    finally:
        k.close()


def test_ipv6_entries_same_either_path(twins: tuple[Twin, Twin]) -> None:
    """Dual stack: IPv6 neighbours and FDB entries on an IPv6-underlay vxlan device and IPv6
    routes, raw vs pyroute2: same kernel, same per-op results, same dumps and lookups."""
    from ipaddress import IPv6Address, IPv6Interface, IPv6Network

    from netagent.kernel import IPV6_DEFAULT_METRIC, VxlanSpec

    a, b = twins
    simple, raw = Pyroute2Kernel(a.name), NetlinkKernel(b.name)
    try:
        for k, t in ((simple, a), (raw, b)):
            t.ip("ip", "-6", "addr", "add", "fd77::1/64", "dev", "ua", "nodad")
            k.create_vxlan(VxlanSpec("flannel-v6.1", 1, 8472, IPv6Address("fd77::1"), t.ua, 1430),
                           "0e:66:00:00:00:01")
            k.add_addr(t.index("flannel-v6.1"), IPv6Interface("fd42::/128"))
            k.set_link(t.index("flannel-v6.1"), up=True)
        dev6 = a.index("flannel-v6.1")
        assert dev6 == b.index("flannel-v6.1")
        la, lb = simple.link("flannel-v6.1"), raw.link("flannel-v6.1")
        assert la is not None and lb is not None
        assert (la.local, la.addrs, la.mtu) == (IPv6Address("fd77::1"),
                                                (IPv6Interface("fd42::/128"),), 1430)
        assert (lb.local, lb.addrs, lb.mtu) == (la.local, la.addrs, la.mtu)
        ops: list[Op] = []
        for i in range(2, 40):
            subnet = IPv6Network(f"fd42:0:0:{i:x}::/64")
            gw = subnet.network_address
            m = f"0e:66:00:00:01:{i:02x}"
            ops += [Op("replace", Neigh(dev6, gw, m)),
                    Op("replace", Fdb(dev6, m, IPv6Address(f"fd77::{i:x}"))),
                    Op("create" if i % 2 else "replace", Route(subnet, gw, dev6, onlink=True))]
        ops += [Op("replace", Route(IPv6Network("fd42:0:0:99::/64"), IPv6Address("fd77::99"),
                                    a.ua)),
                Op("delete", Route(IPv6Network("fd42:0:0:98::/64"), IPv6Address("fd77::98"),
                                   a.ua)),  # ESRCH: not there
                Op("replace", Neigh(9999, IPv6Address("fd42::9"), "0e:66:00:00:00:09"))]  # ENODEV
        ra, rb = apply_both(a, b, ops)
        assert ra == rb and ra[-2] == errno.ESRCH and ra[-1] == errno.ENODEV
        assert ra[:-2] == [None] * (len(ops) - 2)

        def state6(t: Twin) -> Any:
            return (sorted(json.dumps(r, sort_keys=True)
                           for r in t.json("ip", "-6", "-j", "-d", "route", "show", "table", "main")),
                    sorted(json.dumps(n, sort_keys=True)
                           for n in t.json("ip", "-6", "-j", "neigh", "show", "nud", "permanent")),
                    sorted(json.dumps(f, sort_keys=True)
                           for f in t.json("bridge", "-j", "fdb", "show", "dev", "flannel-v6.1")))

        assert state6(a) == state6(b)
        reader = NetlinkKernel(a.name)
        try:
            for batched, ref in ((reader, simple),):
                assert sorted(map(repr, batched.dump_routes(254, None, 6))) == sorted(
                    map(repr, ref.dump_routes(254, None, 6)))
                assert sorted(map(repr, batched.dump_neighs(dev6, None, 6))) == sorted(
                    map(repr, ref.dump_neighs(dev6, None, 6)))
                assert sorted(map(repr, batched.dump_fdb(dev6))) == sorted(
                    map(repr, ref.dump_fdb(dev6)))
            routes = {r.key: r for r in reader.dump_routes(254, None, 6)}
            want = Route(IPv6Network("fd42:0:0:2::/64"), IPv6Address("fd42:0:0:2::"), dev6,
                         onlink=True)
            assert routes[want.key] == want and want.metric == IPV6_DEFAULT_METRIC
            assert len(reader.dump_neighs(dev6, None, 6)) == 38
            assert reader.dump_neighs(dev6) == []  # the IPv4 table of that device is empty
            dsts = [IPv6Address("fd77::5"), IPv6Address("2001:db8::1"), IPv4Address("192.168.77.5")]
            got = reader.lookup_routes(dsts)
            assert got == {ip: simple.lookup_route(ip) for ip in dsts}
            assert got[IPv6Address("fd77::5")] is not None and got[IPv6Address("2001:db8::1")] is None
        finally:
            reader.close()
    finally:
        simple.close()
        raw.close()


def test_sliced_dumps_interleave_with_writes_and_survive_a_dump_left_half_read(
        twins: tuple[Twin, Twin]) -> None:
    """The drift repair reads its dumps a slice at a time on a socket of its own while the
    agent's socket keeps writing; a dump abandoned half-way must not spoil the next one."""
    a, _ = twins
    kernel, ref = NetlinkKernel(a.name), Pyroute2Kernel(a.name)
    sliced = kernel.sliced_dumps()
    try:
        ops = peer_ops(a.dev, a.ua, 600)  # several receive buffers of routes
        assert kernel.write(ops) == [None] * len(ops)
        routes = iter(sliced.dump_routes(254))
        first = [next(routes) for _ in range(5)]
        # writes on the agent's socket between two slices of a dump
        more = peer_ops(a.dev, a.ua, 3, start=700)[:9]  # the peers' entries only
        assert kernel.write(more) == [None] * len(more)
        rest = list(routes)
        got = {r.key for r in first + rest}
        assert {op.entry.key for op in ops if op.entry.kind == "route"} <= got
        # a dump left half-read, then abandoned: the next dumps answer in full
        neighs = iter(sliced.dump_neighs(a.dev))
        next(neighs)
        sliced.abandon()
        assert sorted(map(repr, sliced.dump_neighs(a.dev))) == sorted(
            map(repr, ref.dump_neighs(a.dev)))
        assert sorted(map(repr, sliced.dump_routes(254))) == sorted(
            map(repr, ref.dump_routes(254)))
    finally:
        sliced.abandon()
        kernel.close()
        ref.close()
