"""IPv6-only networks end to end (issue 9, ``"EnableIPv4": false``).

Three namespace hosts with **no IPv4 at all** (no address, no route; etcd reached over IPv6),
the real agent on each, pods with IPv6 only. Pods ping each other on vxlan (``flannel-v6.1``
alone) and host-gw; the lease key is ``0.0.0.0-0&<ipv6>-<len>`` (flannel's key grammar with its
empty IPv4 part) with PublicIP 0.0.0.0; a restart finds its lease again by PublicIPv6 and makes
no kernel change; a deleted lease's entries leave the peers; ``--ip-masq`` installs ip6tables
rules. A live switch of a dual-stack network to IPv6-only re-leases every host cleanly.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from ipaddress import IPv6Interface, IPv6Network
from pathlib import Path
from typing import Any

import pytest
from support.harness import RUN_ID, Host, Lab, PingRun, Pod, kernel_state, read_env_file, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

PREFIX = "/coreos.com/network"
NETWORK6 = "fd43:43::/48"
CONFIG6 = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": NETWORK6}


@pytest.fixture
def lab6(tmp_path: Path) -> Iterator[Lab]:
    """A lab whose hosts have IPv6 only; etcd listens on the underlay's IPv6 address."""
    world = Lab(tmp_path, tag="s", ipv4=False)
    try:
        world.start_etcd()
        yield world
    finally:
        world.close()


def start(lab: Lab, backend: dict[str, Any], *args: str) -> tuple[list[Host], list[Pod]]:
    hosts = lab.start_hosts(json.dumps({**CONFIG6, "Backend": backend}), 3,
                            "--repair-interval", "2", *args)
    pods = [lab.add_pod(h, bridge=f"nb{RUN_ID}") for h in hosts]
    return hosts, pods


def subnet6(host: Host) -> IPv6Network:
    return IPv6Interface(read_env_file(host.subnet_file)["FLANNEL_IPV6_SUBNET"]).network


def key6(subnet: IPv6Network) -> str:
    return f"0.0.0.0-0&{subnet.network_address}-{subnet.prefixlen}"


def ping6_all(pods: list[Pod]) -> None:
    for a in pods:
        for b in pods:
            if a is not b:
                wait_for(lambda a=a, b=b: a.ping(b.ip6), timeout=20, interval=0.2,
                         what=f"ping {a.name} → {b.ip6}")


def route6(host: Host, subnet: IPv6Network) -> str:
    return host.run("ip", "-6", "route", "show", str(subnet), check=False).stdout.strip()


def kernel6(host: Host) -> tuple[list[str], ...]:
    def table(*cmd: str) -> list[str]:
        return sorted(json.dumps(x, sort_keys=True)
                      for x in json.loads(host.run(*cmd).stdout or "[]"))

    return (table("ip", "-6", "-j", "route", "show", "table", "main"),
            table("ip", "-6", "-j", "neigh", "show", "dev", "flannel-v6.1", "nud", "permanent"),
            table("bridge", "-j", "fdb", "show", "dev", "flannel-v6.1"),
            table("ip", "-j", "link", "show"))


@pytest.mark.parametrize("backend", [{"Type": "vxlan"}, {"Type": "host-gw"}],
                         ids=["vxlan", "host-gw"])
def test_ipv6_only_pods_ping(lab6: Lab, backend: dict[str, Any]) -> None:
    hosts, pods = start(lab6, backend, "--ip-masq")
    for h in hosts:  # really IPv6-only: no IPv4 address beyond loopback, no IPv4 route
        assert h.run("ip", "-4", "-o", "addr", "show", "scope", "global").stdout == ""
        assert h.run("ip", "-4", "route", "show").stdout == ""
    ping6_all(pods)
    h1, h2 = hosts[0], hosts[1]
    env = read_env_file(h1.subnet_file)
    assert set(env) == {"FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET", "FLANNEL_MTU",
                        "FLANNEL_IPMASQ"}, env
    assert env["FLANNEL_IPV6_NETWORK"] == NETWORK6 and env["FLANNEL_IPMASQ"] == "true"
    s1, s2 = subnet6(h1), subnet6(h2)
    leases = lab6.leases()
    assert set(leases) == {key6(subnet6(h)) for h in hosts}, leases
    got = route6(h1, s2)
    if backend["Type"] == "vxlan":
        assert env["FLANNEL_MTU"] == "1430"
        assert h1.run("ip", "link", "show", "flannel.1", check=False).returncode != 0, \
            "no IPv4 vxlan device in an IPv6-only network"
        mac6 = h1.run("cat", "/sys/class/net/flannel-v6.1/address").stdout.strip()
        assert leases[key6(s1)] == (
            f'{{"PublicIP":"0.0.0.0","PublicIPv6":"{h1.ip6}","BackendType":"vxlan",'
            f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}')
        assert f"via {s2.network_address} dev flannel-v6.1" in got and "onlink" in got, got
    else:
        assert env["FLANNEL_MTU"] == "1500"
        assert leases[key6(s1)] == (
            f'{{"PublicIP":"0.0.0.0","PublicIPv6":"{h1.ip6}","BackendType":"host-gw"}}')
        assert f"via {h2.ip6} dev eth0" in got, got
    assert "proto 111" in got, got

    # --ip-masq: ip6tables rules in place (and the agent ready, which requires them)
    st = h1.status()
    assert st["ready"] and st["masquerade"] == "in place", st
    assert st["subnet"] == str(s1) and st["public_ip"] == h1.ip6, st
    assert f"-A FLANNEL-POSTRTG -s {NETWORK6} ! -d ff00::/8" in h1.run("ip6tables-save").stdout
    assert "FLANNEL" not in h1.run("iptables-save").stdout

    # a hand-deleted IPv6 route comes back within the repair interval (2 s)
    h1.run("ip", "-6", "route", "del", str(s2))
    wait_for(lambda: route6(h1, s2) != "", timeout=10, what="the IPv6 route to come back")
    assert pods[0].ping(pods[1].ip6)


