"""End to end: the bgp backend with real BIRD 2 in namespace hosts, real agents, real etcd.

Timers are short (HoldTime 3 s, ConnectRetryTime 1 s) so sessions form and drop in seconds.
Every BIRD here runs inside a test namespace and goes with it (the harness kills what runs in
a namespace by PID before deleting it); the ToR BIRD is started and stopped by PID.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from support.harness import RUN_ID, Host, Lab, PingRun, Router, ping_all, sh, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

PREFIX = "/coreos.com/network"
NETWORK = "10.44.0.0/16"
TOR_AS = 65000
#: short timers: sessions up in ~1 s, a silent peer dropped after 3 s
FAST = {"HoldTime": 3, "ConnectRetryTime": 1, "GracefulRestartTime": 30}


def bgp_config(**backend: Any) -> str:
    return json.dumps({"Network": NETWORK, "Backend": {"Type": "bgp", **FAST, **backend}})


def need_bird() -> None:
    from support.harness import need

    need(subprocess.run(["which", "bird", "birdc"], capture_output=True).returncode == 0,
         "needs BIRD 2 (apt-get install bird2)")


@pytest.fixture(autouse=True)
def _bird() -> None:
    need_bird()


def sessions(host: Host) -> list[dict[str, Any]]:
    return list(host.status().get("backend_health", {}).get("sessions", []))


def established(host: Host, n: int) -> bool:
    return sum(1 for s in sessions(host) if s.get("state") == "Established") == n


def bird_routes(host: Host) -> dict[IPv4Network, str]:
    """proto bird routes of a host: destination -> the route line."""
    out = host.run("ip", "-4", "route", "show", "proto", "bird").stdout
    return {IPv4Network(line.split()[0]): line for line in out.splitlines()
            if line and line.split()[0] != "blackhole"}


def tunnels(host: Host) -> list[str]:
    links = json.loads(host.run("ip", "-j", "link", "show").stdout)
    return [ln["ifname"] for ln in links
            if ln.get("linkinfo", {}).get("info_kind") in ("vxlan", "tun", "ipip", "gre",
                                                            "wireguard")
            or ln["ifname"].startswith("flannel")]


def start_bgp(lab: Lab, n: int, **backend: Any) -> tuple[list[Host], list[Any]]:
    hosts = lab.start_hosts(bgp_config(**backend), n, "--repair-interval", "2")
    wait_for(lambda: all(established(h, n - 1) for h in hosts), 30,
             what="every host's mesh sessions Established")
    pods = [lab.add_pod(h, bridge=f"nb{RUN_ID}") for h in hosts]
    return hosts, pods


# --------------------------------------------------------------------------- tests


def test_three_hosts_mesh_ping_matrix_proto_bird_no_tunnel(lab: Lab) -> None:
    """The core promise: pods on three hosts reach each other through routes BIRD learned
    by BGP (proto bird, via the peer's address on eth0), with no tunnel device anywhere."""
    hosts, pods = start_bgp(lab, 3)
    ping_all(pods)
    for h in hosts:
        routes = bird_routes(h)
        for peer in hosts:
            if peer is h:
                assert peer.subnet() not in routes, "our own subnet must never come from BGP"
                continue
            line = routes.get(peer.subnet(), "")
            assert f"via {peer.ip} dev eth0" in line, (h.name, routes)
        assert tunnels(h) == [], tunnels(h)
        env = h.subnet_file.read_text()
        assert "FLANNEL_MTU=1500" in env, env  # no encapsulation: the interface's MTU
        st = h.status()
        assert st["backend_health"]["ok"] is True, st["backend_health"]
        assert {s["peer"] for s in sessions(h)} == {p.ip for p in hosts if p is not h}
        assert all(s["routes_received"] == 1 for s in sessions(h)), sessions(h)
    value = json.loads(lab.leases()[str(hosts[0].subnet()).replace("/", "-")])
    assert value["BackendType"] == "bgp" and value["BackendData"] == {"ASNumber": 64512}
    # only the host whose peer sorts below it dials: each pair has exactly one passive side
    conf = (hosts[0].state_dir / "bird.conf").read_text()
    assert conf.count("passive on;") == 2, conf  # h1 has the lowest IP: passive to both
