"""Built-in IPAM (no root): the allocator's rules against an in-memory store (no disk), then
the disk store: host-local's files, idempotence, GC and cross-process locking."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from netagent.cni.errors import ADDRESS_UNAVAILABLE, POOL_EXHAUSTED, CniError
from netagent.cni.fast import ip6_to_int, ip_to_int
from netagent.cni.ipam import Allocator, Pool, Reservation
from netagent.cni.ipamdisk import Store

SUBNET, PLEN, GW = ip_to_int("10.9.8.0"), 24, ip_to_int("10.9.8.1")


# --------------------------------------------------------------------------- allocator, no disk


class MemoryStore(Allocator):
    """The allocator's five store primitives on dicts (host-local's fake store), with a way to
    make ``create`` lose a race for chosen addresses, as another plugin process could."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[str, str]] = {}
        self.last: dict[int, str] = {}
        self.taken_elsewhere: set[str] = set()
        self.creates: list[str] = []

    def reservations(self) -> list[Reservation]:
        return [Reservation(ip, cid, ifn) for ip, (cid, ifn) in self.held.items()]

    def create(self, ip: str, container_id: str, ifname: str) -> bool:
        self.creates.append(ip)
        if ip in self.held or ip in self.taken_elsewhere:
            return False
        self.held[ip] = (container_id, ifname)
        return True

    def release_ip(self, ip: str) -> None:
        self.held.pop(ip, None)

    def last_reserved(self, range_id: int) -> str:
        return self.last.get(range_id, "")

    def set_last_reserved(self, range_id: int, ip: str) -> None:
        self.last[range_id] = ip


def test_walk_is_round_robin_from_the_last_reserved_and_skips_the_gateway() -> None:
    pool = Pool(4, ip_to_int("10.9.8.0"), 29, ip_to_int("10.9.8.1"))  # .1-.6 in range
    assert pool.bounds() == (ip_to_int("10.9.8.1"), ip_to_int("10.9.8.6"))  # no broadcast
    assert list(pool.walk(-1)) == [ip_to_int(f"10.9.8.{i}") for i in (2, 3, 4, 5, 6)]
    # after .4: .5, .6, then wrap to the start, each address exactly once
    assert list(pool.walk(ip_to_int("10.9.8.4"))) == [
        ip_to_int(f"10.9.8.{i}") for i in (5, 6, 2, 3, 4)]
    # a last address outside the range (an old subnet) starts at the first
    assert next(pool.walk(ip_to_int("10.1.1.1"))) == ip_to_int("10.9.8.2")
    v6 = Pool(6, ip6_to_int("fd00::"), 126, ip6_to_int("fd00::1"))
    assert list(v6.walk(-1)) == [ip6_to_int("fd00::2"), ip6_to_int("fd00::3")]  # keeps ::3


def test_allocator_rules_without_a_disk() -> None:
    s = MemoryStore()
    assert s.reserve("a", "eth0", SUBNET, PLEN, GW) == ("10.9.8.2", True)
    assert s.reserve("a", "eth0", SUBNET, PLEN, GW) == ("10.9.8.2", False)
    assert s.last == {0: "10.9.8.2"}
    # an address the listing did not show but create() finds held (a race) is skipped
    s.taken_elsewhere.add("10.9.8.3")
    assert s.reserve("b", "eth0", SUBNET, PLEN, GW) == ("10.9.8.4", True)
    assert s.creates[-2:] == ["10.9.8.3", "10.9.8.4"]
    # an unreadable last-reserved record starts from the range's first address
    s.last[0] = "garbage"
    assert s.reserve("c", "eth0", SUBNET, PLEN, GW) == ("10.9.8.5", True)
    assert s.creates[-2:] == ["10.9.8.3", "10.9.8.5"]
    # the other family's last address does not move this one's start either
    s.last[0] = "fd00:5:42::9"
    assert s.reserve("d", "eth0", SUBNET, PLEN, GW) == ("10.9.8.6", True)
    with pytest.raises(CniError) as e:
        s.reserve("a", "eth0", SUBNET, PLEN, GW, "10.9.8.50")
    assert e.value.code == ADDRESS_UNAVAILABLE and "already holds 10.9.8.2" in e.value.msg
    assert sorted(r.ip for r in s.gc({("a", "eth0")})) == ["10.9.8.4", "10.9.8.5", "10.9.8.6"]
    assert list(s.held) == ["10.9.8.2"]


