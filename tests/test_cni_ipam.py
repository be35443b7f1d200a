"""Built-in IPAM store (no root): allocation rules, idempotence, GC and cross-process locking."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from cni.errors import ADDRESS_UNAVAILABLE, POOL_EXHAUSTED, CniError
from cni.fast import ip_to_int
from cni.ipam import Store

SUBNET, PLEN, GW = ip_to_int("10.9.8.0"), 24, ip_to_int("10.9.8.1")


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
