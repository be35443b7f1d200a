"""The daemon's start-up and live-config paths on the in-memory store and kernel, no root.

The real `Daemon` runs in a thread with its real watch and keepalive threads; only the outside
systems are fakes: etcd (tests/support/fakestore.py), the kernel (tests/support/fakekernel.py),
the host's interfaces (fixed HostFacts), iptables (off; the leftover sweep recorded) and the
prober (none, so no packet leaves). The e2e tests (tests/e2e/test_live_config.py,
test_agent_control.py, test_resilience.py) run the same paths with real agents, etcd and
netlink; these run in seconds and reach the cases a real etcd cannot stage on cue.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

# RouteLookup through the fake kernel's module: it follows wherever the kernel entries live
from support.fakekernel import FakeKernel, RouteLookup, pub
from support.fakestore import FakeClock, FakeStore
from support.harness import wait_for

from netagent.backends import backend_class
from netagent.backends.alloc import AllocBackend
from netagent.backends.base import Backend, BackendHealth, HostFacts
from netagent.config import NetworkConfig
from netagent.daemon import EXIT_OK, SAFETY_NET_INTERVAL, Daemon, KernelChanges
from netagent.files import read_env_file
from netagent.iptables import IptablesController
from netagent.kernel import KernelChange
from netagent.lease import decode_lease
from netagent.probe import Prober
from netagent.settings import AgentSettings, add_flags, load_settings
from netagent.store import KeyValue, RegistryError

PREFIX = "/coreos.com/network"
SUBNETS = f"{PREFIX}/subnets/"
CONFIG = f"{PREFIX}/config"
ME = pub(1)


def net(backend: str = "host-gw", network: str = "10.70.0.0/16", **extra: object) -> str:
    return json.dumps({"Network": network, "Backend": {"Type": backend}, **extra})


class FlakyAlloc(AllocBackend):
    """alloc with machinery of its own whose health a test flips (a BGP session dropping)."""

    healthy = True

    def health(self) -> BackendHealth:
        return BackendHealth(ok=FlakyAlloc.healthy, detail="" if FlakyAlloc.healthy else "down")


class UnitDaemon(Daemon):
    """The real daemon with the host's outside systems replaced (see the module docstring)."""

    def __init__(self, settings: AgentSettings, store: FakeStore, kernel: FakeKernel,
                 state: Path) -> None:
        super().__init__(settings, store)
        self.kernel = kernel
        self.state = state
        self.swept: list[int] = []
        self.rules = IptablesController(enabled=False, ip_masq=False, forward=False,
                                        random_fully=True, sweep=self._sweep)

    def _sweep(self, family: int) -> bool:
        self.swept.append(family)
        return False

    def host_facts(self, config: NetworkConfig | None = None) -> HostFacts:
        eth = self.kernel.links["eth0"]
        return HostFacts("eth0", eth.index, 1500, ME, ME, self.state)

    def make_backend(self, config: NetworkConfig, host: HostFacts) -> Backend:
        cls = backend_class(config.backend.type)
        if config.backend.type == "alloc":
            return FlakyAlloc(config, host)
        return cls(config, host, kernel=self.kernel)  # type: ignore[call-arg]

    def make_prober(self, config: NetworkConfig) -> Prober | None:
        return None

    def make_kernel(self) -> FakeKernel:  # type: ignore[override]
        return self.kernel

    def make_monitor(self) -> None:
        """No netlink socket: the host's real events are not the fake kernel's; the tests put
        `KernelChanges` on the queue themselves."""
        return None


class Agent:
    """One UnitDaemon running in a thread, with helpers to look at what it did."""

    def __init__(self, tmp: Path, store: FakeStore, kernel: FakeKernel, ttl: int = 60,
                 repair: float = 1.0, extra: tuple[str, ...] = ()) -> None:
        p = argparse.ArgumentParser()
        add_flags(p)
        args = p.parse_args(["--state-dir", str(tmp), "--subnet-file", str(tmp / "subnet.env"),
                             "--subnet-lease-ttl", str(ttl), "--repair-interval", str(repair),
                             "--iptables-forward-rules=false", *extra])
        self.settings = load_settings(args, {})
        self.store, self.kernel, self.tmp = store, kernel, tmp
        self.daemon = UnitDaemon(self.settings, store, kernel, tmp)
        self.rc: list[int] = []
        self.thread = threading.Thread(target=lambda: self.rc.append(self.daemon.run()),
                                       name="unit-daemon", daemon=True)

    def start(self) -> Agent:
        self.thread.start()
        return self

    def stop(self) -> int:
        self.daemon.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the daemon did not stop within 10 s"
        return self.rc[0]

    def status(self) -> dict[str, object]:
        path = self.tmp / "status.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def env(self) -> dict[str, str]:
        return read_env_file(self.tmp / "subnet.env")

    def ready(self) -> bool:
        return all(self.daemon.snapshot.readiness().values()) and bool(
            self.daemon.snapshot.readiness())

    def my_keys(self) -> dict[str, dict[str, object]]:
        items, _ = self.store.list_prefix(SUBNETS)
        return {kv.key[len(SUBNETS):]: json.loads(kv.value) for kv in items
                if json.loads(kv.value).get("PublicIP") == str(ME)}