def test_ipv6_only_restart_reuses_lease_and_delete_sweeps(lab6: Lab) -> None:
    hosts, pods = start(lab6, {"Type": "vxlan"})
    ping6_all(pods)
    h1, h2, h3 = hosts
    assert lab6.etcd is not None
    s1 = subnet6(h1)
    revision_key = key6(s1)

    # SIGKILL + restart (no subnet.env hint: the lease is found by PublicIPv6) → same lease,
    # zero kernel changes, no lease write
    before = kernel6(h1)
    value_before = lab6.leases()[revision_key]
    lab6.stop_agent(h1, signal.SIGKILL)
    h1.subnet_file.unlink()
    (h1.state_dir / "status.json").unlink()
    mark = len(lab6.log(h1))
    lab6.start_agent(h1, "--repair-interval", "2")
    wait_for(lambda: h1.status().get("reconciles", 0) >= 2, timeout=60,
             what="the restarted agent's first syncs")
    restarted = lab6.log(h1)[mark:]
    assert f"found lease {revision_key} for {h1.ip6}, reusing" in restarted, restarted
    assert subnet6(h1) == s1
    assert kernel6(h1) == before
    assert "reconciled" not in restarted, restarted
    assert lab6.leases()[revision_key] == value_before

    # a peer's lease deleted: its entries leave both other hosts
    s3 = subnet6(h3)
    lab6.stop_agent(h3, signal.SIGKILL)
    t0 = time.monotonic()
    lab6.etcd.ctl("del", f"{PREFIX}/subnets/{key6(s3)}")
    for h in (h1, h2):
        wait_for(lambda h=h: route6(h, s3) == "" and str(s3.network_address) not in
                 h.run("ip", "-6", "neigh", "show", "dev", "flannel-v6.1").stdout and
                 h3.ip6 not in h.run("bridge", "fdb", "show", "dev", "flannel-v6.1").stdout,
                 timeout=10, interval=0.02, what=f"{h.name} to drop {s3}")
    print(f"IPv6-only lease delete → entries gone on both peers in {time.monotonic() - t0:.3f} s")
    assert pods[0].ping(pods[1].ip6) and pods[1].ping(pods[0].ip6)


def v6_state(host: Host) -> dict[str, list[str]]:
    """The IPv6 routes, neighbours and FDB entries, less flannel.1's link-local route."""
    state = kernel_state(host.name, ["flannel-v6.1"], family=6)
    state["routes"] = [r for r in state["routes"] if "dev flannel.1 " not in r]
    return state


def link_index(host: Host, dev: str = "flannel-v6.1") -> str:
    return host.run("cat", f"/sys/class/net/{dev}/ifindex").stdout.strip()


def assert_v6_side_untouched(lab: Lab, host: Host,
                             before: tuple[dict[str, list[str]], str]) -> None:
    """flannel-v6.1 is the same device, its entries are as they were (the difference is
    shown), and no drift repair ran."""
    was, index = before
    assert link_index(host) == index, f"{host.name}: flannel-v6.1 was recreated"
    now = v6_state(host)
    assert now == was, {k: (sorted(set(was[k]) - set(now[k])), sorted(set(now[k]) - set(was[k])))
                        for k in was if was[k] != now[k]}
    assert "drift repair" not in lab.log(host)


