"""`netagent cleanup`'s plan (pure): what is removed, in which order, and what is kept.

The plan decides on a :class:`HostView` (what the survey read), so every ownership rule is
checked here without root: only our device names, only proto 111/112 routes, a routed pod's
route and a bridge with ports kept while a pod uses them, processes stopped before their
devices go, and an empty plan (a second run) for a host with nothing of ours.
"""

from __future__ import annotations

import os
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path

import pytest

from netagent.blackhole import blackhole_route
from netagent.cleanup import RTPROT_CNI_POD, HostView, Step, plan_cleanup
from netagent.cni.conf import POD_ROUTE_PROTO
from netagent.files import run_lock_holder, take_run_lock
from netagent.kernel import LinkSummary, Route

REPO = Path(__file__).resolve().parents[2]
LO = LinkSummary(1, "lo", "", None)
ETH = LinkSummary(2, "eth0", "", None)
VX = LinkSummary(5, "flannel.1", "vxlan", None)
VX6 = LinkSummary(6, "flannel-v6.1", "vxlan", None)
TUN = LinkSummary(7, "flannel0", "tun", None)
WG = LinkSummary(8, "flannel-wg", "wireguard", None)
CNI0 = LinkSummary(9, "cni0", "bridge", None)
FOREIGN = [LinkSummary(20, "flannel.x", "vxlan", None), LinkSummary(21, "flannel11", "dummy", None),
           LinkSummary(22, "vxlan.1", "vxlan", None), LinkSummary(23, "cni0", "veth", None)]


def peer(i: int, oif: int) -> Route:
    return Route(IPv4Network(f"10.5.{i}.0/24"), IPv4Address(f"10.5.{i}.0"), oif, onlink=True)


def kinds(steps: list[Step]) -> list[tuple[str, str]]:
    return [(s.kind, s.desc) for s in steps]


def test_pod_route_proto_matches_the_cni_plugin() -> None:
    assert RTPROT_CNI_POD == POD_ROUTE_PROTO


def test_everything_of_ours_in_order_and_nothing_foreign() -> None:
    hostgw = Route(IPv4Network("10.5.3.0/24"), IPv4Address("192.168.1.3"), ETH.index)
    stale_pod = Route(IPv4Network("10.5.1.9/32"), None, ETH.index, proto=RTPROT_CNI_POD)
    view = HostView(
        links=(LO, ETH, VX, VX6, TUN, WG, CNI0, *FOREIGN),
        routes=(peer(2, VX.index), peer(4, VX.index), hostgw, blackhole_route(
            IPv4Network("10.5.1.0/24")), Route(IPv6Network("fd00:5:2::/64"), None, VX6.index),
            stale_pod),
        iptables=(4, 6), wireguard_go=(("flannel-wg", 4242),), bird=777)
    steps, kept = plan_cleanup(view)
    assert [s.kind for s in steps] == ["stop-bird", "stop-wireguard-go", "route", "route",
                                       "route", "link", "link", "link", "link", "link",
                                       "iptables", "iptables"]
    routes = [s.target for s in steps if s.kind == "route"]
    assert routes == [hostgw, blackhole_route(IPv4Network("10.5.1.0/24")), stale_pod], \
        "routes on a device we delete go with it; the rest one by one"
    links = [s.target.name for s in steps if s.kind == "link"]
    assert links == ["flannel.1", "flannel-v6.1", "flannel0", "flannel-wg", "cni0"]
    assert "flannel.1 (vxlan) and its 2 routes" in steps[5].desc
    assert kept == []


def test_pods_in_use_keep_the_bridge_and_their_routes() -> None:
    port = LinkSummary(30, "veth1234", "veth", CNI0.index)
    routed = LinkSummary(31, "nap5678", "veth", None)
    pod_route = Route(IPv4Network("10.5.1.7/32"), None, routed.index, proto=RTPROT_CNI_POD)
    steps, kept = plan_cleanup(HostView(links=(LO, VX, CNI0, port, routed),
                                        routes=(pod_route, peer(2, VX.index))))
    assert [(s.kind, s.target.name) for s in steps] == [("link", "flannel.1")]
    assert any("bridge cni0: 1 pod interface(s) attached (veth1234)" == k for k in kept)
    assert any("10.5.1.7/32 dev nap5678" in k for k in kept)


def test_a_host_with_nothing_of_ours_plans_nothing() -> None:
    view = HostView(links=(LO, ETH, *FOREIGN),
                    routes=(Route(IPv4Network("10.9.0.0/24"), None, ETH.index, proto=3),))
    assert plan_cleanup(view) == ([], [])
    assert plan_cleanup(HostView()) == ([], [])


def test_another_bridge_name_is_honoured() -> None:
    br = LinkSummary(40, "docker-cni", "bridge", None)
    steps, _ = plan_cleanup(HostView(links=(CNI0, br), bridge="docker-cni"))
    assert [s.target.name for s in steps] == ["docker-cni"]


def test_run_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    """The agent's mark that it runs: a flock, so a crashed agent never blocks a cleanup and
    a reused PID never fakes a running one."""
    state = tmp_path / "state"
    assert run_lock_holder(state) is None  # no state dir: nothing runs
    fd = take_run_lock(state)
    assert fd is not None
    assert run_lock_holder(state) == os.getpid()
    assert take_run_lock(state) is None, "a second holder is refused"
    os.close(fd)  # what process exit (even SIGKILL) does
    assert run_lock_holder(state) is None
    fd2 = take_run_lock(state)
    assert fd2 is not None
    os.close(fd2)
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from netagent.files import take_run_lock; fd = take_run_lock(sys.argv[2]);"
        "print(fd is not None, flush=True); time.sleep(30)"), str(REPO), str(state)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "True"
        assert run_lock_holder(state) == child.pid
        child.kill()
        child.wait(5)
        assert run_lock_holder(state) is None, "SIGKILL released it"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)


def test_command_refuses_while_an_agent_holds_the_state_dir_and_on_bad_settings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both refusals come before anything is read or removed (no root needed to see them)."""
    from netagent.cli import main

    fd = take_run_lock(tmp_path)
    assert fd is not None
    try:
        for extra in ((), ("--dry-run",)):
            assert main(["cleanup", "--state-dir", str(tmp_path), *extra]) == 1
            err = capsys.readouterr().err
            assert f"agent is running (PID {os.getpid()}" in err and "Nothing removed" in err
    finally:
        os.close(fd)
    assert main(["cleanup", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml" in capsys.readouterr().err