def test_allocator_all_or_nothing_across_families_without_a_disk() -> None:
    s = MemoryStore()
    full6 = Pool(6, ip6_to_int("fd00::"), 126, ip6_to_int("fd00::1"), "", 1)
    s.taken_elsewhere |= {"fd00::2", "fd00::3"}
    with pytest.raises(CniError) as e:
        s.reserve_all("a", "eth0", [Pool(4, SUBNET, PLEN, GW), full6])
    assert e.value.code == POOL_EXHAUSTED and "fd00::/126" in e.value.msg
    assert s.held == {} and "10.9.8.2" in s.creates  # taken, then given back


def _reserve(data_dir: str, cid: str) -> str:
    with Store(data_dir) as s:
        return s.reserve(cid, "eth0", SUBNET, PLEN, GW)[0]


def test_first_address_skips_network_and_gateway(tmp_path: Path) -> None:
    with Store(str(tmp_path)) as s:
        assert s.reserve("a", "eth0", SUBNET, PLEN, GW) == ("10.9.8.2", True)
        assert s.reserve("b", "eth0", SUBNET, PLEN, GW) == ("10.9.8.3", True)
    assert (tmp_path / "10.9.8.2").read_bytes() == b"a\r\neth0"  # host-local's format


def test_same_attachment_gets_its_reservation_back(tmp_path: Path) -> None:
    with Store(str(tmp_path)) as s:
        ip, _ = s.reserve("a", "eth0", SUBNET, PLEN, GW)
        assert s.reserve("a", "eth0", SUBNET, PLEN, GW) == (ip, False)
        assert s.reserve("a", "eth1", SUBNET, PLEN, GW)[0] != ip
        assert len(s.reservations()) == 2


def test_requested_address(tmp_path: Path) -> None:
    with Store(str(tmp_path)) as s:
        assert s.reserve("a", "eth0", SUBNET, PLEN, GW, "10.9.8.77") == ("10.9.8.77", True)
        for bad in ("10.9.8.77", "10.9.8.1", "10.9.8.255", "10.9.9.5"):
            with pytest.raises(CniError) as e:
                s.reserve("b", "eth0", SUBNET, PLEN, GW, bad)
            assert e.value.code == ADDRESS_UNAVAILABLE


def test_round_robin_after_release_and_exhaustion(tmp_path: Path) -> None:
    small, gw = ip_to_int("10.9.8.0"), ip_to_int("10.9.8.1")  # /29: .2-.6 usable
    with Store(str(tmp_path)) as s:
        got = [s.reserve(f"c{i}", "eth0", small, 29, gw)[0] for i in range(5)]
        assert got == [f"10.9.8.{i}" for i in range(2, 7)]
        with pytest.raises(CniError) as e:
            s.reserve("x", "eth0", small, 29, gw)
        assert e.value.code == POOL_EXHAUSTED
        s.release("c0", "eth0")
        s.release("c0", "eth0")  # idempotent
        assert s.reserve("y", "eth0", small, 29, gw)[0] == "10.9.8.2"


def test_gc_keeps_valid_attachments(tmp_path: Path) -> None:
    with Store(str(tmp_path)) as s:
        for cid in ("a", "b", "c"):
            s.reserve(cid, "eth0", SUBNET, PLEN, GW)
        gone = s.gc({("a", "eth0"), ("c", "eth0")})
        assert [r.container_id for r in gone] == ["b"]
        assert sorted(r.container_id for r in s.reservations()) == ["a", "c"]


