"""Dual stack end to end (issue 9): three namespace hosts with IPv4 and IPv6 underlay addresses,
the real agent on each against a real etcd, pods with both families on a bridge per host.

Pods ping each other over IPv4 and IPv6 on vxlan (``flannel.1`` + ``flannel-v6.1``), host-gw and
vxlan with DirectRouting; the leases are byte-compared with flannel's dual-stack format; the IPv6
entries survive a SIGKILL restart untouched, come back after a hand delete and leave with the
peer's lease.
"""

from __future__ import annotations

import json
import re
import signal
import time
from ipaddress import IPv6Interface, IPv6Network
from typing import Any

import pytest
from support.harness import RUN_ID, Host, Lab, PingRun, Pod, kernel_state, read_env_file, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

PREFIX = "/coreos.com/network"
NETWORK6 = "fd42:42::/48"


def start_dual(lab: Lab, backend: dict[str, Any]) -> tuple[list[Host], list[Pod]]:
    hosts = lab.start_hosts(json.dumps({
        "Network": "10.43.0.0/16", "EnableIPv6": True, "IPv6Network": NETWORK6,
        "Backend": backend}), 3, "--repair-interval", "2")
    pods = [lab.add_pod(h, bridge=f"nb{RUN_ID}") for h in hosts]
    return hosts, pods


def subnet6(host: Host) -> IPv6Network:
    return IPv6Interface(read_env_file(host.subnet_file)["FLANNEL_IPV6_SUBNET"]).network


def ping_all_families(pods: list[Pod]) -> None:
    for a in pods:
        for b in pods:
            if a is b:
                continue
            for dst in (b.ip, b.ip6):
                wait_for(lambda a=a, dst=dst: a.ping(dst), timeout=20, interval=0.2,
                         what=f"ping {a.name} → {dst}")


def route6(host: Host, subnet: IPv6Network) -> str:
    return host.run("ip", "-6", "route", "show", str(subnet), check=False).stdout.strip()


def v6_state(host: Host, dev: str) -> tuple[list[str], ...]:
    def table(*cmd: str) -> list[str]:
        return sorted(json.dumps(x, sort_keys=True)
                      for x in json.loads(host.run(*cmd).stdout or "[]"))

    return (table("ip", "-6", "-j", "route", "show", "table", "main"),
            table("ip", "-6", "-j", "neigh", "show", "dev", dev, "nud", "permanent"),
            table("bridge", "-j", "fdb", "show", "dev", dev),
            table("ip", "-4", "-j", "route", "show", "table", "main"))


@pytest.mark.parametrize(
    "backend", [{"Type": "vxlan"}, {"Type": "host-gw"}, {"Type": "vxlan", "DirectRouting": True}],
    ids=["vxlan", "host-gw", "directrouting"])
def test_pods_ping_over_both_families(lab: Lab, backend: dict[str, Any]) -> None:
    hosts, pods = start_dual(lab, backend)
    ping_all_families(pods)
    h1, h2 = hosts[0], hosts[1]
    s6 = subnet6(h2)
    got = route6(h1, s6)
    if backend == {"Type": "vxlan"}:
        assert f"via {s6.network_address} dev flannel-v6.1" in got and "onlink" in got, got
        assert "proto 111" in got, got
    else:  # host-gw, and DirectRouting between hosts on one segment: straight to PublicIPv6
        assert f"via {h2.ip6} dev eth0" in got and "proto 111" in got, got

    # a hand-deleted IPv6 route comes back within the repair interval (2 s)
    h1.run("ip", "-6", "route", "del", str(s6))
    wait_for(lambda: route6(h1, s6) != "", timeout=10, what="the IPv6 route to come back")
    assert pods[0].ping(pods[1].ip6)