@pytest.fixture
def store() -> FakeStore:
    return FakeStore(PREFIX, FakeClock())


@pytest.fixture
def kernel() -> FakeKernel:
    k = FakeKernel()
    eth = k.add_plain_link("eth0")
    for i in range(2, 6):  # peers pub(2).. are on our segment (host-gw can route to them)
        k.lookups[pub(i)] = RouteLookup(None, eth)
    return k


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for a in started:
        if a.thread.is_alive():
            a.stop()
    gc.unfreeze()  # Daemon.run freezes what it built; give this process its GC back


def peer(store: FakeStore, i: int, subnet: str, backend: str = "host-gw") -> None:
    store.put(SUBNETS + subnet.replace("/", "-"),
              json.dumps({"PublicIP": str(pub(i)), "BackendType": backend}))


def until(cond: Callable[[], object], what: str, timeout: float = 10) -> None:
    wait_for(cond, timeout, interval=0.05, what=what)


def peer_routes(kernel: FakeKernel) -> set[str]:
    return {str(r.dst) for r in kernel.routes.values() if r.proto == 111}


# --------------------------------------------------------------------------- start-up


@pytest.mark.parametrize(("bad", "words"), [
    (None, ""), ("{broken", "not valid JSON"),
    (net("ipsec"), "not implemented"), (net("ipip"), "not implemented"),
    (json.dumps({"Network": "10.70.0.0/16", "EnableIPv6": True, "IPv6Network": "fd70::/48",
                 "Backend": {"Type": "udp"}}), "udp carries IPv4 only"),
], ids=["missing", "invalid", "ipsec", "ipip", "udp-ipv6"])
def test_start_waits_and_reports_until_a_runnable_config_appears(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent],
        bad: str | None, words: str) -> None:
    """A config the agent cannot run (or none) at start: it waits, says why in status.json,
    is not ready, leases and writes nothing; the same config live is refused (see below).
    Before issue 17 an unimplemented type (wireguard, ipip) made the agent exit 1 at start.
    (ipsec and ipip: types the parser knows that no stream implements, so this test holds
    when wireguard and bgp join the backend table.)"""
    if bad is not None:
        store.put(CONFIG, bad)
    a = Agent(tmp_path, store, kernel).start()
    agents.append(a)
    until(lambda: a.status().get("phase") == "waiting for network config", "waiting")
    if words:
        until(lambda: words in str(a.status().get("config_error")), "config_error shown")
    assert a.thread.is_alive() and not a.ready()
    assert store.list_prefix(SUBNETS)[0] == [] and not (tmp_path / "subnet.env").exists()
    assert kernel.log == []
    store.put(CONFIG, net())
    until(a.ready, "ready on the runnable config")
    assert a.status()["config_error"] == ""
    assert a.env()["FLANNEL_NETWORK"] == "10.70.0.0/16"
    assert a.stop() == EXIT_OK


def test_start_leases_programs_peers_and_reports_in_one_snapshot(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent]) -> None:
    store.put(CONFIG, net())
    peer(store, 2, "10.70.2.0/24")
    a = Agent(tmp_path, store, kernel).start()
    agents.append(a)
    until(a.ready, "ready")
    assert peer_routes(kernel) == {"10.70.2.0/24"}
    [(key, value)] = a.my_keys().items()
    assert value["BackendType"] == "host-gw" and a.env()["FLANNEL_SUBNET"].startswith("10.70.")
    snap = a.daemon.snapshot
    assert snap.lease is not None and snap.lease.label == key.replace("-", "/")
    assert snap.peers == 1 and snap.backend == "host-gw" and snap.network == "10.70.0.0/16"
    assert a.daemon.swept == [4, 6], "iptables off: our old chains swept once per family"
    # a peer arriving later is programmed from the watch (on a subnet the agent did not pick)
    own = IPv4Network(a.env()["FLANNEL_SUBNET"], strict=False)
    later = next(s for s in ("10.70.3.0/24", "10.70.4.0/24") if IPv4Network(s) != own)
    peer(store, 3, later)
    until(lambda: peer_routes(kernel) == {"10.70.2.0/24", later}, "second peer")
    assert a.stop() == EXIT_OK


