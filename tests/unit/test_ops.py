"""Pure pieces of operating netagent: masquerade render/parse, the metrics collector against a
fake daemon, the HTTP endpoints, watchdog timing rules, ICMP probe packets, the systemd units."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.harness import REPO, need

from netagent.backends.base import BackendHealth
from netagent.daemon import status_json
from netagent.health import Heartbeat, Watchdog, start_servers, watchdog_interval
from netagent.iptables import IptablesController, RulesState
from netagent.masq import (
    Installed,
    MasqError,
    Masquerade,
    missing,
    parse_save,
    removal_text,
    render_rules,
    restore_text,
    supports_random_fully,
)
from netagent.metrics import Metrics
from netagent.probe import (
    PeerProbe,
    _checksum,
    echo_request,
    parse_reply,
    peer_list,
    probe_targets,
)
from netagent.snapshot import EtcdView, LeaseView, StatusSnapshot

NET, SUB = IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24")
NET6, SUB6 = IPv6Network("fd00:10:5::/48"), IPv6Network("fd00:10:5:72::/64")


# --------------------------------------------------------------------------- masq


def test_restore_text_refills_our_chains_and_adds_only_missing_hooks() -> None:
    want = render_rules(NET, SUB)
    empty = Installed(None, None, 0, 0)
    text = restore_text(want, empty)
    assert text.startswith("*nat\n:FLANNEL-POSTRTG - [0:0]\n-F FLANNEL-POSTRTG\n")
    assert text.count("-A POSTROUTING") == 1 and text.count("-A FORWARD") == 1
    assert text.count("COMMIT") == 2
    # hook present once: not re-added; duplicated: the extra one deleted
    again = restore_text(want, Installed(want.nat, want.forward, 1, 3))
    assert "-A POSTROUTING" not in again and "-A FORWARD " not in again
    assert again.count("-D FORWARD") == 2
    assert missing(want, Installed(want.nat, want.forward, 1, 1)) == []
    assert removal_text(Installed(None, None, 0, 0)) == ""


def test_parse_save_reads_back_what_render_writes() -> None:
    want = render_rules(NET, SUB, random_fully=False, forward=False)
    save = "\n".join(["*nat", ":POSTROUTING ACCEPT [0:0]", ":FLANNEL-POSTRTG - [0:0]",
                      "-A POSTROUTING -j KUBE-POSTROUTING",
                      '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
                      *want.nat, "COMMIT", "*filter", ":FORWARD DROP [0:0]", "COMMIT"])
    have = parse_save(save)
    assert have.nat == want.nat and have.nat_hooks == 1 and have.forward is None
    assert missing(want, have) == []
    assert "--random-fully" not in "".join(want.nat)
    assert supports_random_fully("iptables v1.8.9 (nf_tables)")
    assert not supports_random_fully("iptables v1.6.1")


MASQ = '-m comment --comment "flanneld masq"'
FWD = '-m comment --comment "flanneld forward"'


def test_render_ipv4_is_flannels_text() -> None:
    assert render_rules(NET, SUB) == render_rules(NET, SUB, random_fully=True, forward=True)
    want = render_rules(NET, SUB)
    assert want.nat == (
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.5.72.0/24 -d 10.5.0.0/16 {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.72.0/24 {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.72.0/24 {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 {MASQ} -j MASQUERADE --random-fully",
        f"-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 {MASQ} -j MASQUERADE --random-fully",
    )
    assert want.forward == (f"-A FLANNEL-FWD -s 10.5.0.0/16 {FWD} -j ACCEPT",
                            f"-A FLANNEL-FWD -d 10.5.0.0/16 {FWD} -j ACCEPT")


def test_render_ipv6_is_the_same_rule_set_with_ipv6_multicast() -> None:
    """§14.2: "ip6tables: same with IPv6 Network/subnet and multicast ff00::/8", in the text
    ip6tables-save 1.8.9 prints (compressed prefixes, as Python's str)."""
    want = render_rules(NET6, SUB6)
    assert want.nat == (
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s fd00:10:5:72::/64 -d fd00:10:5::/48 {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s fd00:10:5::/48 -d fd00:10:5:72::/64 {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s fd00:10:5::/48 -d fd00:10:5:72::/64 {MASQ} -j RETURN",
        f"-A FLANNEL-POSTRTG -s fd00:10:5::/48 ! -d ff00::/8 {MASQ} -j MASQUERADE --random-fully",
        f"-A FLANNEL-POSTRTG ! -s fd00:10:5::/48 -d fd00:10:5::/48 {MASQ} -j MASQUERADE "
        "--random-fully",
    )
    assert want.forward == (f"-A FLANNEL-FWD -s fd00:10:5::/48 {FWD} -j ACCEPT",
                            f"-A FLANNEL-FWD -d fd00:10:5::/48 {FWD} -j ACCEPT")
    bare = render_rules(NET6, SUB6, random_fully=False, forward=False)
    assert bare.forward == () and bare.hooks == {"nat": want.hooks["nat"]}
    assert bare.nat == tuple(r.replace(" --random-fully", "") for r in want.nat)
    assert "224.0.0.0/4" not in "".join(want.nat)
    # same batch shape as IPv4: only the addresses differ
    assert restore_text(want, Installed(None, None, 0, 0)).count("COMMIT") == 2


def test_mixed_families_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="10.5.0.0/16 is IPv4 but subnet fd00:10:5:72::/64 is IPv6"):
        render_rules(NET, SUB6)
    with pytest.raises(ValueError, match="is IPv6 but subnet 10.5.72.0/24 is IPv4"):
        Masquerade(NET6, SUB)
    m = Masquerade(NET, SUB)
    with pytest.raises(ValueError, match="one Masquerade per address family"):
        m.retarget(NET, SUB6)
    assert (m.network, m.subnet, m.commands.save) == (NET, SUB, "iptables-save")


IP6TABLES_SAVE = f"""\
# Generated by ip6tables-save v1.8.9 (nf_tables) on Sat Nov 28 04:31:27 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:FLANNEL-FWD - [0:0]
-A FORWARD -i lo -j ACCEPT
-A FORWARD {FWD} -j FLANNEL-FWD
-A FLANNEL-FWD -s fd00:10:5::/48 {FWD} -j ACCEPT
-A FLANNEL-FWD -d fd00:10:5::/48 {FWD} -j ACCEPT
COMMIT
# Completed on Sat Nov 28 04:31:27 2026
# Generated by ip6tables-save v1.8.9 (nf_tables) on Sat Nov 28 04:31:27 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
-A POSTROUTING -s fd00:99::/64 -j MASQUERADE
-A POSTROUTING {MASQ} -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {MASQ} -j RETURN
-A FLANNEL-POSTRTG -s fd00:10:5:72::/64 -d fd00:10:5::/48 {MASQ} -j RETURN
-A FLANNEL-POSTRTG -s fd00:10:5::/48 -d fd00:10:5:72::/64 {MASQ} -j RETURN
-A FLANNEL-POSTRTG ! -s fd00:10:5::/48 -d fd00:10:5:72::/64 {MASQ} -j RETURN
-A FLANNEL-POSTRTG -s fd00:10:5::/48 ! -d ff00::/8 {MASQ} -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s fd00:10:5::/48 -d fd00:10:5::/48 {MASQ} -j MASQUERADE --random-fully
COMMIT
# Completed on Sat Nov 28 04:31:27 2026
"""


def test_parse_save_reads_ip6tables_save_text() -> None:
    """Verbatim ip6tables-save 1.8.9 (nft) output of our rules next to foreign ones."""
    want = render_rules(NET6, SUB6)
    have = parse_save(IP6TABLES_SAVE)
    assert have == Installed(want.nat, want.forward, 1, 1)
    assert missing(want, have) == []
    # our rule deleted by hand: the nat chain differs, filter is fine; the refill keeps the hook
    broken = parse_save(IP6TABLES_SAVE.replace(want.nat[4] + "\n", ""))
    assert missing(want, broken) == ["nat FLANNEL-POSTRTG differs"]
    assert "-A POSTROUTING" not in restore_text(want, broken)
    # removal deletes only our hooks and chains, never the foreign POSTROUTING/FORWARD rules
    gone = removal_text(have)
    assert "fd00:99::" not in gone and "-i lo" not in gone
    assert gone.count("-X ") == 2 and gone.count("-D ") == 2
    # the other family's rules do not satisfy us
    assert missing(render_rules(NET, SUB), have) == ["nat FLANNEL-POSTRTG differs",
                                                     "filter FLANNEL-FWD differs"]


class FakeIptables:
    """In-memory iptables and ip6tables (separate tables, as in the kernel), enough of
    *-save/*-restore --noflush for our batches; records every command run."""

    def __init__(self, versions: dict[str, str] | None = None) -> None:
        self.tables: dict[str, dict[str, dict[str, list[str]]]] = {"iptables": {},
                                                                   "ip6tables": {}}
        self.versions = versions or {"iptables": "1.8.9", "ip6tables": "1.8.9"}
        self.calls: list[str] = []

    def run(self, cmd: list[str], stdin: str | None = None) -> str:
        self.calls.append(" ".join(cmd))
        fam = cmd[0].split("-")[0]
        tables = self.tables[fam]
        if cmd[1:] == ["--version"]:
            return f"{fam} v{self.versions[fam]} (nf_tables)\n"
        if cmd[0].endswith("-save"):
            out: list[str] = []
            for name, chains in tables.items():
                out += [f"*{name}", *(f":{c} - [0:0]" for c in chains)]
                out += [r for rules in chains.values() for r in rules] + ["COMMIT"]
            return "\n".join(out) + "\n"
        assert cmd[0].endswith("-restore") and "--noflush" in cmd and stdin is not None
        table: dict[str, list[str]] = {}
        for line in stdin.splitlines():
            word = line.split()[0] if line else ""
            if line.startswith("*"):
                table = tables.setdefault(line[1:], {})
            elif line.startswith(":"):
                table.setdefault(line[1:].split()[0], [])
            elif word == "-F":
                table[line.split()[1]].clear()
            elif word == "-X":
                del table[line.split()[1]]
            elif word == "-A":
                table.setdefault(line.split()[1], []).append(line)
            elif word == "-D":
                table[line.split()[1]].remove("-A" + line[2:])
        return ""

    def ours(self, fam: str) -> list[str]:
        return [r for chains in self.tables[fam].values() for rules in chains.values()
                for r in rules if "flanneld" in r]

    def masquerade(self, network: Any, subnet: Any) -> Masquerade:
        m = Masquerade(network, subnet)
        m._run = self.run  # type: ignore[method-assign]
        return m


def test_ipv6_masquerade_runs_only_ip6tables_and_leaves_ipv4_alone() -> None:
    kernel = FakeIptables()
    v4 = kernel.masquerade(NET, SUB)
    assert v4.ensure() is True
    v4_rules = kernel.ours("iptables")
    kernel.calls.clear()
    v6 = kernel.masquerade(NET6, SUB6)
    assert v6.ensure() is True and v6.check() == []
    assert {c.split()[0] for c in kernel.calls} == {"ip6tables", "ip6tables-save",
                                                    "ip6tables-restore"}
    assert "ip6tables --version" in kernel.calls
    want = render_rules(NET6, SUB6)
    assert sorted(kernel.ours("ip6tables")) == sorted([*want.nat, *want.forward,
                                                       *want.hooks.values()])
    assert kernel.ours("iptables") == v4_rules
    # the periodic re-check writes nothing
    kernel.calls.clear()
    assert v6.ensure() is False
    assert not any("restore" in c for c in kernel.calls)
    # removing one family leaves the other's rules
    v6.remove()
    assert kernel.ours("ip6tables") == [] and kernel.ours("iptables") == v4_rules


def test_random_fully_is_probed_on_the_familys_own_binary() -> None:
    kernel = FakeIptables({"iptables": "1.8.9", "ip6tables": "1.6.1"})
    v6 = kernel.masquerade(NET6, SUB6)
    v6.ensure()
    assert kernel.ours("ip6tables") and not any("--random-fully" in r
                                                for r in kernel.ours("ip6tables"))
    v4 = kernel.masquerade(NET, SUB)
    v4.ensure()
    assert any("--random-fully" in r for r in kernel.ours("iptables"))


def test_iptables_controller_follows_families_and_subnets() -> None:
    """The daemon's rules controller: one rule set per family in use, retargeted on a new
    subnet, a family the network drops removed (the other's rules untouched), problems
    reported in the summary without raising."""
    kernel = FakeIptables()

    def make(network: Any, subnet: Any, **kw: Any) -> Masquerade:
        m = Masquerade(network, subnet, **kw)
        m._run = kernel.run  # type: ignore[method-assign]
        return m

    swept: list[int] = []
    rules = IptablesController(enabled=True, ip_masq=True, forward=True, random_fully=True,
                               sweep=lambda fam: bool(swept.append(fam)), make=make)
    rules.reconcile(NET, SUB, NET6, SUB6)
    assert rules.state() == RulesState("in place", True, 2, 0)
    assert any(str(SUB) in r for r in kernel.ours("iptables"))
    assert any(str(SUB6) in r for r in kernel.ours("ip6tables"))
    v4 = kernel.ours("iptables")
    rules.reconcile(NET, SUB, None, None)  # IPv6 turned off
    assert kernel.ours("ip6tables") == [] and kernel.ours("iptables") == v4
    assert rules.state().families == 1
    new_sub = IPv4Network("10.5.99.0/24")
    rules.reconcile(NET, new_sub, None, None)  # renumbered
    assert any(str(new_sub) in r for r in kernel.ours("iptables"))
    assert not any(str(SUB) in r for r in kernel.ours("iptables"))
    assert swept == [], "rules wanted: nothing is swept"

    def broken(cmd: list[str], stdin: str | None = None) -> str:
        raise MasqError("iptables-restore: Resource temporarily unavailable")

    rules.masqs[4]._run = broken  # type: ignore[method-assign]
    rules.reconcile(NET, IPv4Network("10.5.98.0/24"), None, None)
    assert "temporarily unavailable" in rules.state().summary
    assert rules.state().in_place is False


def test_iptables_controller_off_sweeps_our_old_chains_once() -> None:
    swept: list[int] = []
    rules = IptablesController(enabled=False, ip_masq=False, forward=False,
                               random_fully=True, sweep=lambda fam: bool(swept.append(fam)))
    for _ in range(3):
        rules.reconcile(NET, SUB, None, None)
    assert swept == [4, 6] and rules.state() == RulesState("off", False, 0, 0)


def test_retarget_within_and_across_families() -> None:
    kernel = FakeIptables()
    m = kernel.masquerade(NET, SUB)
    m.ensure()
    # renumbered: replaced in one batch, same family
    sub2 = IPv4Network("10.5.9.0/24")
    m.retarget(NET, sub2)
    assert m.in_place is False and m.ensure() is True
    assert any("10.5.9.0/24" in r for r in kernel.ours("iptables"))
    assert not any("10.5.72.0/24" in r for r in kernel.ours("iptables"))
    # live switch to an IPv6-only network: no I/O in retarget, the next ensure() moves the rules
    kernel.calls.clear()
    m.retarget(NET6, SUB6)
    assert kernel.calls == [] and m.commands.restore == "ip6tables-restore"
    assert "rules of the previous address family still to delete (iptables-save)" in m.check()
    assert m.ensure() is True and m.check() == []
    assert kernel.ours("iptables") == [] and len(kernel.ours("ip6tables")) == 10
    assert "ip6tables --version" in kernel.calls  # re-probed for the new binary
    # and back, switched again before any ensure(): nothing stale twice, remove() cleans both
    m.retarget(NET, SUB)
    m.retarget(NET6, SUB6)
    assert m.check() == []
    m.retarget(NET, SUB)
    m.remove()
    assert kernel.ours("iptables") == [] and kernel.ours("ip6tables") == []


# --------------------------------------------------------------------------- metrics


def fake_snapshot(**kw: Any) -> StatusSnapshot:
    """What the daemon's main loop publishes for a host with one vxlan peer, udp counters and
    masquerade rules (fields as the daemon fills them)."""
    now = time.monotonic()
    base: dict[str, Any] = dict(
        built_at=now, backend="vxlan", public_ip="192.0.2.10", network=str(NET), peers=1,
        checks=MappingProxyType({"lease": True, "subnet_env": True, "backend": True}),
        invalid_leases=MappingProxyType({"bad": "x"}),
        kernel_entries=MappingProxyType({"route": 2, "fdb": 2}), reconciles=7, drift_repairs=3,
        kernel_event_repairs=4, kernel_repair_backoffs=5, last_reconcile=1700000000.0,
        backend_health=BackendHealth(),
        lease=LeaseView(str(SUB), False, 86400, 5, 1, 0, now + 86000.5),
        etcd=EtcdView(MappingProxyType({"unavailable": 4, "tls": 1}), 2, 1),
        rules=RulesState("in place", True, 1, 1),
        packet_counters=MappingProxyType({"rx_packets": 10, "tx_packets": 11, "rx_bytes": 1000,
                                          "tx_bytes": 1100, "drops": {"no_route": 2}}),
        probes=MappingProxyType({"10.5.9.0/24": PeerProbe("192.0.2.11", True, 0.0012, 0.0)}),
    )
    base.update(kw)
    return StatusSnapshot(**base)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_follow_daemon_state_and_parse() -> None:
    current = [fake_snapshot()]
    m = Metrics(lambda: current[0])
    m.observe_reconcile(0.004)
    got = samples(m.render().decode())
    assert got[("netagent_peers", ())] == 1
    assert got[("netagent_lease_info", (("backend", "vxlan"), ("network", "10.5.0.0/16"),
                                        ("public_ip", "192.0.2.10"), ("reserved", "false"),
                                        ("subnet", "10.5.72.0/24")))] == 1
    assert 86000 < got[("netagent_lease_expiry_seconds", ())] <= 86000.5
    assert got[("netagent_lease_renewals_total", ())] == 5
    assert got[("netagent_lease_renewal_failures_total", ())] == 1
    assert got[("netagent_etcd_request_errors_total", (("kind", "unavailable"),))] == 4
    assert got[("netagent_etcd_watch_reconnects_total", ())] == 2
    assert got[("netagent_kernel_entries", (("kind", "fdb"),))] == 2
    assert got[("netagent_drift_repairs_total", ())] == 3
    assert got[("netagent_kernel_event_repairs_total", ())] == 4
    assert got[("netagent_kernel_repair_backoffs_total", ())] == 5
    assert got[("netagent_reconcile_duration_seconds_count", ())] == 1
    assert got[("netagent_udp_packets_total", (("direction", "tx"),))] == 11
    assert got[("netagent_udp_drops_total", (("reason", "no_route"),))] == 2
    assert got[("netagent_peer_reachable", (("public_ip", "192.0.2.11"),
                                            ("subnet", "10.5.9.0/24")))] == 1
    assert got[("netagent_ready", ())] == 1
    assert got[("netagent_masquerade_repairs_total", ())] == 1
    # the loop publishes a new snapshot, the next scrape follows (nothing cached)
    current[0] = fake_snapshot(peers=0, etcd=EtcdView(MappingProxyType({"unavailable": 9}), 2, 1))
    got = samples(m.render().decode())
    assert got[("netagent_peers", ())] == 0
    assert got[("netagent_etcd_request_errors_total", (("kind", "unavailable"),))] == 9


def test_metrics_during_startup_have_no_lease_yet() -> None:
    got = samples(Metrics(StatusSnapshot).render().decode())
    assert got[("netagent_ready", ())] == 0
    assert not any(name == "netagent_lease_expiry_seconds" for name, _ in got)
    assert not any(name.startswith("netagent_udp") for name, _ in got)


def test_readiness_rechecks_the_lease_deadline_at_read_time() -> None:
    """A main loop stuck in an etcd retry publishes nothing new; /readyz must still turn
    false once our lease has run out."""
    now = time.monotonic()
    snap = fake_snapshot(lease=LeaseView(str(SUB), False, 60, 0, 0, 0, now + 5))
    assert all(snap.readiness(now).values())
    assert snap.readiness(now + 6)["lease"] is False
    reserved = fake_snapshot(lease=LeaseView(str(SUB), True, -1, 0, 0, 0, None))
    assert all(reserved.readiness(now + 10**6).values())


def test_status_doc_keeps_the_status_json_keys() -> None:
    """`netagent status` (and scripts) read these keys; the snapshot must write all of them."""
    doc = fake_snapshot(backend_health=BackendHealth(False, "down", {"impl": "x"})).status_doc()
    assert set(doc) == {
        "phase", "ready", "subnet_file_written", "backend", "subnet", "lease_key",
        "public_ip", "mtu", "peers", "last_reconcile", "reconciles", "drift_repairs",
        "reacquired", "backend_programmed", "masquerade", "peer_list", "kernel_entries",
        "skipped_peers", "invalid_leases", "config_error", "backend_health"}
    assert doc["backend_health"] == {"ok": False, "detail": "down", "impl": "x"}
    json.dumps(doc)  # plain JSON, no mapping proxies left


# --------------------------------------------------------------------------- health


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:  # noqa: S310 - loopback test server
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_endpoints() -> None:
    state = {"lease": True, "subnet_env": False}
    servers = start_servers("127.0.0.1", 0, 0, lambda: state, lambda: b"x 1\n")
    assert servers == []  # both ports 0: off, like flannel's default
    from netagent.health import HealthServer

    srv = HealthServer("127.0.0.1", 0, lambda: state, lambda: b"netagent_up 1\n").start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        assert get(base + "/healthz") == (200, "flanneld is running\n")
        code, body = get(base + "/readyz")
        assert code == 503 and "subnet_env" in body
        state["subnet_env"] = True
        assert get(base + "/readyz") == (200, "flanneld is ready\n")
        assert get(base + "/metrics") == (200, "netagent_up 1\n")
        assert get(base + "/nope")[0] == 404
    finally:
        srv.stop()


def test_watchdog_interval_and_pings_stop_when_the_loop_hangs() -> None:
    import os

    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    other_pid = str(os.getpid() + 1)  # sd_watchdog_enabled: meant for another process
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": other_pid}) is None
    hb = Heartbeat(limit=10.0)
    assert hb.alive()  # start-up: not yet running
    hb.beat()
    assert hb.alive()
    hb.last -= 11
    assert not hb.alive()
    sent: list[str] = []
    stop = threading.Event()
    alive = [True]
    wd = Watchdog(0.01, lambda: alive[0], sent.append, stop).start()
    for _ in range(500):
        if len(sent) >= 2:
            break
        stop.wait(0.01)
    alive[0] = False
    n = len(sent)
    stop.wait(0.1)
    stop.set()
    wd._thread.join(1)
    assert n >= 2 and set(sent) == {"WATCHDOG=1"} and len(sent) <= n + 1


# --------------------------------------------------------------------------- probe


def test_echo_packets_and_targets() -> None:
    pkt = echo_request(0x1234, 7)
    assert _checksum(pkt) == 0  # a valid ICMP checksum sums to zero
    reply = bytes([0, 0]) + pkt[2:]
    assert parse_reply(reply, raw=False) == (0x1234, 7)
    ip_header = bytes([0x45]) + bytes(19)
    assert parse_reply(ip_header + reply, raw=True) == (0x1234, 7)
    assert parse_reply(pkt, raw=False) is None  # a request is not a reply
    lease = SimpleNamespace(attrs=SimpleNamespace(public_ip=IPv4Address("192.0.2.5"),
                                                  backend_type="host-gw"))
    peers = {IPv4Network("10.5.3.0/24"): lease}
    assert probe_targets(peers) == {"10.5.3.0/24": ("192.0.2.5", ("10.5.3.1", "10.5.3.0"))}
    assert peer_list(peers, None)["10.5.3.0/24"]["reachable"] is None


def test_peer_list_orders_by_family_then_address_and_status_json_round_trips() -> None:
    """peer_list sorts by plain ints (IPv4 before IPv6, then address, then prefix length: the
    order IPv4Network's own comparisons gave); status.json's text is valid JSON with one
    sorted top-level key a line, written with the json module's C encoder."""
    def lease(ip: str) -> SimpleNamespace:
        return SimpleNamespace(attrs=SimpleNamespace(public_ip=IPv4Address(ip),
                                                     backend_type="vxlan"))
    idents = [IPv6Network("fd00:1::/64"), IPv4Network("10.5.10.0/24"),
              IPv4Network("10.5.9.0/24"), IPv4Network("10.5.9.0/25"),
              IPv4Network("9.0.0.0/24")]
    peers = {ident: lease("192.0.2.5") for ident in idents}
    got = list(peer_list(peers, {"10.5.9.0/24": PeerProbe("192.0.2.5", True, 0.0012, 1.0,
                                                           True, None)}))
    assert got == [str(n) for n in sorted(idents, key=lambda n: (n.version, n))]
    assert got[0] == "9.0.0.0/24" and got[-1] == "fd00:1::/64"
    doc = {"ready": True, "peer_list": peer_list(peers, None), "phase": "running",
           "checks": {"lease": True}}
    text = status_json(doc)
    assert json.loads(text) == doc
    lines = text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}" and len(lines) == len(doc) + 2
    assert [ln.split(":", 1)[0].strip() for ln in lines[1:-1]] == [
        '"checks"', '"peer_list"', '"phase"', '"ready"']


# --------------------------------------------------------------------------- systemd units


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The shipped unit and drop-in, with only the executables pointed at ones that exist here."""
    need(shutil.which("systemd-analyze") is not None, "needs systemd-analyze (apt: systemd)")
    src = REPO / "contrib" / "systemd"
    unit = (src / "netagent.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit
    (tmp_path / "netagent.service").write_text(
        unit.replace("/usr/local/bin/netagent", f"{sys.executable} -m netagent"))
    (tmp_path / "docker.service").write_text("[Unit]\nDescription=stand-in\n[Service]\n"
                                             "ExecStart=/bin/true\n")
    (tmp_path / "docker.service.d").mkdir()
    dropin = (src / "docker.service.d" / "10-netagent.conf").read_text()
    assert "EnvironmentFile=/run/docker_opts.env" in dropin and "$DOCKER_OPTS" in dropin
    (tmp_path / "docker.service.d" / "10-netagent.conf").write_text(
        dropin.replace("/usr/bin/dockerd", "/bin/true"))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           str(tmp_path / "netagent.service"), str(tmp_path / "docker.service")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_docker_opts_from_ready_subnet_env(tmp_path: Path) -> None:
    """What ExecStartPost writes for the drop-in: flannel's mk-docker-opts.sh output."""
    env = tmp_path / "subnet.env"
    env.write_text("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\nFLANNEL_MTU=1450\n"
                   "FLANNEL_IPMASQ=true\n")
    out = tmp_path / "docker_opts.env"
    proc = subprocess.run([sys.executable, "-m", "netagent", "docker-opts", "-f", str(env), "-d",
                           str(out)], capture_output=True, text=True, cwd=REPO, timeout=60)
    # exit 1 only for the routing-table clash check, which reads this host's routes
    assert proc.returncode in (0, 1), proc.stderr
    assert 'DOCKER_OPTS=" --bip=10.5.72.1/24 --ip-masq=false --mtu=1450"' in out.read_text()


def test_probe_targets_tolerate_a_table_changing_under_them() -> None:
    """The probe thread reads the peer table while the main loop changes it."""
    import threading
    from ipaddress import IPv4Network
    from types import SimpleNamespace

    from netagent.probe import probe_targets

    lease = SimpleNamespace(attrs=SimpleNamespace(public_ip="192.0.2.1"))
    peers = {IPv4Network(f"10.{i // 256}.{i % 256}.0/24"): lease for i in range(3000)}
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set() and i < 2_000_000:
            key = IPv4Network(f"10.200.{i % 256}.0/24")
            peers[key] = lease
            del peers[key]
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(150):
            assert len(probe_targets(peers)) >= 3000
    finally:
        stop.set()
        t.join(10)


def test_backend_health_reaches_metrics_and_status_rows() -> None:
    """A backend's own machinery (BackendHealth) shows as gauges and as `netagent status` rows."""
    from netagent.backends.base import BackendGauge, BackendHealth
    from netagent.ctl import backend_health_rows
    from netagent.metrics import DaemonCollector

    health = BackendHealth(ok=False, detail="bird is not running", info={"implementation": "x",
                           "sessions": [{"peer": "10.0.0.2"}]},
                           gauges=(BackendGauge("bgp_session_up", "h", 1.0, (("peer", "a"),)),
                                   BackendGauge("bgp_session_up", "h", 0.0, (("peer", "b"),))))

    fams = {m.name: m for m in DaemonCollector._backend(health)}
    assert fams["netagent_backend_healthy"].samples[0].value == 0.0
    assert [(s.labels, s.value) for s in fams["netagent_bgp_session_up"].samples] == [
        ({"peer": "a"}, 1.0), ({"peer": "b"}, 0.0)]
    rows = backend_health_rows({"ok": health.ok, "detail": health.detail, **health.info})
    assert rows == [["backend health", "NOT OK: bird is not running"], ["implementation", "x"]]
    assert backend_health_rows({}) == []


@pytest.mark.parametrize("command", [["status"], ["leases"], ["doctor"], ["config", "get"],
                                     ["cleanup", "--dry-run"]])
def test_operator_commands_report_a_bad_config_file_without_a_traceback(
        command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from netagent.cli import main

    missing = tmp_path / "nope.yaml"
    assert main([*command, "--config", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"--config {missing}: No such file or directory" in err
    assert "Traceback" not in err
