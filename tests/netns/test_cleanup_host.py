"""`netagent cleanup` on a namespace host prepared by a real agent run (real etcd, real agent
process, real netlink and iptables): refused while the agent runs, --dry-run changes nothing,
a run removes everything of ours and nothing foreign, the CNI bridge stays while a pod is
attached, a second run has nothing to do, and --release-lease frees the lease in etcd.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from support.harness import REPO, Host, Lab, need, sh, wait_for

PREFIX = "/coreos.com/network"


def cleanup(lab: Lab, h: Host, *args: str) -> subprocess.CompletedProcess[str]:
    assert lab.etcd is not None
    return subprocess.run(
        ["ip", "netns", "exec", h.name, sys.executable, "-m", "netagent", "cleanup",
         "--state-dir", str(h.state_dir), "--subnet-file", str(h.subnet_file),
         "--iface", "eth0", "--etcd-endpoints", lab.etcd.endpoint, *args],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))


def state(h: Host) -> dict[str, Any]:
    """Everything cleanup could touch, read with iproute2/iptables (not our own dumps)."""
    def js(*a: str) -> Any:
        out = h.run(*a).stdout
        return json.loads(out) if out.strip() else []

    return {
        "links": sorted(link["ifname"] for link in js("ip", "-j", "link", "show")),
        "routes": sorted(json.dumps(r, sort_keys=True) for r in js("ip", "-j", "route", "show")
                         + js("ip", "-j", "-6", "route", "show")),
        "iptables": sorted(line for line in h.run("iptables-save").stdout.splitlines()
                           if not line.startswith("#") and not line.startswith(":")),
    }


def our_routes(h: Host) -> list[str]:
    return [line for line in h.run("ip", "route", "show", "proto", "111").stdout.splitlines()
            + h.run("ip", "-6", "route", "show", "proto", "111").stdout.splitlines() if line]


def test_cleanup_removes_ours_keeps_foreign_refuses_while_running_and_is_idempotent(
        lab: Lab) -> None:
    need(sh("which", "iptables-save", check=False).returncode == 0, "iptables needed")
    net = f"10.{lab.prefix.split('.')[1]}.0.0/16"
    h1, h2 = lab.start_hosts(f'{{"Network":"{net}","Backend":{{"Type":"vxlan"}}}}', 2,
                             "--ip-masq", "--ip-blackhole-route", "--iptables-resync", "1")
    pod = lab.add_pod(h1)
    wait_for(lambda: len(our_routes(h1)) == 2, 20, what="peer route and blackhole on h1")
    sub1 = str(h1.subnet())
    assert any(line.startswith(f"blackhole {sub1}") for line in our_routes(h1))
    wait_for(lambda: "FLANNEL-POSTRTG" in h1.run("iptables-save").stdout, 20, what="masq")
    # foreign things that look like ours and must stay
    h1.run("ip", "route", "add", "10.250.0.0/24", "via", h1.ip, "proto", "static")
    h1.run("ip", "route", "add", "blackhole", "10.251.0.0/24", "proto", "static")
    h1.run("ip", "link", "add", "fx0", "type", "veth", "peer", "name", "fx1")
    h1.run("ip", "link", "add", "flannelx", "type", "bridge")
    h1.run("iptables", "-N", "KEEP-ME")
    h1.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.252.0.0/24", "-j", "RETURN")

    # 1. refused while the agent runs: nothing changes
    before = state(h1)
    got = cleanup(lab, h1)
    assert got.returncode == 1 and "agent is running" in got.stderr, got
    assert str(h1.agent.pid) in got.stderr  # type: ignore[union-attr]
    assert state(h1) == before
    assert lab.stop_agent(h1) == 0

    # 2. --dry-run lists and changes nothing
    before = state(h1)
    got = cleanup(lab, h1, "--dry-run")
    assert got.returncode == 0, got
    assert "would remove: device flannel.1 (vxlan) and its 1 route" in got.stdout
    assert f"would remove: route blackhole {sub1} proto 111 metric 1000000" in got.stdout
    assert "would remove: IPv4 iptables chains" in got.stdout
    assert "kept: bridge cni0: 1 pod interface(s) attached" in got.stdout
    assert state(h1) == before

    # 3. the run: ours gone, the pod's bridge and everything foreign kept
    got = cleanup(lab, h1)
    assert got.returncode == 0, got
    after = state(h1)
    assert "flannel.1" not in after["links"] and "cni0" in after["links"]
    assert our_routes(h1) == []
    assert "FLANNEL-" not in h1.run("iptables-save").stdout
    assert not [r for r in after["routes"] if '"protocol": "111"' in r]
    for kept in ("fx0", "fx1", "flannelx"):
        assert kept in after["links"]
    assert "10.250.0.0/24 via" in h1.run("ip", "route", "show", "proto", "static").stdout
    assert "blackhole 10.251.0.0/24" in h1.run("ip", "route", "show", "proto", "static").stdout
    ipt = h1.run("iptables-save").stdout
    assert ":KEEP-ME" in ipt and "-A POSTROUTING -s 10.252.0.0/24 -j RETURN" in ipt
    assert lab.leases()[sub1.replace("/", "-")], "without --release-lease the lease stays"
    # the pod's plumbing is untouched: its veth still on cni0, its gateway still answers
    assert "master cni0" in h1.run("ip", "link", "show", "vp1").stdout
    assert pod.ping(str(h1.subnet().network_address + 1), count=2)

    # 4. the last pod gone: the bridge goes on the next run; then nothing to do
    h1.run("ip", "link", "del", "vp1")
    got = cleanup(lab, h1)
    assert got.returncode == 0 and "removed: CNI bridge cni0 (no pod attached)" in got.stdout, got
    before = state(h1)
    got = cleanup(lab, h1)
    assert got.returncode == 0 and "nothing to do" in got.stdout, got
    assert state(h1) == before

    # 5. --release-lease: our key deleted and its etcd lease revoked, h2's untouched
    assert lab.etcd is not None
    lease_before = lab.etcd.ctl("get", f"{PREFIX}/subnets/{sub1.replace('/', '-')}",
                                "-w", "json").stdout
    lease_id = json.loads(lease_before)["kvs"][0]["lease"]
    got = cleanup(lab, h1, "--release-lease")
    assert got.returncode == 0, got
    assert f"removed: lease {sub1} in etcd" in got.stdout
    assert sub1.replace("/", "-") not in lab.leases()
    assert str(h2.subnet()).replace("/", "-") in lab.leases()
    ttl = lab.etcd.ctl("lease", "timetolive", format(lease_id, "x")).stdout
    assert "already expired" in ttl or "not found" in ttl, ttl
    assert not h1.subnet_file.exists()
    got = cleanup(lab, h1, "--release-lease")
    assert got.returncode == 0 and "nothing to do" in got.stdout, got
    # h2 forgets h1's subnet (its lease is gone) and keeps running
    wait_for(lambda: h2.status().get("peers") == 0, 20, what="h2 drops the released peer")
    assert h2.agent is not None and h2.agent.poll() is None


@pytest.mark.parametrize("bad", ["--etcd-endpoints=http://127.0.0.1:1"])
def test_release_lease_without_etcd_changes_nothing(lab: Lab, bad: str) -> None:
    """--release-lease that cannot reach etcd fails before touching the kernel."""
    net = f"10.{lab.prefix.split('.')[1]}.0.0/16"
    [h1] = lab.start_hosts(f'{{"Network":"{net}","Backend":{{"Type":"vxlan"}}}}', 1)
    assert lab.stop_agent(h1) == 0
    before = state(h1)
    got = subprocess.run(
        ["ip", "netns", "exec", h1.name, sys.executable, "-m", "netagent", "cleanup",
         "--state-dir", str(h1.state_dir), "--subnet-file", str(h1.subnet_file), "--iface",
         "eth0", bad, "--release-lease"],
        capture_output=True, text=True, timeout=90, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert got.returncode == 1 and "--release-lease" in got.stderr, got
    assert state(h1) == before and "flannel.1" in before["links"]


def pid_alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - one read
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def test_cleanup_stops_the_wireguard_go_the_agent_started(tmp_path: Any) -> None:
    """A stopped agent leaves wireguard-go forwarding (by design); cleanup stops exactly that
    PID (recorded in the state dir, checked against its command line) and the TUN goes."""
    need(sh("which", "wireguard-go", check=False).returncode == 0, "needs wireguard-go")
    from support.wireguard import WgLab

    lab = WgLab(tmp_path)
    try:
        lab.start_etcd()
        net = f"10.{lab.prefix.split('.')[1]}.0.0/16"
        [h1] = lab.start_hosts(f'{{"Network":"{net}","Backend":{{"Type":"wireguard"}}}}', 1)
        wait_for(lambda: lab.wg_pids(), 20, what="wireguard-go started")
        [pid] = lab.wg_pids()
        assert lab.stop_agent(h1) == 0
        assert pid_alive(pid), "wireguard-go outlives the agent (so pods keep forwarding)"
        got = cleanup(lab, h1, "--dry-run")
        assert f"would remove: wireguard-go for flannel-wg (PID {pid})" in got.stdout, got
        got = cleanup(lab, h1)
        assert got.returncode == 0 and f"removed: wireguard-go for flannel-wg (PID {pid})" \
            in got.stdout, got
        wait_for(lambda: not pid_alive(pid), 5, what="wireguard-go gone")
        assert "flannel-wg" not in h1.run("ip", "link", "show").stdout
        got = cleanup(lab, h1)
        assert got.returncode == 0 and "nothing to do" in got.stdout, got
    finally:
        lab.close()


def test_cleanup_stops_our_bird(lab: Lab) -> None:
    """The bgp backend's BIRD keeps routing after the agent stops; cleanup stops it (only a
    BIRD whose command line names our bird.conf)."""
    need(sh("which", "bird", check=False).returncode == 0, "needs BIRD 2")
    net = f"10.{lab.prefix.split('.')[1]}.0.0/16"
    [h1] = lab.start_hosts(f'{{"Network":"{net}","Backend":{{"Type":"bgp"}}}}', 1)
    pidfile = h1.state_dir / "bird.pid"
    wait_for(pidfile.exists, 20, what="BIRD started")
    pid = int(pidfile.read_text().split()[0])
    assert lab.stop_agent(h1) == 0
    assert pid_alive(pid), "BIRD outlives the agent"
    got = cleanup(lab, h1)
    assert got.returncode == 0 and f"removed: BIRD (PID {pid}, our bird.conf)" in got.stdout, got
    wait_for(lambda: not pid_alive(pid), 10, what="BIRD gone")
    assert our_routes(h1) == []
    got = cleanup(lab, h1)
    assert got.returncode == 0 and "nothing to do" in got.stdout, got