def test_start_lists_once_and_what_changes_after_the_listing_comes_by_the_watch(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """One listing serves the lease choice and the peer table (issue 18's cold start); the
    watch resumes right after its revision, so a peer that appears after the listing still
    gets its route, and our own stale key (deleted by the lease choice after the listing) is
    never programmed as a peer."""
    store.put(CONFIG, net())
    peer(store, 2, "10.70.2.0/24")
    # ours from an old run, on a TTL lease, below SubnetMin: stale, deleted by the lease choice
    store.create(SUBNETS + "10.70.0.0-24",
                 json.dumps({"PublicIP": str(ME), "BackendType": "host-gw"}), ttl=60)
    lists: list[str] = []
    real = store.list_prefix

    def list_prefix(prefix: str) -> tuple[list[KeyValue], int]:
        out = real(prefix)
        lists.append(prefix)
        if len(lists) == 1:
            peer(store, 3, "10.70.3.0/24")  # lands right after the listing
        return out

    monkeypatch.setattr(store, "list_prefix", list_prefix)
    a = Agent(tmp_path, store, kernel).start()
    agents.append(a)
    until(lambda: peer_routes(kernel) == {"10.70.2.0/24", "10.70.3.0/24"}, "both peers")
    until(a.ready, "ready")
    assert lists == [PREFIX + "/"], "one listing at start-up"
    assert len(a.my_keys()) == 1 and "10.70.0.0-24" not in a.my_keys()
    assert not any("10.70.0.0/24" in str(entry) for entry in kernel.log)
    assert not any("10.70.0.0/24" in r.getMessage() for r in caplog.records), \
        "our own stale key was never taken for a peer"
    assert a.stop() == EXIT_OK


def test_a_create_whose_answer_was_lost_is_found_by_a_fresh_listing_on_retry(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up listing serves the first lease attempt only: when etcd made our key but
    the answer was lost (an error after the write), the retry lists afresh, finds the key by
    our PublicIP and reuses it; planning again from the old listing would lease a second
    subnet and leave the first key orphaned until its TTL."""
    store.put(CONFIG, net())
    real = store.create
    lost: list[str] = []

    def create(key: str, value: str, ttl: int | None, lease_id: int = 0
               ) -> tuple[bool, int, KeyValue | None]:
        out = real(key, value, ttl, lease_id=lease_id)
        if not lost:
            lost.append(key)
            raise RegistryError(f"create {key}: connection reset after the write", "unavailable")
        return out

    monkeypatch.setattr(store, "create", create)
    a = Agent(tmp_path, store, kernel).start()
    agents.append(a)
    until(a.ready, "ready")
    assert lost and list(a.my_keys()) == [lost[0][len(SUBNETS):]], "one key: the lost create's"
    assert a.stop() == EXIT_OK


def test_restart_reuses_the_lease_and_writes_nothing(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent]) -> None:
    store.put(CONFIG, net())
    peer(store, 2, "10.70.2.0/24")
    a = Agent(tmp_path, store, kernel).start()
    until(a.ready, "first run ready")
    env = a.env()
    a.stop()
    store.reopen()
    writes, kernel_writes = store.writes(), kernel.writes()
    b = Agent(tmp_path, store, kernel).start()
    agents.append(b)
    until(b.ready, "second run ready")
    assert b.env() == env
    assert store.writes() == writes, "the lease key is reused without a write"
    assert kernel.writes() == kernel_writes, "a restart makes zero kernel writes"


def test_compacted_watch_relists_and_the_peer_table_catches_up(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent]) -> None:
    """Events compacted away before the watch delivered them: the watch re-lists (WatchResync)
    and the peer table diffs the listing against what it had: the added peer gets its route,
    the removed one loses it."""
    store.put(CONFIG, net())
    peer(store, 2, "10.70.2.0/24")
    a = Agent(tmp_path, store, kernel).start()
    agents.append(a)
    until(a.ready, "ready")
    assert peer_routes(kernel) == {"10.70.2.0/24"}
    with store.atomically():
        peer(store, 3, "10.70.3.0/24")
        store.delete(SUBNETS + "10.70.2.0-24")
        store.compact(store.revision)
    until(lambda: peer_routes(kernel) == {"10.70.3.0/24"}, "caught up from the listing")
    assert store.stats.errors.get("compacted") == 1


# --------------------------------------------------------------------------- live config


def test_live_unrunnable_config_is_refused_and_the_running_one_stays(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent]) -> None:
    store.put(CONFIG, net())
    peer(store, 2, "10.70.2.0/24")
    a = Agent(tmp_path, store, kernel).start()
    agents.append(a)
    until(a.ready, "ready")
    before = (kernel.state(), a.env(), a.my_keys())
    for bad, words in [(net("ipsec"), "not implemented"), ("{broken", "not valid JSON")]:
        store.put(CONFIG, bad)
        def refused(w: str = words) -> bool:
            return w in str(a.status().get("config_error"))

        until(refused, f"refused: {words}")
        assert a.thread.is_alive() and a.ready()
    assert (kernel.state(), a.env(), a.my_keys()) == before
    # and a good one afterwards is applied, clearing the error
    store.put(CONFIG, net(DirectRouting=True))
    until(lambda: a.status().get("config_error") == "", "error cleared")


def test_live_backend_switch_keeps_the_lease_and_rewrites_its_value(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent]) -> None:
    store.put(CONFIG, net("alloc"))
    peer(store, 2, "10.70.2.0/24")
    a = Agent(tmp_path, store, kernel).start()
    agents.append(a)
    until(a.ready, "ready on alloc")
    [(key, value)] = a.my_keys().items()
    assert value["BackendType"] == "alloc" and peer_routes(kernel) == set()
    store.put(CONFIG, net("host-gw"))
    until(lambda: peer_routes(kernel) == {"10.70.2.0/24"}, "host-gw routes programmed")
    until(lambda: list(a.my_keys().values())[0]["BackendType"] == "host-gw",
          "lease value rewritten")
    assert list(a.my_keys()) == [key], "same key: the subnet still fits"
    assert a.daemon.snapshot.backend == "host-gw"


def test_live_network_change_renumbers_and_releases_the_old_key(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent]) -> None:
    store.put(CONFIG, net())
    peer(store, 2, "10.70.2.0/24")
    a = Agent(tmp_path, store, kernel).start()
    agents.append(a)
    until(a.ready, "ready")
    assert peer_routes(kernel) == {"10.70.2.0/24"}
    store.put(CONFIG, net(network="10.71.0.0/16"))
    until(lambda: a.env()["FLANNEL_SUBNET"].startswith("10.71."), "renumbered subnet.env")
    keys = list(a.my_keys())
    assert len(keys) == 1 and keys[0].startswith("10.71."), "old key released after the new"
    assert peer_routes(kernel) == set(), "the old network's peer routes are gone"
    assert IPv4Network(a.env()["FLANNEL_NETWORK"]) == IPv4Network("10.71.0.0/16")


# --------------------------------------------------------------------------- lease loss


def test_own_key_deleted_is_recreated_for_the_same_subnet(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent]) -> None:
    store.put(CONFIG, net())
    a = Agent(tmp_path, store, kernel).start()
    agents.append(a)
    until(a.ready, "ready")
    [(key, _)] = a.my_keys().items()
    store.delete(SUBNETS + key)
    until(lambda: list(a.my_keys()) == [key], "key re-created")
    until(lambda: a.status().get("reacquired") == 1, "counted")
    assert a.env()["FLANNEL_SUBNET"].startswith(key.split("-")[0][:-1])


def test_expired_etcd_lease_is_recovered_for_the_same_subnet(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent]) -> None:
    """The keepalive finds the etcd lease gone (TTL 0) after an outage longer than the TTL:
    the key is re-created, same subnet, on a new etcd lease."""
    store.put(CONFIG, net())
    a = Agent(tmp_path, store, kernel, ttl=3).start()  # keepalive every second
    agents.append(a)
    until(a.ready, "ready")
    [(key, _)] = a.my_keys().items()
    old_id = store.get(SUBNETS + key).lease_id  # type: ignore[union-attr]
    store.fail("keepalive", "unavailable", times=2)
    store.clock.advance(10)
    assert store.expire() == [SUBNETS + key]
    until(lambda: list(a.my_keys()) == [key], "same key back", timeout=15)
    new = store.get(SUBNETS + key)
    assert new is not None and new.lease_id != old_id and new.lease_id in store.leases
    assert decode_lease(key, new.value).attrs.public_ip == ME
    until(a.ready, "ready again")


# --------------------------------------------------------------------------- snapshot


def test_backend_health_reaches_readiness_between_syncs(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent]) -> None:
    """health() can change with no sync (nothing in etcd changes): the loop republishes the
    snapshot every turn, so /readyz and status.json follow within about a second."""
    FlakyAlloc.healthy = True
    store.put(CONFIG, net("alloc"))
    a = Agent(tmp_path, store, kernel, repair=3600).start()  # no timer-driven sync
    agents.append(a)
    until(a.ready, "ready")
    reconciles = a.daemon.snapshot.reconciles
    try:
        FlakyAlloc.healthy = False
        until(lambda: a.daemon.snapshot.readiness().get("backend") is False, "not ready",
              timeout=3)
        until(lambda: a.status().get("backend_health") == {"ok": False, "detail": "down"},
              "status.json shows it", timeout=3)
        assert a.daemon.snapshot.reconciles == reconciles, "no sync was needed for it"
        FlakyAlloc.healthy = True
        until(a.ready, "ready again", timeout=3)
    finally:
        FlakyAlloc.healthy = True


# --------------------------------------------------------------------------- --ip-blackhole-route


def test_blackhole_route_for_own_subnet_survives_repair_and_goes_when_turned_off(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent]) -> None:
    """The real daemon installs it before subnet.env, the peer sweep and drift repair leave it
    alone, the --iptables-resync re-check puts it back, and a restart without the flag
    removes it (issue 19 item 6; flannel #2328 never installed it)."""
    from netagent.blackhole import blackhole_route

    store.put(CONFIG, net())
    peer(store, 2, "10.70.2.0/24")
    a = Agent(tmp_path, store, kernel, extra=("--ip-blackhole-route", "--iptables-resync", "1"))
    a.start()
    agents.append(a)
    until(a.ready, "ready")
    own = IPv4Network(a.env()["FLANNEL_SUBNET"], strict=False)
    bh = blackhole_route(own)
    assert kernel.routes.get(bh.key) == bh
    assert peer_routes(kernel) == {"10.70.2.0/24", str(own)}
    del kernel.routes[bh.key]  # `ip route del blackhole ...` by someone
    until(lambda: kernel.routes.get(bh.key) == bh, "put back by the resync", timeout=5)
    assert a.daemon.blackholes.repairs == 1
    assert a.stop() == EXIT_OK
    assert kernel.routes.get(bh.key) == bh, "a stop leaves kernel state in place"
    store.reopen()
    b = Agent(tmp_path, store, kernel).start()
    agents.append(b)
    until(b.ready, "restarted without the flag")
    until(lambda: bh.key not in kernel.routes, "removed with the flag off")
    assert peer_routes(kernel) == {"10.70.2.0/24"}
    assert b.stop() == EXIT_OK


def test_agent_refuses_to_start_while_another_holds_the_state_dir(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two agents on one state dir would fight over one kernel; `netagent cleanup` holds the
    same lock while it works. The second waits RUN_LOCK_WAIT (a restart overlapping the old
    agent's exit), then exits 1 naming the holder, having written nothing."""
    import os

    from netagent import daemon as daemon_mod
    from netagent.files import take_run_lock

    monkeypatch.setattr(daemon_mod, "RUN_LOCK_WAIT", 0.3)
    store.put(CONFIG, net())
    fd = take_run_lock(tmp_path)
    assert fd is not None
    try:
        a = Agent(tmp_path, store, kernel).start()
        agents.append(a)
        a.thread.join(10)
        assert a.rc == [1]
        store.reopen()
        assert store.list_prefix(SUBNETS)[0] == [] and kernel.log == []
    finally:
        os.close(fd)
    b = Agent(tmp_path, store, kernel).start()  # released: starts normally
    agents.append(b)
    until(b.ready, "ready once the lock is free")
    assert b.stop() == EXIT_OK


# --------------------------------------------------------------------------- hostile input


def test_malformed_lease_flood_is_rate_limited_and_good_peers_still_programmed(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent],
        caplog: pytest.LogCaptureFixture) -> None:
    """A peer rewriting a malformed value thousands of times (issue 19 item 7): a handful of
    log lines with counts instead of one per write, and a good peer arriving mid-flood is
    programmed at once."""
    import logging
    import time

    from netagent.lograte import LogLimiter

    caplog.set_level(logging.WARNING, logger="netagent")
    store.put(CONFIG, net())
    a = Agent(tmp_path, store, kernel)
    a.daemon.log_limiter = LogLimiter(logging.getLogger("netagent"), window=0.5)
    a.start()
    agents.append(a)
    until(a.ready, "ready")
    writes = 3000
    for i in range(writes):
        store.put(SUBNETS + "10.70.9.0-24", f"{{not json {i}")
        if i == writes // 2:
            peer(store, 2, "10.70.2.0/24")
            t0 = time.monotonic()
    until(lambda: "10.70.2.0/24" in peer_routes(kernel), "good peer programmed mid-flood")
    latency = time.monotonic() - t0
    until(lambda: sum(int(r.getMessage().split("(and ")[1].split()[0])
                      for r in caplog.records if "more in the last" in r.getMessage())
          + sum(1 for r in caplog.records if r.getMessage().startswith("skipping malformed")
                and "more in the last" not in r.getMessage()) == writes,
          "every malformed write accounted for in the log", timeout=10)
    lines = [r for r in caplog.records if "skipping malformed lease" in r.getMessage()]
    assert 2 <= len(lines) <= 20, [r.getMessage() for r in lines]
    assert latency < 5.0
    until(lambda: list(a.daemon.snapshot.invalid_leases) == ["10.70.9.0-24"],
          "the malformed key shown once in the status (netagent_invalid_leases)")
    assert a.stop() == EXIT_OK


def test_valid_lease_flapping_is_programmed_but_not_logged_per_sync(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent],
        caplog: pytest.LogCaptureFixture) -> None:
    """A peer rewriting *valid* values every few ms (its PublicIP flapping): the kernel
    follows the last value, and "reconciled" lines are rate-limited like malformed ones."""
    import logging

    from netagent.lograte import LogLimiter

    caplog.set_level(logging.INFO, logger="netagent")
    store.put(CONFIG, net())
    a = Agent(tmp_path, store, kernel)
    a.daemon.sync_log = LogLimiter(logging.getLogger("netagent"), logging.INFO, window=60)
    a.start()
    agents.append(a)
    until(a.ready, "ready")
    import time

    for i in range(300):  # paced, so most writes reach the loop as syncs of their own
        peer(store, 2 + i % 2, "10.70.2.0/24")
        time.sleep(0.003)
    peer(store, 4, "10.70.2.0/24")  # the last word
    until(lambda: any(r.dst == IPv4Network("10.70.2.0/24") and r.gateway == pub(4)
                      for r in kernel.routes.values()), "the route follows the last value")
    reconciled = [r for r in caplog.records if r.getMessage().startswith("reconciled:")]
    assert 1 <= len(reconciled) <= 2, len(reconciled)
    assert a.daemon.sync_log.suppressed_total >= 50, "many syncs, each would have logged"
    assert a.stop() == EXIT_OK


# --------------------------------------------------------------------------- kernel events


def deleted(a: Agent, *changes: KernelChange) -> None:
    """What the kernel-event thread does when the kernel announces these deletions."""
    a.daemon.events.put(KernelChanges(tuple(changes)))


def one_peer_route(tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent],
                   repair: float, ready: bool = False) -> tuple[Agent, Any]:
    """An agent with one peer (10.70.2.0/24) whose route is in the fake kernel: the agent and
    that route's kernel key."""
    store.put(CONFIG, net())
    peer(store, 2, "10.70.2.0/24")
    a = Agent(tmp_path, store, kernel, repair=repair).start()
    agents.append(a)
    if ready:
        until(a.ready, "ready")
    until(lambda: peer_routes(kernel) == {"10.70.2.0/24"}, "peer route")
    [key] = [k for k, r in kernel.routes.items() if r.proto == 111]
    return a, key


def test_deleted_peer_route_is_restored_on_the_event_not_the_timer(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent]) -> None:
    # repair=60: the timer cannot be what repairs
    a, key = one_peer_route(tmp_path, store, kernel, agents, repair=60, ready=True)
    del kernel.routes[key]  # `ip route del`
    deleted(a, KernelChange("route", key))
    until(lambda: peer_routes(kernel) == {"10.70.2.0/24"}, "route restored", timeout=2)
    until(lambda: a.daemon.snapshot.kernel_event_repairs == 1, "repair counted")
    assert a.daemon.snapshot.drift_repairs == 0 and a.daemon.snapshot.kernel_repair_backoffs == 0
    # echoes and foreign deletions change nothing: a key we do not want, a route of BIRD's
    writes = kernel.writes()
    other = (254, IPv4Network("10.70.9.0/24"), 0)
    deleted(a, KernelChange("route", other), KernelChange("neigh", (99, ME)),
            KernelChange("link", (99,), "eth7"))
    peer(store, 3, "10.70.3.0/24")  # a later event proves the loop went past those items
    until(lambda: "10.70.3.0/24" in peer_routes(kernel), "next peer")
    assert kernel.writes() == writes + 1, "only the new peer's route was written"
    assert a.daemon.snapshot.kernel_event_repairs == 1


def test_entry_deleted_in_a_loop_backs_off_and_comes_back_after(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent]) -> None:
    a, key = one_peer_route(tmp_path, store, kernel, agents, repair=3)
    before = kernel.writes()
    for _ in range(50):  # 50 deletions in ~1 s
        kernel.routes.pop(key, None)
        deleted(a, KernelChange("route", key))
        a.daemon.stop.wait(0.02)
    rewrites = kernel.writes() - before
    snap = a.daemon.snapshot
    assert 2 <= rewrites <= 8, f"{rewrites} re-writes for 50 deletions: no back-off"
    assert snap.kernel_repair_backoffs >= 40, snap.kernel_repair_backoffs
    # the deleter stopped: the deferred repair (or at worst the periodic one) puts it back
    until(lambda: peer_routes(kernel) == {"10.70.2.0/24"}, "route back", timeout=4)