def test_live_switch_dual_stack_to_ipv6_only(lab: Lab) -> None:
    """etcdctl put of a config with EnableIPv4 false: every host's lease key becomes
    ``0.0.0.0-0&…`` with the same IPv6 subnet, flannel.1 and the IPv4 routes go, subnet.env is
    rewritten IPv6-only, and the pods' IPv6 addresses keep working without a re-attach: the
    IPv6 side (flannel-v6.1, its neighbours, FDB entries and routes) is never touched, so a
    ping across the switch loses nothing."""
    assert lab.etcd is not None
    dual = {"Network": "10.44.0.0/16", "EnableIPv6": True, "IPv6Network": NETWORK6,
            "Backend": {"Type": "vxlan"}}
    hosts = lab.start_hosts(json.dumps(dual), 3, "--repair-interval", "2")
    pods = [lab.add_pod(h, bridge=f"nd{RUN_ID}") for h in hosts]
    ping6_all(pods)
    before = {h.name: subnet6(h) for h in hosts}
    v6_side = {h.name: (v6_state(h), link_index(h)) for h in hosts}
    run = PingRun(pods[0], pods[1].ip6, seconds=8, interval=0.05)
    time.sleep(1.0)
    lab.etcd.put(f"{PREFIX}/config", json.dumps({**CONFIG6, "Backend": {"Type": "vxlan"}}))
    for h in hosts:
        wait_for(lambda h=h: "FLANNEL_SUBNET" not in read_env_file(h.subnet_file),
                 timeout=30, what=f"{h.name} to rewrite subnet.env IPv6-only")
        assert subnet6(h) == before[h.name], "the IPv6 subnet is kept"
    wait_for(lambda: set(lab.leases()) == {key6(s) for s in before.values()}, timeout=30,
             what="only the IPv6-only keys left (the dual-stack keys deleted)")
    for h in hosts:
        wait_for(lambda h=h: h.run("ip", "link", "show", "flannel.1",
                                   check=False).returncode != 0,
                 timeout=10, what=f"{h.name} to remove flannel.1")
        wait_for(lambda h=h: h.status().get("peers") == 2, timeout=10, what="2 peers")
        assert "proto 111" not in h.run("ip", "-4", "route", "show").stdout
        assert "IPv4 is off" in lab.log(h) and "RENUMBERING" not in lab.log(h)
    sent, got = run.result()
    print(f"IPv6 ping across dual stack → IPv6-only: {sent} sent, {got} received")
    assert sent > 100 and got == sent, (sent, got)
    for h in hosts:
        assert_v6_side_untouched(lab, h, v6_side[h.name])
    ping6_all(pods)  # the same pods, no re-attach


def test_live_switch_ipv6_only_to_dual_stack(lab: Lab) -> None:
    """IPv4 turned on for an IPv6-only network: each host's key becomes ``a.b.c.d-24&…`` with
    the same IPv6 subnet, flannel.1 appears beside flannel-v6.1, and the IPv6 side is never
    touched (the hosts' IPv6-only keys stay peers until their dual-stack keys replace them),
    so an IPv6 ping across the switch loses nothing; pods attached afterwards ping over both."""
    assert lab.etcd is not None
    hosts = lab.start_hosts(json.dumps({**CONFIG6, "Backend": {"Type": "vxlan"}}), 3,
                            "--repair-interval", "2")
    pods = [lab.add_pod(h, bridge=f"nu{RUN_ID}") for h in hosts]
    ping6_all(pods)
    before = {h.name: subnet6(h) for h in hosts}
    v6_side = {h.name: (v6_state(h), link_index(h)) for h in hosts}
    run = PingRun(pods[0], pods[1].ip6, seconds=8, interval=0.05)
    time.sleep(1.0)
    lab.etcd.put(f"{PREFIX}/config", json.dumps({**CONFIG6, "EnableIPv4": True,
                                                 "Network": "10.47.0.0/16",
                                                 "Backend": {"Type": "vxlan"}}))
    for h in hosts:
        wait_for(lambda h=h: "FLANNEL_SUBNET" in read_env_file(h.subnet_file),
                 timeout=30, what=f"{h.name} to add IPv4 to subnet.env")
        assert subnet6(h) == before[h.name], "the IPv6 subnet is kept"
    wait_for(lambda: len(lab.leases()) == 3 and all(
        not k.startswith("0.0.0.0-0&") for k in lab.leases()), timeout=30,
        what="only dual-stack keys left")
    for h in hosts:
        wait_for(lambda h=h: h.status().get("peers") == 2, timeout=10, what="2 peers")
        assert "IPv4 is on" in lab.log(h) and "RENUMBERING" not in lab.log(h)
    sent, got = run.result()
    print(f"IPv6 ping across IPv6-only → dual stack: {sent} sent, {got} received")
    assert sent > 100 and got == sent, (sent, got)
    for h in hosts:
        assert_v6_side_untouched(lab, h, v6_side[h.name])
    dual_pods = [lab.add_pod(h, bridge=f"nu{RUN_ID}") for h in hosts]
    for a in dual_pods:
        for b in dual_pods:
            if a is not b:
                for dst in (b.ip, b.ip6):
                    wait_for(lambda a=a, dst=dst: a.ping(dst), timeout=20, interval=0.2,
                             what=f"ping {a.name} → {dst}")
