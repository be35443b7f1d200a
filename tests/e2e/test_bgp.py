"""End to end: the bgp backend with real BIRD 2 in namespace hosts, real agents, real etcd.

Timers are short (HoldTime 3 s, ConnectRetryTime 1 s) so sessions form and drop in seconds.
Every BIRD here runs inside a test namespace and goes with it (the harness kills what runs in
a namespace by PID before deleting it); the ToR BIRD is started and stopped by PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from support.harness import REPO, RUN_ID, Host, Lab, PingRun, Router, ping_all, sh, wait_for

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


def start_bgp(lab: Lab, n: int, *args: str, **backend: Any) -> tuple[list[Host], list[Any]]:
    hosts = lab.start_hosts(bgp_config(**backend), n, "--repair-interval", "2", *args)
    wait_for(lambda: all(established(h, n - 1) for h in hosts), 30,
             what="every host's mesh sessions Established")
    pods = [lab.add_pod(h, bridge=f"nb{RUN_ID}") for h in hosts]
    return hosts, pods


HTTP = ("--healthz-port", "9106", "--metrics-port", "9105", "--healthz-ip", "127.0.0.1")


def http_get(host: Host, port: int, path: str) -> tuple[int, str]:
    """GET from inside the host namespace (the agent listens on its 127.0.0.1)."""
    code = ("import urllib.request, urllib.error\n"
            f"u = 'http://127.0.0.1:{port}{path}'\n"
            "try:\n"
            "    r = urllib.request.urlopen(u, timeout=3); print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code); print(e.read().decode())\n")
    status, _, body = sh(sys.executable, "-c", code, ns=host.name).stdout.partition("\n")
    return int(status), body


def netagent(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return sh(sys.executable, "-m", "netagent", *args, ns=host.name, check=False, timeout=60,
              env=dict(os.environ, PYTHONPATH=str(REPO)))


# --------------------------------------------------------------------------- tests


def test_three_hosts_mesh_ping_matrix_proto_bird_no_tunnel(lab: Lab) -> None:
    """The core promise: pods on three hosts reach each other through routes BIRD learned
    by BGP (proto bird, via the peer's address on eth0), with no tunnel device anywhere."""
    hosts, pods = start_bgp(lab, 3, *HTTP)
    ping_all(pods)
    for h in hosts:
        routes = bird_routes(h)
        for peer in hosts:
            if peer is h:
                assert peer.subnet() not in routes, "our own subnet must never come from BGP"
                # Calico's blackhole for the own subnet, under cni0's connected route
                assert f"blackhole {h.subnet()} metric 32" in h.run(
                    "ip", "route", "show", "proto", "bird").stdout
                continue
            line = routes.get(peer.subnet(), "")
            assert f"via {peer.ip} dev eth0" in line, (h.name, routes)
        assert tunnels(h) == [], tunnels(h)
        env = h.subnet_file.read_text()
        assert "FLANNEL_MTU=1500" in env, env  # no encapsulation: the interface's MTU
        st = h.status()
        assert st["backend_health"]["ok"] is True, st["backend_health"]
        assert {s["peer"] for s in sessions(h)} == {p.ip for p in hosts if p is not h}
        # status.json takes BIRD's view at the agent's syncs (every 2 s here): wait for it
        wait_for(lambda h=h: all(s["routes_received"] == 1 for s in sessions(h)), 10,
                 what=f"{h.name}'s status showing one route received per session")
    value = json.loads(lab.leases()[str(hosts[0].subnet()).replace("/", "-")])
    assert value["BackendType"] == "bgp" and value["BackendData"] == {"ASNumber": 64512}
    # only the host whose peer sorts below it dials: each pair has exactly one passive side
    conf = (hosts[0].state_dir / "bird.conf").read_text()
    assert conf.count("passive on;") == 2, conf  # h1 has the lowest IP: passive to both
    # operators' views: status sessions table, /metrics gauges, /readyz, doctor
    h1 = hosts[0]
    wait_for(lambda: http_get(h1, 9106, "/readyz")[0] == 200, 10, what="h1 /readyz 200")
    metrics = http_get(h1, 9105, "/metrics")[1]
    for peer in hosts[1:]:
        assert re.search(rf'netagent_bgp_session_up{{[^}}]*peer="{re.escape(peer.ip)}"[^}}]*}} 1\.0',
                         metrics), metrics
        assert re.search(rf'netagent_bgp_routes_received{{[^}}]*peer="{re.escape(peer.ip)}"'
                         r'[^}]*} 1\.0', metrics)
    out = netagent(h1, "status", "--state-dir", str(h1.state_dir),
                   "--etcd-endpoints", lab.etcd.endpoint).stdout  # type: ignore[union-attr]
    assert "BGP PEER" in out and out.count("Established") >= 2, out
    print("\n" + out)
    doctor = netagent(h1, "doctor", "--json", "--state-dir", str(h1.state_dir),
                      "--subnet-file", str(h1.subnet_file), "--iface", "eth0",
                      "--etcd-endpoints", lab.etcd.endpoint)  # type: ignore[union-attr]
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    bird_check = [checks["bird"]]
    assert bird_check[0]["ok"] is True, doctor.stdout
    # BIRD's proto-bird routes are the backend's own, not "conflicting routes"
    assert checks["conflicting routes"]["ok"] is True, checks["conflicting routes"]
    assert "sessions up: 2/2" in bird_check[0]["detail"], bird_check


class Tor:
    """A top-of-rack BIRD in the router namespace: AS 65000 on the router's loopback address,
    accepting any host of the lab's 10.x.0.0/16 (dynamic BGP, `neighbor range`), installing
    what it learns into the router's kernel. Started and stopped by PID."""

    def __init__(self, router: Router, tmp: Path, hold: int = 3) -> None:
        self.router = router
        self.dir = tmp / f"tor-{RUN_ID}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.dir / "bird.ctl")
        second = router.ip.split(".")[1]
        conf = f"""
router id {router.loopback};
protocol device {{ scan time 10; }}
protocol direct {{ ipv4; interface "eth0", "eth1"; }}
protocol kernel {{
  ipv4 {{ import none; export filter {{ if source = RTS_BGP then accept; reject; }}; }};
}}
protocol bgp hosts {{
  local {router.loopback} as {TOR_AS};
  neighbor range 10.{second}.0.0/16 as 64512;
  multihop 2;
  hold time {hold};
  ipv4 {{ import all; export none; }};
}}
"""
        (self.dir / "bird.conf").write_text(conf)
        self.log = open(self.dir / "bird.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", router.ns, "bird", "-f", "-c", str(self.dir / "bird.conf"),
             "-s", self.socket, "-P", str(self.dir / "bird.pid")],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.birdc("show", "status").returncode == 0, 10,
                 what="the ToR BIRD's control socket")

    def birdc(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return sh("birdc", "-s", self.socket, *cmd, ns=self.router.ns, check=False)

    def routes(self) -> dict[IPv4Network, str]:
        out = sh("ip", "-4", "route", "show", "proto", "bird", ns=self.router.ns).stdout
        return {IPv4Network(ln.split()[0]): ln for ln in out.splitlines() if ln}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def routed(lab: Lab, tmp_path: Path) -> Iterator[tuple[Router, Tor]]:
    router = lab.add_router()
    tor = Tor(router, tmp_path)
    try:
        yield router, tor
    finally:
        tor.stop()


def test_two_segments_hostgw_cannot_bgp_can_and_tor_learns_every_subnet(
        lab: Lab, routed: tuple[Router, Tor]) -> None:
    """Hosts on two L2 segments joined by a router: host-gw cannot route between them (the
    peer is not on the link; the agent says so); a live switch to bgp with the router's ToR
    BIRD as a global peer makes every pod reach every other, the ToR learns every pod subnet
    and the router itself reaches a pod (a packet from the data centre's side)."""
    router, tor = routed
    assert lab.etcd is not None
    lab.etcd.put(f"{PREFIX}/config", json.dumps({"Network": NETWORK,
                                                 "Backend": {"Type": "host-gw"}}))
    hosts = [lab.add_host(), lab.add_host(), lab.add_host(segment=router.segment)]
    for h in hosts[:2]:  # the first segment's hosts use the router too (not etcd's namespace)
        h.run("ip", "route", "replace", "default", "via", router.ip)
    for h in hosts:
        lab.start_agent(h, "--repair-interval", "2")
    for h in hosts:
        wait_for(lambda h=h: h.subnet_file.exists(), 30, what=f"{h.name} subnet.env")
        wait_for(lambda h=h: h.status().get("peers") == 2, 20, what=f"{h.name} peers")
    pods = [lab.add_pod(h, bridge=f"nb{RUN_ID}") for h in hosts]
    ping_all(pods[:2])  # same segment: host-gw works
    far = hosts[2]
    skipped = wait_for(lambda: hosts[0].status().get("skipped_peers", {}), 10,
                       what="h1 reporting the peer it cannot reach")
    assert "not directly reachable" in skipped.get(str(far.subnet()), ""), skipped
    assert not pods[0].ping(pods[2].ip, count=2), "host-gw must not reach the other segment"
    assert not pods[2].ping(pods[0].ip, count=1)

    peers = [{"IP": router.loopback, "ASNumber": TOR_AS, "Multihop": 2}]
    lab.etcd.put(f"{PREFIX}/config", bgp_config(Peers=peers))
    # every host: 2 mesh sessions + the ToR
    wait_for(lambda: all(established(h, 3) for h in hosts), 30,
             what="mesh and ToR sessions Established on every host")
    ping_all(pods, timeout=20)
    near_route = bird_routes(hosts[0])[far.subnet()]
    assert f"via {router.ip} dev eth0" in near_route, near_route  # resolved through the router
    assert f"via {router.segment.gateway} dev eth0" in bird_routes(far)[hosts[0].subnet()]
    learned = wait_for(lambda: len(tor.routes()) == 3 and tor.routes(), 15,
                       what="the ToR learning the three pod subnets")
    for h in hosts:
        assert f"via {h.ip} " in learned[h.subnet()], learned
    assert sorted(learned) == sorted(h.subnet() for h in hosts)
    # from the data centre's side: the router itself reaches a pod on each segment
    for pod in (pods[0], pods[2]):
        assert sh("ping", "-c", "2", "-W", "1", "-i", "0.2", pod.ip, ns=router.ns,
                  check=False).returncode == 0, f"router -> {pod.ip}"
    tor_session = [s for s in sessions(hosts[2]) if s["name"].startswith("Global_")]
    assert tor_session and tor_session[0]["routes_received"] == 0, tor_session  # export none


def bird_socket(host: Host) -> str:
    """The agent's control socket for its BIRD (the state dir's, or /run/netagent/... when
    that path is too long: the same rule the agent uses)."""
    from netagent.backends.bgp.supervisor import default_socket

    return default_socket(host.state_dir)


def bird_since(host: Host, protocol: str) -> str:
    """When BIRD's protocol last changed state ("" unless Established): unchanged across a
    reload means the session was not dropped."""
    out = sh("birdc", "-s", bird_socket(host), "show", "protocols", protocol,
             ns=host.name, check=False).stdout
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == protocol and "Established" in line:
            return parts[4]
    return ""


def route_gone_everywhere(hosts: list[Host], subnet: IPv4Network) -> bool:
    return all(subnet not in bird_routes(h) for h in hosts)


def test_lease_delete_and_host_down_withdraw_routes_within_hold_time(lab: Lab) -> None:
    """A decommissioned host (agent stopped, lease deleted) is dropped from every peer's
    BIRD config at once; a host that goes silent (its link cut, as a power loss looks from
    the network) loses its sessions and its routes on every peer within HoldTime (3 s)."""
    hold = FAST["HoldTime"]
    hosts, _pods = start_bgp(lab, 3)
    h1, h2, h3 = hosts
    # decommission h2: stop its agent (BIRD keeps running, as any agent stop keeps the
    # kernel state), delete its lease: h1 and h3 remove the session and the route
    lab.stop_agent(h2)
    s2 = h2.subnet()
    assert s2 in bird_routes(h1), "an agent stop alone must not withdraw anything"
    since_before = bird_since(h1, "Mesh_" + h3.ip.replace(".", "_"))
    lab.etcd.ctl("del", f"{PREFIX}/subnets/{s2.network_address}-{s2.prefixlen}")  # type: ignore[union-attr]
    t0 = time.monotonic()
    wait_for(lambda: route_gone_everywhere([h1, h3], s2), hold, interval=0.1,
             what=f"{s2} withdrawn from h1 and h3 after its lease was deleted")
    lease_delete_s = time.monotonic() - t0
    wait_for(lambda: all(h2.ip not in (s["peer"] for s in sessions(h)) for h in (h1, h3)), 5,
             what="h2's session gone from h1's and h3's status")
    # the reload (`birdc configure`) removed one session and left the other one alone
    assert "removing protocol mesh_" + h2.ip.replace(".", "_") in (
        h1.state_dir / "bird.log").read_text().lower()
    assert bird_since(h1, "Mesh_" + h3.ip.replace(".", "_")) == since_before != ""
    # h3 goes silent: cut its underlay link (no FIN, no RST: only the hold timer can tell)
    s3 = h3.subnet()
    assert s3 in bird_routes(h1)
    sh("ip", "link", "set", f"ulp{h3.index}", "down", ns=lab.ul)
    t0 = time.monotonic()
    wait_for(lambda: s3 not in bird_routes(h1), hold + 1.5, interval=0.1,
             what=f"{s3} withdrawn from h1 within the hold time")
    host_down_s = time.monotonic() - t0
    assert host_down_s <= hold + 1.5
    print(f"\nwithdrawal: lease delete {lease_delete_s:.2f} s, host down {host_down_s:.2f} s "
          f"(HoldTime {hold} s)")


def test_agent_kill9_and_restart_under_ping_loses_nothing(lab: Lab) -> None:
    """SIGKILL of the agent leaves BIRD (its own session, not the agent's child any more)
    routing; the restarted agent adopts it by its control socket: no session drops, a 20/s
    ping across hosts loses nothing. Then BIRD itself is SIGKILLed: the agent starts a new
    one in graceful-restart recovery, peers keep the routes meanwhile (graceful restart),
    and the ping still loses nothing."""
    hosts, pods = start_bgp(lab, 2)
    h2 = hosts[1]
    ping_all(pods)
    bird_pid = int((h2.state_dir / "bird.pid").read_text().split()[0])
    run = PingRun(pods[0], pods[1].ip, seconds=8, interval=0.05)
    try:
        time.sleep(1.5)
        lab.stop_agent(h2, signal.SIGKILL)
        time.sleep(1.0)
        lab.start_agent(h2, "--repair-interval", "2")
        wait_for(lambda: "adopting the BIRD already running" in lab.log(h2), 20,
                 what="the restarted agent adopting BIRD")
        sent, got = run.result()
    finally:
        run.stop()
    assert int((h2.state_dir / "bird.pid").read_text().split()[0]) == bird_pid
    assert sent >= 150 and got == sent, f"lost {sent - got} of {sent} across the kill -9"
    wait_for(lambda: established(h2, 1), 10, what="h2's session after the restart")
    print(f"\nagent kill -9 + restart: {got}/{sent} received at 20/s")
    # now BIRD itself dies; the agent's repair timer (2 s) starts another one
    run = PingRun(pods[0], pods[1].ip, seconds=10, interval=0.05)
    try:
        time.sleep(1.0)
        os.kill(bird_pid, signal.SIGKILL)
        wait_for(lambda: "graceful-restart recovery" in lab.log(h2), 10,
                 what="a new BIRD in graceful-restart recovery")
        sent, got = run.result()
    finally:
        run.stop()
    wait_for(lambda: established(h2, 1), 15, what="h2's session with the new BIRD")
    print(f"BIRD kill -9 (agent restarts it): {got}/{sent} received at 20/s")
    assert got == sent, f"lost {sent - got} of {sent} across BIRD's kill -9"
    # an adopted BIRD (not the agent's child) is still the one a switch away from bgp stops,
    # found by its pidfile whose process runs our bird.conf
    lab.stop_agent(h2, signal.SIGKILL)
    lab.start_agent(h2, "--repair-interval", "2")
    wait_for(lambda: lab.log(h2).count("adopting the BIRD already running") == 2, 20,
             what="the second adoption")
    assert bird_pids(h2)
    lab.etcd.put(f"{PREFIX}/config",  # type: ignore[union-attr]
                 json.dumps({"Network": NETWORK, "Backend": {"Type": "vxlan"}}))
    wait_for(lambda: not bird_pids(h2) and not bird_routes(h2)
             and "blackhole" not in h2.run("ip", "route").stdout, 20,
             what="the adopted BIRD stopped and its routes gone")
    ping_all(pods)


def bird_pids(host: Host) -> list[int]:
    """PIDs of bird processes in the host's namespace (ours: only agents' BIRDs run there)."""
    pids = sh("ip", "netns", "pids", host.name).stdout.split()
    out = []
    for pid in pids:
        try:
            exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if exe.endswith(b"bird"):
            out.append(int(pid))
    return out


def test_live_switch_vxlan_bgp_vxlan_under_ping(lab: Lab) -> None:
    """`etcdctl put` of the config switches every host vxlan -> bgp -> vxlan while a pod pings
    another at 20/s: each switch converges (bgp: sessions up, proto bird routes, no vxlan
    device; back on vxlan: BIRD stopped, no proto bird route left) and the loss is reported.
    The bgp side needs its sessions first (~1-2 s), the way back only a sync."""
    assert lab.etcd is not None
    hosts = lab.start_hosts(json.dumps({"Network": NETWORK, "Backend": {"Type": "vxlan"}}), 3,
                            "--repair-interval", "2")
    pods = [lab.add_pod(h, bridge=f"nb{RUN_ID}") for h in hosts]
    ping_all(pods)
    losses = []
    for target in ("bgp", "vxlan"):
        run = PingRun(pods[0], pods[1].ip, 10, interval=0.05)
        time.sleep(0.5)
        t0 = time.monotonic()
        if target == "bgp":
            lab.etcd.put(f"{PREFIX}/config", bgp_config())
            for h in hosts:
                wait_for(lambda h=h: established(h, 2) and len(bird_routes(h)) == 2
                         and tunnels(h) == [], 20, what=f"{h.name} on bgp, vxlan device gone")
        else:
            lab.etcd.put(f"{PREFIX}/config",
                         json.dumps({"Network": NETWORK, "Backend": {"Type": "vxlan"}}))
            for h in hosts:
                wait_for(lambda h=h: not bird_routes(h) and not bird_pids(h)
                         and "flannel.1" in tunnels(h), 20,
                         what=f"{h.name} back on vxlan, BIRD stopped, no proto bird route")
        converged = time.monotonic() - t0
        ping_all(pods)
        sent, got = run.result()
        losses.append((target, sent - got, sent, round(converged, 2)))
    print("\nlive switches (target, pings lost, sent at 20/s, seconds to converge on all "
          "hosts):", losses)
    for h in hosts:
        assert h.agent is not None and h.agent.poll() is None, lab.log(h)
        assert "Traceback" not in lab.log(h)
    # the loss is bounded by the sessions' set-up (bgp) and one sync (vxlan): well under 5 s
    assert all(lost <= 100 for _, lost, _, _ in losses), losses


def bird_says_established(host: Host) -> bool:
    """From BIRD itself (birdc on the host's socket), not from status.json."""
    out = sh("birdc", "-s", bird_socket(host), "show", "protocols", ns=host.name,
             check=False).stdout
    return "Established" in out


def _fake_bird(tmp: Path) -> tuple[dict[str, str], Path]:
    """A `bird` first in PATH that behaves as the real one, except that while `refuse` exists
    it rejects every file it is asked to check (`bird -p`), as a BIRD that cannot parse what it
    is given would, and while `refuse.start` exists it exits at start: the failure paths are
    the agent's, the BIRD running is real."""
    fake = tmp / f"fakebin-{RUN_ID}"
    fake.mkdir()
    refuse = tmp / f"refuse-{RUN_ID}"
    nostart = tmp / f"refuse-{RUN_ID}.start"
    real = subprocess.run(["which", "bird"], capture_output=True, text=True).stdout.strip()
    script = fake / "bird"
    script.write_text(f"""#!/bin/sh
for a in "$@"; do
  if [ "$a" = "-p" ] && [ -e {refuse} ]; then
    echo "bird: syntax error, refused for the test" >&2
    exit 1
  fi
done
if [ -e {nostart} ] && [ "$1" != "-p" ]; then
  echo "bird: cannot start, refused for the test" >&2
  exit 1
fi
exec {real} "$@"
""")
    script.chmod(0o755)
    return {"PATH": f"{fake}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}, refuse


def test_bad_input_malformed_peer_and_refused_file_change_nothing(lab: Lab,
                                                                   tmp_path: Path) -> None:
    """A malformed peer is refused naming the field (CLI validate, and live: the running
    config stays); a file BIRD refuses is reported (status, log, not ready) while the old
    file stays in force and traffic flows; a BIRD that dies and cannot start again is reported
    while its routes keep serving; a BIRDSocket nobody answers on is reported too."""
    assert lab.etcd is not None
    env, refuse = _fake_bird(tmp_path)
    lab.etcd.put(f"{PREFIX}/config", bgp_config())
    hosts = [lab.add_host(), lab.add_host()]
    for h in hosts:
        lab.start_agent(h, "--repair-interval", "2", env=env)
    for h in hosts:
        wait_for(lambda h=h: h.subnet_file.exists(), 30, what=f"{h.name} subnet.env")
    wait_for(lambda: all(established(h, 1) for h in hosts), 30, what="sessions up")
    pods = [lab.add_pod(h, bridge=f"nb{RUN_ID}") for h in hosts]
    ping_all(pods)
    h1 = hosts[0]
    conf_before = (h1.state_dir / "bird.conf").read_text()

    # 1. malformed peer: the CLI names the field; etcd's copy is refused live, nothing changes
    bad = bgp_config(Peers=[{"IP": "10.9.9.9", "ASNumber": 65000}, {"IP": "10.9.9.300",
                                                                     "ASNumber": 65001}])
    proc = subprocess.run([sys.executable, "-m", "netagent", "config", "validate", "-"],
                          input=bad, capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 1 and "Backend.Peers[1].IP" in proc.stderr, proc.stderr
    lab.etcd.put(f"{PREFIX}/config", bad)
    wait_for(lambda: "Backend.Peers[1].IP" in h1.status().get("config_error", ""), 10,
             what="the rejected config in status")
    assert (h1.state_dir / "bird.conf").read_text() == conf_before
    assert established(h1, 1) and pods[0].ping(pods[1].ip)

    # 2. BIRD refuses the new file: reported, old file stays in force, traffic flows
    refuse.touch()
    lab.etcd.put(f"{PREFIX}/config", bgp_config(HoldTime=6))
    st = wait_for(lambda: not h1.status().get("backend_health", {}).get("ok", True)
                  and h1.status(), 10, what="h1 reporting the refused file")
    assert "rejected" in st["backend_health"]["detail"], st["backend_health"]
    assert "refused for the test" in st["backend_health"]["detail"]
    wait_for(lambda: h1.status().get("ready") is False, 5, what="h1 not ready")
    assert "BIRD refused the new file" in lab.log(h1)
    assert (h1.state_dir / "bird.conf").read_text() == conf_before  # old file in force
    assert "hold time 6;" in (h1.state_dir / "bird.conf.candidate").read_text()
    assert pods[0].ping(pods[1].ip, count=3), "traffic must keep flowing on the old file"
    out = sh("birdc", "-s", bird_socket(h1), "show", "protocols", ns=h1.name)
    assert "Established" in out.stdout, out.stdout
    # the check passes again: the next full sync (repair timer) loads it, ready again
    refuse.unlink()
    wait_for(lambda: h1.status().get("ready") is True, 15, what="h1 ready again")
    assert "hold time 6;" in (h1.state_dir / "bird.conf").read_text()
    wait_for(lambda: established(h1, 1), 15, what="the session (restarted by BIRD for the "
             "new hold time) up again")

    # 2b. BIRD dies and cannot be started again: reported; the kernel keeps its routes and the
    # peer keeps ours (graceful restart), so traffic flows; once it can start, it is back
    nostart = refuse.with_name(refuse.name + ".start")
    # the HoldTime change restarted the session: graceful restart covers an established one
    # only, so wait for BIRD itself (status.json may predate the restart) and for the routes
    wait_for(lambda: all(bird_says_established(h) for h in hosts)
             and hosts[0].subnet() in bird_routes(hosts[1])
             and hosts[1].subnet() in bird_routes(hosts[0]), 20,
             what="both BIRDs Established again, routes in both kernels")
    time.sleep(1.5)  # End-of-RIB exchanged: the peer's graceful-restart state is complete
    nostart.touch()
    os.kill(int((h1.state_dir / "bird.pid").read_text().split()[0]), signal.SIGKILL)
    st = wait_for(lambda: "cannot start BIRD" in h1.status().get("backend_health", {})
                  .get("detail", "") and h1.status(), 15, what="h1 reporting BIRD's failed start")
    assert "cannot start, refused for the test" in st["backend_health"]["detail"]
    wait_for(lambda: h1.status().get("ready") is False, 5, what="h1 not ready")
    assert "cannot start BIRD" in lab.log(h1)
    assert pods[0].ping(pods[1].ip, count=3), "routes kept while BIRD is down"
    nostart.unlink()
    wait_for(lambda: h1.status().get("ready") is True, 15, what="h1 ready with a new BIRD")
    assert "graceful-restart recovery" in lab.log(h1)
    wait_for(lambda: established(h1, 1), 15, what="the new BIRD's session")

    # 3. a BIRDSocket no BIRD answers on: reported (the agent never starts that one)
    nobody = f"/run/netagent-test-{RUN_ID}-nobird.ctl"
    lab.etcd.put(f"{PREFIX}/config", bgp_config(HoldTime=6, BIRDSocket=nobody))
    st = wait_for(lambda: "no BIRD answers" in h1.status().get("backend_health", {})
                  .get("detail", "") and h1.status(), 15, what="h1 reporting no BIRD")
    wait_for(lambda: h1.status().get("ready") is False, 5, what="h1 not ready")
    # the BIRD running was left alone (the HoldTime change above restarted its session)
    wait_for(lambda: pods[0].ping(pods[1].ip), 15, what="pods still reaching each other")
    for h in hosts:
        assert h.agent is not None and h.agent.poll() is None, lab.log(h)
        assert "Traceback" not in lab.log(h)