def test_deferred_repair_overtaken_by_a_new_event_leaves_the_loop_idle(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent]) -> None:
    """A deferred key whose next deletion event arrives after its due time is repaired by that
    event; no retry time may stay behind (one in the past made the loop spin at 100 %)."""
    a, key = one_peer_route(tmp_path, store, kernel, agents, repair=30)
    stall = threading.Event()
    a.daemon.sync_hooks.append(lambda _s: stall.wait(0.5) if not stall.is_set() else None)
    kernel.routes.pop(key)
    # two deletion events in one burst: the first is repaired at once (and its sync holds the
    # loop 0.5 s), the second deferred by 0.1 s; a third arrives while the loop is held
    deleted(a, KernelChange("route", key))
    deleted(a, KernelChange("route", key))
    time.sleep(0.25)
    deleted(a, KernelChange("route", key))
    stall.set()
    until(lambda: a.daemon.snapshot.kernel_repair_backoffs == 1, "one deferral")
    until(lambda: "10.70.2.0/24" in peer_routes(kernel), "route back", timeout=4)
    tid = a.thread.native_id
    assert tid is not None
    busy = thread_cpu(tid)
    time.sleep(1.0)
    assert thread_cpu(tid) - busy < 0.2, "the main loop spins while idle"


def thread_cpu(tid: int) -> float:
    """CPU seconds (user + system) one thread of this process has used."""
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_deleted_vxlan_device_is_recreated_and_reprogrammed_on_the_event(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent]) -> None:
    store.put(CONFIG, net("vxlan"))
    store.put(SUBNETS + "10.70.2.0-24", json.dumps({
        "PublicIP": str(pub(2)), "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:00:02"}}))
    a = Agent(tmp_path, store, kernel, repair=60).start()
    agents.append(a)
    until(lambda: peer_routes(kernel) == {"10.70.2.0/24"} and kernel.neighs and kernel.fdb,
          "vxlan peer programmed")
    old = kernel.links["flannel.1"].index
    kernel.delete_link(old)  # `ip link del flannel.1`: its routes, neighbours, FDB go too
    assert not peer_routes(kernel)
    deleted(a, KernelChange("link", (old,), "flannel.1"))
    until(lambda: "flannel.1" in kernel.links and peer_routes(kernel) == {"10.70.2.0/24"}
          and kernel.neighs and kernel.fdb, "device and entries back", timeout=3)
    new = kernel.links["flannel.1"].index
    assert new != old
    assert {n.ifindex for n in kernel.neighs.values()} == {new}
    until(lambda: a.daemon.snapshot.kernel_event_repairs >= 3, "route, neighbour, FDB counted")
    assert a.daemon.snapshot.drift_repairs == 0