def test_vxlan_dual_stack_devices_leases_restart_and_delete(lab: Lab) -> None:
    hosts, pods = start_dual(lab, {"Type": "vxlan"})
    ping_all_families(pods)
    h1, h2, h3 = hosts
    assert lab.etcd is not None

    # the IPv6 device: MTU − 70, our subnet's network address as /128, no router adverts
    env = read_env_file(h1.subnet_file)
    assert env["FLANNEL_MTU"] == "1430" and env["FLANNEL_IPV6_NETWORK"] == NETWORK6
    link = json.loads(h1.run("ip", "-j", "-d", "addr", "show", "flannel-v6.1").stdout)[0]
    assert link["mtu"] == 1430 and link["linkinfo"]["info_data"]["local6"] == h1.ip6
    own6 = subnet6(h1)
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["scope"] == "global"] \
        == [(str(own6.network_address), 128)]
    assert h1.run("sysctl", "-n", "net.ipv6.conf.flannel-v6/1.accept_ra").stdout.strip() == "0"
    assert json.loads(h1.run("ip", "-j", "-d", "link", "show", "flannel.1").stdout)[0]["mtu"] \
        == 1450

    # leases in flannel's dual-stack format, key and value
    mac4 = h1.run("cat", "/sys/class/net/flannel.1/address").stdout.strip()
    mac6 = link["address"]
    s1 = h1.subnet()
    key = f"{s1.network_address}-{s1.prefixlen}&{own6.network_address}-{own6.prefixlen}"
    assert lab.leases()[key] == (
        f'{{"PublicIP":"{h1.ip}","PublicIPv6":"{h1.ip6}","BackendType":"vxlan",'
        f'"BackendData":{{"VNI":1,"VtepMAC":"{mac4}"}},'
        f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}')

    # the peer's IPv6 entries on h1: neighbour, FDB entry to its PublicIPv6, onlink route
    s2_6 = subnet6(h2)
    mac6_2 = h2.run("cat", "/sys/class/net/flannel-v6.1/address").stdout.strip()
    neigh = h1.run("ip", "-6", "neigh", "show", "dev", "flannel-v6.1", "nud", "permanent").stdout
    assert f"{s2_6.network_address} lladdr {mac6_2}" in neigh, neigh
    assert f"{mac6_2} dst {h2.ip6} self permanent" in h1.run(
        "bridge", "fdb", "show", "dev", "flannel-v6.1").stdout

    # SIGKILL + restart: zero kernel changes in either family
    before = v6_state(h1, "flannel-v6.1")
    lab.stop_agent(h1, signal.SIGKILL)
    mark = len(lab.log(h1))
    (h1.state_dir / "status.json").unlink()
    lab.start_agent(h1, "--repair-interval", "2")
    wait_for(lambda: h1.status().get("reconciles", 0) >= 2, timeout=60,
             what="the restarted agent's first syncs")
    assert v6_state(h1, "flannel-v6.1") == before
    restarted = lab.log(h1)[mark:]
    assert "ready" in restarted and "reconciled" not in restarted, restarted
    assert h1.run("cat", "/sys/class/net/flannel-v6.1/address").stdout.strip() == mac6

    # a peer's lease deleted: its IPv6 entries leave the other hosts too
    s3_6 = subnet6(h3)
    s3 = h3.subnet()
    lab.stop_agent(h3, signal.SIGKILL)
    t0 = time.monotonic()
    lab.etcd.ctl("del", f"{PREFIX}/subnets/{s3.network_address}-{s3.prefixlen}"
                        f"&{s3_6.network_address}-{s3_6.prefixlen}")
    for h in (h1, h2):
        wait_for(lambda h=h: route6(h, s3_6) == "" and str(s3_6.network_address) not in
                 h.run("ip", "-6", "neigh", "show", "dev", "flannel-v6.1").stdout and
                 h3.ip6 not in h.run("bridge", "fdb", "show", "dev", "flannel-v6.1").stdout,
                 timeout=10, interval=0.02, what=f"{h.name} to drop {s3_6}")
    print(f"lease delete → IPv6 entries gone on both peers in {time.monotonic() - t0:.3f} s")
    assert pods[0].ping(pods[1].ip6) and pods[1].ping(pods[0].ip6)


def test_peer_without_ipv6_keeps_its_ipv4_entries(lab: Lab) -> None:
    """A flannel peer whose lease lacks the IPv6 side (written by hand here) is reported, and
    its IPv4 entries are still programmed."""
    hosts, pods = start_dual(lab, {"Type": "vxlan"})
    h1 = hosts[0]
    assert lab.etcd is not None
    lab.etcd.put(f"{PREFIX}/subnets/10.43.250.0-24",
                 '{"PublicIP":"10.9.9.9","PublicIPv6":null,"BackendType":"vxlan",'
                 '"BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:fa"}}')
    wait_for(lambda: "10.43.250.0/24" in h1.status().get("skipped_peers", {}), timeout=10,
             what="the half lease to be reported")
    assert "IPv6" in h1.status()["skipped_peers"]["10.43.250.0/24"]
    wait_for(lambda: "via 10.43.250.0 dev flannel.1" in h1.run(
        "ip", "route", "show", "10.43.250.0/24").stdout, timeout=10, what="its IPv4 route")
    assert len(re.findall(r"skipping peer 10\.43\.250\.0/24", lab.log(h1))) == 1
    ping_all_families(pods)


