"""plan_config_change over the cases DESIGN.md "Live reconfiguration" lists, and
check_runnable: the decisions the daemon used to make inline, now pure and checked here (the
e2e tests in tests/e2e/test_live_config.py, test_dualstack.py and test_ipv6only.py run the same
switches on real hosts)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from netagent.backends import check_runnable
from netagent.config import NetworkConfig, parse_network_config
from netagent.lease import NO_PUBLIC_IP, Lease, LeaseAttrs
from netagent.plan import plan_config_change, relabel_notice

SUB = IPv4Network("10.5.7.0/24")
SUB6 = IPv6Network("fc00:0:0:7::/64")
PUB6 = IPv6Address("2001:db8::1")


def cfg(backend: dict[str, object] | None = None, /, **doc: object) -> NetworkConfig:
    base: dict[str, object] = {"Network": "10.5.0.0/16", "Backend": backend or {"Type": "vxlan"}}
    base.update(doc)
    return parse_network_config(json.dumps({k: v for k, v in base.items() if v is not None}))


DUAL = {"EnableIPv6": True, "IPv6Network": "fc00::/48"}
V6ONLY = {"Network": None, "EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fc00::/48"}


def lease4() -> Lease:
    return Lease(SUB, LeaseAttrs(public_ip=IPv4Address("192.0.2.1")), None, 0x10)


def lease_dual() -> Lease:
    return Lease(SUB, LeaseAttrs(public_ip=IPv4Address("192.0.2.1"), public_ipv6=PUB6), SUB6,
                 0x10)


def test_same_config_is_no_change() -> None:
    plan = plan_config_change(cfg(), cfg(), lease4(), None)
    assert plan.unchanged and plan.steps == ()


@pytest.mark.parametrize("backend", [
    {"Type": "vxlan", "DirectRouting": True}, {"Type": "vxlan", "MTU": 1400},
    {"Type": "vxlan", "Port": 4790}])
def test_same_device_option_change_releases_the_old_instance_first_and_keeps_the_lease(
        backend: dict[str, object]) -> None:
    """Case 1: the new instance reuses flannel.1; the old one lets go first; the lease value
    is rewritten in place; nothing is torn down."""
    plan = plan_config_change(cfg(), cfg(backend), lease4(), None)
    assert plan.same_device and plan.keeps_lease and not plan.network_changed
    assert plan.steps == ("shutdown old", "prepare new", "rewrite lease value", "activate",
                          "full sync", "iptables", "subnet.env")


@pytest.mark.parametrize(("old", "new"), [
    ({"Type": "vxlan"}, {"Type": "host-gw"}), ({"Type": "host-gw"}, {"Type": "udp"}),
    ({"Type": "vxlan", "VNI": 1}, {"Type": "vxlan", "VNI": 2})])
def test_another_backend_or_device_tears_the_old_down_after_the_new_prepared(
        old: dict[str, object], new: dict[str, object]) -> None:
    """Case 4: teardown runs between the new backend's prepare and its full sync (vxlan and
    host-gw want the same route keys)."""
    plan = plan_config_change(cfg(old), cfg(new), lease4(), None)
    assert not plan.same_device and not plan.network_changed and plan.keeps_lease
    steps = plan.steps
    assert steps.index("prepare new") < steps.index("teardown old") < steps.index("full sync")
    assert steps[0] == "prepare new", "the old instance keeps serving until then"


def test_network_change_outside_our_subnet_tears_down_first_and_renumbers() -> None:
    """Cases 2 and 3: the old entries belong to another network: removed before anything
    else; our subnet does not fit, so a new key is leased, no subnet kept as a hint."""
    plan = plan_config_change(cfg(), cfg(Network="10.9.0.0/16"), lease4(), None)
    assert plan.network_changed and not plan.keeps_lease and plan.kept_subnet is None
    assert plan.steps[:3] == ("shutdown old", "teardown old", "prepare new")
    assert "lease new key" in plan.steps
    renumbering, text = relabel_notice(lease4(), cfg(Network="10.9.0.0/16"))
    assert renumbering and "must be re-attached" in text and "10.9.0.0/16" in text


def test_network_grown_around_our_subnet_keeps_the_lease_but_still_sweeps() -> None:
    plan = plan_config_change(cfg(), cfg(Network="10.0.0.0/8", SubnetLen=24), lease4(), None)
    assert plan.network_changed and plan.keeps_lease and plan.kept_subnet == SUB


def test_ipv6_turned_on_finds_the_public_ipv6_and_relabels_keeping_the_ipv4_subnet() -> None:
    plan = plan_config_change(cfg(), cfg(**DUAL), lease4(), None)
    assert plan.refresh_host and not plan.network_changed and plan.same_device
    assert not plan.keeps_lease and plan.kept_subnet == SUB and plan.drop_families == ()
    renumbering, text = relabel_notice(lease4(), cfg(**DUAL))
    assert not renumbering and "IPv6 is on" in text
    known = plan_config_change(cfg(), cfg(**DUAL), lease4(), PUB6)
    assert not known.refresh_host, "a public IPv6 found at start is reused"


def test_ipv6_turned_off_removes_only_the_ipv6_entries() -> None:
    plan = plan_config_change(cfg(**DUAL), cfg(), lease_dual(), PUB6)
    assert plan.drop_families == (6,) and not plan.network_changed and not plan.refresh_host
    assert not plan.keeps_lease and plan.kept_subnet == SUB and plan.kept_subnet6 is None
    assert "remove IPv6 entries" in plan.steps
    assert plan.steps.index("prepare new") < plan.steps.index("remove IPv6 entries")


def test_ipv4_turned_off_keeps_the_ipv6_subnet_and_finds_the_host_again() -> None:
    plan = plan_config_change(cfg(**DUAL), cfg(**V6ONLY), lease_dual(), PUB6)
    assert plan.drop_families == (4,) and plan.refresh_host and not plan.network_changed
    assert plan.kept_subnet is None and plan.kept_subnet6 == SUB6
    _, text = relabel_notice(lease_dual(), cfg(**V6ONLY))
    assert "IPv4 is off" in text


def test_switch_to_another_family_entirely_is_a_network_change() -> None:
    v6 = Lease(None, LeaseAttrs(public_ip=NO_PUBLIC_IP, public_ipv6=PUB6), SUB6, 1)
    plan = plan_config_change(cfg(**V6ONLY), cfg(), v6, PUB6)
    assert plan.network_changed and plan.refresh_host and plan.drop_families == ()


def test_a_family_dropped_with_a_backend_switch_goes_with_the_old_backend() -> None:
    plan = plan_config_change(cfg(**DUAL), cfg({"Type": "host-gw"}), lease_dual(), PUB6)
    assert plan.dropped_families == (6,) and plan.drop_families == ()
    assert plan.teardown_old_after_prepare


@pytest.mark.parametrize(("doc", "words"), [
    ({"Network": "10.5.0.0/16", "Backend": {"Type": "ipsec"}}, "not implemented"),
    ({"Network": "10.5.0.0/16", "Backend": {"Type": "ipip"}}, "not implemented"),
    ({"Network": "10.5.0.0/16", **DUAL, "Backend": {"Type": "udp"}}, "udp carries IPv4 only"),
])
def test_check_runnable_names_why(doc: dict[str, object], words: str) -> None:
    why = check_runnable(parse_network_config(json.dumps(doc)))
    assert words in why and why.startswith("Backend.Type")


def test_check_runnable_accepts_what_the_table_and_hooks_allow() -> None:
    for t in ("vxlan", "host-gw", "udp", "alloc"):
        assert check_runnable(cfg({"Type": t})) == ""
    assert check_runnable(cfg({"Type": "vxlan"}, **DUAL)) == ""