@pytest.mark.parametrize("compacted", [False, True], ids=["events", "re-list"])
def test_wiped_prefix_holds_peer_deletions_until_the_config_is_back(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent],
        compacted: bool) -> None:
    """Config and every lease deleted (issue 19 item 2b), seen as delete events or as a re-list
    after compaction: the kernel keeps the last known good peers, status.json says why; with
    the config back a peer whose key was re-put stays and the one that really left is removed."""
    store.put(CONFIG, net())
    peer(store, 2, "10.70.2.0/24")
    peer(store, 3, "10.70.3.0/24")
    a = Agent(tmp_path, store, kernel).start()
    agents.append(a)
    until(a.ready, "ready")
    until(lambda: len(peer_routes(kernel)) == 2, "both peers programmed")
    mine = dict(a.my_keys())
    with store.atomically():  # one `etcdctl del --prefix`
        for key in sorted(k for k in store.data if k.startswith("/coreos.com/network/")):
            store.delete(key)
        if compacted:  # the watch sees a listing without config or peers, not the deletes
            store.compact(store.revision)
    until(lambda: "deleted from etcd" in str(a.status().get("config_error", "")), "reported")
    until(lambda: a.my_keys() == mine, "own key re-published on the same subnet")
    assert peer_routes(kernel) == {"10.70.2.0/24", "10.70.3.0/24"}, "nothing removed"
    peer(store, 2, "10.70.2.0/24")  # host 2 re-publishes; host 3 is gone for good
    store.put(CONFIG, net())
    until(lambda: peer_routes(kernel) == {"10.70.2.0/24"}, "the peer that left is removed")
    until(lambda: a.status().get("config_error") == "", "status clear")