def test_live_enable_ipv6_keeps_ipv4_subnets_and_traffic(lab: Lab) -> None:
    """An IPv4 vxlan network switched to dual stack with etcdctl: each host's key gains its
    IPv6 part with the same IPv4 subnet (new key written before the old one is deleted), the
    IPv4 entries stay untouched (a ping across the switch loses nothing), and pods attached
    afterwards get IPv6 and reach each other over it."""
    assert lab.etcd is not None
    v4 = {"Network": "10.45.0.0/16", "Backend": {"Type": "vxlan"}}
    hosts = lab.start_hosts(json.dumps(v4), 3, "--repair-interval", "2")
    pods = [lab.add_pod(h, bridge=f"n4{RUN_ID}") for h in hosts]
    wait_for(lambda: all(a.ping(b.ip) for a in pods for b in pods if a is not b), timeout=30,
             interval=0.3, what="IPv4 pods reach each other")
    subnets = {h.name: h.subnet() for h in hosts}
    run = PingRun(pods[0], pods[1].ip, seconds=8, interval=0.05)
    time.sleep(1.0)
    t0 = time.monotonic()
    lab.etcd.put(f"{PREFIX}/config", json.dumps({**v4, "EnableIPv6": True,
                                                 "IPv6Network": NETWORK6}))
    for h in hosts:
        wait_for(lambda h=h: "FLANNEL_IPV6_SUBNET" in read_env_file(h.subnet_file),
                 timeout=30, what=f"{h.name} to add IPv6 to subnet.env")
    print(f"enable IPv6: subnet.env rewritten on every host in {time.monotonic() - t0:.2f} s")
    sent, got = run.result()
    print(f"IPv4 ping across the switch: {sent} sent, {got} received")
    assert sent > 100 and got == sent, (sent, got)
    for h in hosts:
        assert h.subnet() == subnets[h.name]
        assert "IPv6 is on" in lab.log(h) and "RENUMBERING" not in lab.log(h)
    leases = lab.leases()
    assert set(leases) == {f"{s.network_address}-{s.prefixlen}&{subnet6(h).network_address}-"
                           f"{subnet6(h).prefixlen}" for h in hosts for s in [subnets[h.name]]}
    pods6 = [lab.add_pod(h, bridge=f"n4{RUN_ID}") for h in hosts]  # the same bridge
    ping_all_families(pods6)


@pytest.mark.parametrize("backend", [{"Type": "vxlan"}, {"Type": "host-gw"}],
                         ids=["vxlan", "host-gw"])
def test_live_disable_ipv6_leaves_the_ipv4_side_untouched(lab: Lab, backend: dict[str, Any]
                                                          ) -> None:
    """Dual stack → IPv4 only with etcdctl: each host's key loses its IPv6 part with the same
    IPv4 subnet, the IPv6 entries (and flannel-v6.1) go, and the IPv4 side is never touched —
    same routes, neighbours, FDB entries and flannel.1 — so an IPv4 ping loses nothing."""
    assert lab.etcd is not None
    v4 = {"Network": "10.46.0.0/16", "Backend": backend}
    hosts = lab.start_hosts(json.dumps({**v4, "EnableIPv6": True, "IPv6Network": NETWORK6}),
                            3, "--repair-interval", "2")
    pods = [lab.add_pod(h, bridge=f"n6{RUN_ID}") for h in hosts]
    ping_all_families(pods)
    subnets = {h.name: h.subnet() for h in hosts}
    vxlan = backend["Type"] == "vxlan"

    def v4_side(h: Host) -> tuple[Any, ...]:
        index = h.run("cat", "/sys/class/net/flannel.1/ifindex").stdout if vxlan else ""
        return kernel_state(h.name, ["flannel.1"] if vxlan else []), index

    before = {h.name: v4_side(h) for h in hosts}
    run = PingRun(pods[0], pods[1].ip, seconds=8, interval=0.05)
    time.sleep(1.0)
    lab.etcd.put(f"{PREFIX}/config", json.dumps(v4))
    for h in hosts:
        wait_for(lambda h=h: "FLANNEL_IPV6_SUBNET" not in read_env_file(h.subnet_file),
                 timeout=30, what=f"{h.name} to drop IPv6 from subnet.env")
    wait_for(lambda: set(lab.leases()) == {f"{s.network_address}-{s.prefixlen}"
                                           for s in subnets.values()},
             timeout=30, what="only the IPv4 keys left")
    for h in hosts:
        wait_for(lambda h=h: "proto 111" not in h.run("ip", "-6", "route", "show").stdout,
                 timeout=10, what=f"{h.name} to remove its IPv6 routes")
        assert h.run("ip", "link", "show", "flannel-v6.1", check=False).returncode != 0
        wait_for(lambda h=h: h.status().get("peers") == 2, timeout=10, what="2 peers")
    sent, got = run.result()
    print(f"{backend['Type']}: IPv4 ping across dual stack → IPv4-only: {sent} sent, "
          f"{got} received")
    assert sent > 100 and got == sent, (sent, got)
    for h in hosts:
        assert h.subnet() == subnets[h.name]
        assert v4_side(h) == before[h.name], f"{h.name}: the IPv4 side changed"
        log = lab.log(h)
        assert "IPv6 is off" in log and "RENUMBERING" not in log and "drift repair" not in log
    for a in pods:
        for b in pods:
            if a is not b:
                assert a.ping(b.ip), f"{a.name} → {b.ip}"
