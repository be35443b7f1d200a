"""End to end: three namespace hosts running the real agent against a real etcd.

Pods are extra namespaces hung off a bridge of our own on each host (not the CNI plugin), so
these tests exercise exactly the agent's part: leases → kernel entries → pod-to-pod traffic.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from ipaddress import IPv4Network
from typing import Any

import pytest
from support.harness import RUN_ID, Host, Lab, ping_all, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

PREFIX = "/coreos.com/network"
NETWORK = "10.42.0.0/16"


def net_config(backend: dict[str, Any]) -> str:
    return json.dumps({"Network": NETWORK, "Backend": backend})


def start_all(lab: Lab, backend: dict[str, Any], *extra: str) -> list[Host]:
    return lab.start_hosts(net_config(backend), 3, *extra)


def kernel_state(host: Host, dev: str | None) -> tuple[Any, ...]:
    routes = json.loads(host.run("ip", "-j", "route", "show", "table", "main").stdout)
    if dev is None:
        return (sorted(json.dumps(r, sort_keys=True) for r in routes),)
    neigh = json.loads(host.run("ip", "-j", "neigh", "show", "dev", dev, "nud",
                                "permanent").stdout or "[]")
    fdb = json.loads(host.run("bridge", "-j", "fdb", "show", "dev", dev).stdout or "[]")
    return tuple(sorted(json.dumps(x, sort_keys=True) for x in table)
                 for table in (routes, neigh, fdb))


def has_route(host: Host, subnet: IPv4Network) -> bool:
    return host.run("ip", "route", "show", str(subnet), check=False).stdout.strip() != ""


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("backend", "via_overlay"),
    [({"Type": "vxlan"}, True), ({"Type": "host-gw"}, False),
     ({"Type": "vxlan", "DirectRouting": True}, False)],
    ids=["vxlan", "host-gw", "directrouting"],
)
def test_mesh_ping_and_drift_repair(lab: Lab, backend: dict[str, Any],
                                    via_overlay: bool) -> None:
    hosts = start_all(lab, backend, "--repair-interval", "2")
    pods = [lab.add_pod(h, bridge=f"nb{RUN_ID}") for h in hosts]
    ping_all(pods)
    h1, h2 = hosts[0], hosts[1]
    s2 = h2.subnet()
    route = h1.run("ip", "route", "show", str(s2)).stdout
    if via_overlay:
        assert f"via {s2.network_address} dev flannel.1" in route and "onlink" in route
    else:
        assert f"via {h2.ip} dev eth0" in route
    assert "proto 111" in route
    # a hand-deleted route (and neighbour + FDB on vxlan) comes back on the kernel's deletion
    # event (tests/e2e/test_kernel_events.py times it)
    before = kernel_state(h1, "flannel.1" if via_overlay else None)
    h1.run("ip", "route", "del", str(s2))
    if via_overlay:
        h1.run("ip", "neigh", "del", str(s2.network_address), "dev", "flannel.1")
        mac = json.loads(lab.etcd.get(  # type: ignore[union-attr]
            f"{PREFIX}/subnets/{s2.network_address}-{s2.prefixlen}") or "{}"
        )["BackendData"]["VtepMAC"]
        h1.run("bridge", "fdb", "del", mac, "dev", "flannel.1", "dst", h2.ip)
    wait_for(lambda: kernel_state(h1, "flannel.1" if via_overlay else None) == before,
             timeout=15, interval=0.2, what="the entries restored")
    assert "kernel event: 1 deleted kernel entries restored" in lab.log(h1)
    assert pods[0].ping(pods[1].ip)
    # a changed route (no deletion, so no event) comes back with the repair timer
    dev, gw = ("flannel.1", hosts[2].subnet().network_address) if via_overlay else ("eth0",
                                                                                  hosts[2].ip)
    h1.run("ip", "route", "replace", str(s2), "via", str(gw), "dev", dev, "onlink", "proto",
           "111")
    assert kernel_state(h1, "flannel.1" if via_overlay else None) != before
    wait_for(lambda: kernel_state(h1, "flannel.1" if via_overlay else None) == before,
             timeout=15, interval=0.2, what="drift repair to restore the route")
    assert "drift repair" in lab.log(h1)
    assert pods[0].ping(pods[1].ip)


def test_vxlan_restart_lease_delete_and_malformed(lab: Lab) -> None:
    hosts = start_all(lab, {"Type": "vxlan"}, "--repair-interval", "30")
    pods = [lab.add_pod(h, bridge=f"nb{RUN_ID}") for h in hosts]
    ping_all(pods)
    h1, h2, h3 = hosts
    assert lab.etcd is not None

    # malformed peer leases: skipped with a reason, the rest keeps working
    bad_mac = IPv4Network("10.42.250.0/24")
    bad_json = IPv4Network("10.42.251.0/24")
    lab.etcd.put(f"{PREFIX}/subnets/10.42.250.0-24",
                 '{"PublicIP":"10.9.9.9","PublicIPv6":null,"BackendType":"vxlan",'
                 '"BackendData":{"VNI":1,"VtepMAC":"not-a-mac"}}')
    lab.etcd.put(f"{PREFIX}/subnets/10.42.251.0-24", '{"PublicIP":')
    for h in hosts:
        wait_for(lambda h=h: str(bad_mac) in h.status().get("skipped_peers", {}), timeout=10,
                 what=f"{h.name} to report the malformed lease")
        assert not has_route(h, bad_mac) and not has_route(h, bad_json)
    assert "VtepMAC" in h1.status()["skipped_peers"][str(bad_mac)]
    assert len(re.findall(r"skipping peer 10\.42\.250\.0/24", lab.log(h1))) == 1
    lab.etcd.ctl("del", f"{PREFIX}/subnets/10.42.250.0-24")
    lab.etcd.ctl("del", f"{PREFIX}/subnets/10.42.251.0-24")

    # SIGKILL + restart under ping: no loss, the kernel reads the same before and after
    before = kernel_state(h1, "flannel.1")
    mac_before = h1.run("cat", "/sys/class/net/flannel.1/address").stdout
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", pods[0].name, "ping", "-i", "0.01", "-c", "400", "-W", "1",
         pods[1].ip], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.5)  # let the ping run before the kill (not an assertion)
        lab.stop_agent(h1, signal.SIGKILL)
        log_mark = len(lab.log(h1))
        (h1.state_dir / "status.json").unlink()
        lab.start_agent(h1, "--repair-interval", "30")
        wait_for(lambda: h1.status().get("reconciles", 0) >= 1, timeout=60,
                 what="the restarted agent's first sync")
        out, _ = pinger.communicate(timeout=60)
    finally:
        if pinger.poll() is None:
            pinger.kill()
            pinger.wait()
    assert " 0% packet loss" in out, out
    assert kernel_state(h1, "flannel.1") == before
    assert h1.run("cat", "/sys/class/net/flannel.1/address").stdout == mac_before
    restarted = lab.log(h1)[log_mark:]
    assert "ready" in restarted and "reconciled" not in restarted  # zero kernel changes

    # a peer's lease deleted with etcdctl: its entries leave the other hosts
    s3 = h3.subnet()
    lab.stop_agent(h3, signal.SIGKILL)  # else it would re-create its key
    t0 = time.monotonic()
    lab.etcd.ctl("del", f"{PREFIX}/subnets/{s3.network_address}-{s3.prefixlen}")
    for h in (h1, h2):
        wait_for(lambda h=h: not has_route(h, s3) and str(s3.network_address) not in
                 h.run("ip", "neigh", "show", "dev", "flannel.1").stdout and
                 h3.ip not in h.run("bridge", "fdb", "show", "dev", "flannel.1").stdout,
                 timeout=10, interval=0.02, what=f"{h.name} to drop {s3}")
    elapsed = time.monotonic() - t0
    print(f"lease delete → entries gone on both peers in {elapsed:.3f} s")
    assert pods[0].ping(pods[1].ip)