# --------------------------------------------------------------------------- full-compare schedule


class BlockingMonitor:
    """Stands in for the netlink monitor thread: reads nothing, returns when stopped, or fails
    at once (a kernel refusing the socket later) when `fail` is set."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.closed = threading.Event()

    def run(self, stop: threading.Event, sink: Callable[[object], None]) -> None:
        if self.fail:
            raise OSError("netlink receive failed")
        stop.wait(30)

    def close(self) -> None:
        self.closed.set()


@pytest.mark.parametrize(("interval_set", "events", "backend", "want"), [
    (False, True, "host-gw", SAFETY_NET_INTERVAL),  # deletions come back on the event
    (True, True, "host-gw", 1.0),  # the operator's --repair-interval is kept
    (False, False, "host-gw", 1.0),  # no event thread: the timer is the only repair
    (False, True, "alloc", 1.0),  # a backend that claims no events keeps the timer
], ids=["stretched", "operator-set", "monitor-failed", "backend-without-events"])
def test_full_compare_is_a_rare_safety_net_only_while_kernel_events_repair(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent],
        interval_set: bool, events: bool, backend: str, want: float) -> None:
    store.put(CONFIG, net(backend))
    a = Agent(tmp_path, store, kernel, repair=1.0)
    a.daemon.settings = replace(a.daemon.settings, repair_interval_set=interval_set)
    monitor = BlockingMonitor(fail=not events)
    a.daemon.make_monitor = lambda: monitor  # type: ignore[assignment,return-value]
    agents.append(a.start())
    until(a.ready, "ready")
    if not events:
        until(monitor.closed.is_set, "the failed monitor closed")
    until(lambda: a.daemon._full_compare_interval() == want, f"interval {want}", timeout=2)
    if want == SAFETY_NET_INTERVAL:  # no full compare in 2.5 default intervals
        reconciles = a.daemon.status.reconciles
        time.sleep(2.5)
        assert a.daemon.status.reconciles == reconciles
    else:  # a full compare every second, as the operator asked
        reconciles = a.daemon.status.reconciles
        until(lambda: a.daemon.status.reconciles >= reconciles + 2, "two full compares",
              timeout=4)


def test_deleted_subnet_file_comes_back_on_the_repair_interval_not_the_safety_net(
        tmp_path: Path, store: FakeStore, kernel: FakeKernel, agents: list[Agent]) -> None:
    """Stretching the full compare must not stretch the (cheap) subnet.env check with it."""
    store.put(CONFIG, net())
    a = Agent(tmp_path, store, kernel, repair=1.0)
    a.daemon.settings = replace(a.daemon.settings, repair_interval_set=False)
    a.daemon.make_monitor = lambda: BlockingMonitor()  # type: ignore[assignment,return-value]
    agents.append(a.start())
    until(a.ready, "ready")
    until(lambda: a.daemon._full_compare_interval() == SAFETY_NET_INTERVAL, "stretched")
    (tmp_path / "subnet.env").unlink()
    until(lambda: (tmp_path / "subnet.env").exists(), "subnet.env rewritten", timeout=3)
    assert a.env()["FLANNEL_NETWORK"] == "10.70.0.0/16"