def test_concurrent_processes_get_distinct_addresses(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(8) as pool:
        ips = pool.starmap(_reserve, [(str(tmp_path), f"c{i}") for i in range(60)], chunksize=1)
    assert len(set(ips)) == 60


# --------------------------------------------------------------------------- dual stack

NET6, GW6 = ip6_to_int("fd00:5:42::"), ip6_to_int("fd00:5:42::1")


def _dual(requested4: str = "", requested6: str = "") -> list[Pool]:
    return [Pool(4, SUBNET, PLEN, GW, requested4, 0), Pool(6, NET6, 64, GW6, requested6, 1)]


def test_dual_stack_one_address_per_family_in_host_local_layout(tmp_path: Path) -> None:
    with Store(str(tmp_path)) as s:
        assert s.reserve_all("a", "eth0", _dual()) == [("10.9.8.2", True),
                                                        ("fd00:5:42::2", True)]
        # a repeated ADD gets the same pair back and creates nothing
        assert s.reserve_all("a", "eth0", _dual()) == [("10.9.8.2", False),
                                                        ("fd00:5:42::2", False)]
        assert s.reserve_all("b", "eth0", _dual())[1] == ("fd00:5:42::3", True)
        assert sorted((r.ip, r.version) for r in s.owned("a", "eth0")) == [
            ("10.9.8.2", 4), ("fd00:5:42::2", 6)]
        found = s.find("a", "eth0", 6)
        assert found is not None and found.ip == "fd00:5:42::2"
    # host-local's files: canonical IPv6 name, "<cid>\r\n<ifname>", one last_reserved per set
    assert (tmp_path / "fd00:5:42::2").read_bytes() == b"a\r\neth0"
    assert (tmp_path / "last_reserved_ip.0").read_text() == "10.9.8.3"
    assert (tmp_path / "last_reserved_ip.1").read_text() == "fd00:5:42::3"


def test_dual_stack_failure_in_one_family_frees_the_other(tmp_path: Path) -> None:
    with Store(str(tmp_path)) as s:
        s.reserve_all("a", "eth0", _dual(requested6="fd00:5:42::99"))
        with pytest.raises(CniError) as e:
            s.reserve_all("b", "eth0", _dual(requested6="fd00:5:42:0:0:0:0:99"))
        assert e.value.code == ADDRESS_UNAVAILABLE  # same address, other spelling
        assert sorted(r.container_id for r in s.reservations()) == ["a", "a"]
        # but an IPv4 address the attachment already held is never freed by a failed repeat
        with pytest.raises(CniError):
            s.reserve_all("a", "eth0", _dual(requested6="fd00:5:42::98"))
        assert len(s.owned("a", "eth0")) == 2


def test_ipv6_range_keeps_its_last_address_and_skips_gateway(tmp_path: Path) -> None:
    with Store(str(tmp_path)) as s:  # /126: ::0 network, ::1 gateway, ::2 and ::3 usable
        got = [s.reserve(f"c{i}", "eth0", NET6, 126, GW6, version=6)[0] for i in range(2)]
        assert got == ["fd00:5:42::2", "fd00:5:42::3"]
        with pytest.raises(CniError) as e:
            s.reserve("x", "eth0", NET6, 126, GW6, version=6)
        assert e.value.code == POOL_EXHAUSTED
        for bad in ("fd00:5:42::1", "fd00:5:43::2", "10.9.8.7"):
            with pytest.raises(CniError) as e:
                s.reserve("y", "eth0", NET6, 64, GW6, bad, version=6)
            assert e.value.code == ADDRESS_UNAVAILABLE, bad


def test_release_and_gc_cover_both_families(tmp_path: Path) -> None:
    (tmp_path / "not-an-address").write_text("x")
    with Store(str(tmp_path)) as s:
        for cid in ("a", "b", "c"):
            s.reserve_all(cid, "eth0", _dual())
        assert sorted(r.ip for r in s.release("a", "eth0")) == ["10.9.8.2", "fd00:5:42::2"]
        gone = s.gc({("c", "eth0")})
        assert sorted(r.ip for r in gone) == ["10.9.8.3", "fd00:5:42::3"]
        assert sorted(r.container_id for r in s.reservations()) == ["c", "c"]
    assert (tmp_path / "not-an-address").exists()


def _reserve_dual(data_dir: str, cid: str) -> tuple[str, str]:
    with Store(data_dir) as s:
        (ip4, _), (ip6, _) = s.reserve_all(cid, "eth0", _dual())
        return ip4, ip6


def test_concurrent_dual_stack_reservations_are_distinct(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(8) as pool:
        pairs = pool.starmap(_reserve_dual, [(str(tmp_path), f"c{i}") for i in range(40)],
                             chunksize=1)
    assert len({p[0] for p in pairs}) == 40 and len({p[1] for p in pairs}) == 40
