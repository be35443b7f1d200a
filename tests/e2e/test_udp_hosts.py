"""udp backend end to end: three namespace hosts running the real agent over a real etcd.

Asserts the kernel state flannel's udp backend makes (flannel0 TUN, MTU −28, /32 address, one
route for the Network), flannel's exact lease value, a full pod ping matrix, a 50 MB TCP
transfer arriving intact, restart on the same device, leases of other backends skipped (their
destinations get net-unreachable), and a live switch to vxlan removing flannel0 (teardown).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from ipaddress import IPv4Network
from typing import Any

import pytest
from support.harness import RUN_ID, Host, Lab, Pod, ping_all, read_env_file, sh, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

PREFIX = "/coreos.com/network"
NETWORK = "10.44.0.0/16"
TRANSFER_BYTES = 50 * 1024 * 1024

SERVER = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1); s.settimeout(60)
c, _ = s.accept(); c.settimeout(60); h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    h.update(d); n += len(d)
print(n, h.hexdigest())
"""

CLIENT = """
import hashlib, random, socket, sys, time
data = random.Random(int(sys.argv[3])).randbytes(int(sys.argv[4]))
for _ in range(100):
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60); break
    except OSError:
        time.sleep(0.1)
c.sendall(data); c.shutdown(socket.SHUT_WR); c.recv(1)
print(len(data), hashlib.sha256(data).hexdigest())
"""

UDP_PROBE = """
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.setsockopt(socket.SOL_IP, 11, 1)  # IP_RECVERR: net-unreachable is not fatal without it
s.connect((sys.argv[1], 9))
for _ in range(3):
    s.send(b"probe")
    try:
        s.recv(100)
    except TimeoutError:
        continue
    except OSError as exc:
        print(errno.errorcode[exc.errno]); break
else:
    print("timeout")
"""


def start_udp_hosts(lab: Lab, n: int, *extra: str,
                    env: list[dict[str, str]] | None = None) -> list[Host]:
    """`n` hosts on a udp network, each agent with `extra` arguments and its own `env`."""
    assert lab.etcd is not None
    lab.etcd.put(f"{PREFIX}/config",
                 json.dumps({"Network": NETWORK, "Backend": {"Type": "udp"}}))
    hosts = [lab.add_host() for _ in range(n)]
    for i, h in enumerate(hosts):
        lab.start_agent(h, "--repair-interval", "2", *extra, env=env[i] if env else None)
    for h in hosts:
        wait_for(lambda h=h: h.subnet_file.exists() or h.agent.poll() is not None,  # type: ignore[union-attr]
                 timeout=60, what=f"{h.name} subnet.env")
        assert h.subnet_file.exists(), lab.log(h)
    for h in hosts:
        wait_for(lambda h=h: h.status().get("peers") == n - 1 and h.status().get("ready"),
                 timeout=20, what=f"{h.name} to see its peers")
    return hosts


def tcp_transfer(src: Pod, dst: Pod, size: int, seed: int) -> tuple[str, str]:
    """(sent, received) as "<bytes> <sha256>"."""
    port = str(20000 + seed % 10000)
    server = subprocess.Popen(["ip", "netns", "exec", dst.name, sys.executable, "-c", SERVER,
                               port], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sent = sh(sys.executable, "-c", CLIENT, dst.ip, port, str(seed), str(size), ns=src.name,
                  timeout=120).stdout.strip()
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0, err
        return sent, out.strip()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def link_json(host: Host, dev: str) -> dict[str, Any]:
    return json.loads(host.run("ip", "-j", "-d", "addr", "show", "dev", dev).stdout)[0]  # type: ignore[no-any-return]


def test_udp_three_hosts_ping_transfer_restart(lab: Lab) -> None:
    assert lab.etcd is not None
    hosts = start_udp_hosts(lab, 3)
    # flannel's lease value, byte for byte (no BackendType: flannel udp hosts accept it)
    for h in hosts:
        s = h.subnet()
        value = lab.etcd.get(f"{PREFIX}/subnets/{s.network_address}-{s.prefixlen}")
        assert value == f'{{"PublicIP":"{h.ip}","PublicIPv6":null}}'
        assert read_env_file(h.subnet_file)["FLANNEL_MTU"] == "1472"
    # kernel state as flannel makes it
    h1 = hosts[0]
    dev = link_json(h1, "flannel0")
    assert dev["linkinfo"]["info_kind"] == "tun" and dev["mtu"] == 1472
    assert dev["linkinfo"]["info_data"]["pi"] is False
    assert dev["linkinfo"]["info_data"]["persist"] is True
    assert [(a["local"], a["prefixlen"]) for a in dev["addr_info"] if a["family"] == "inet"] == [
        (str(h1.subnet().network_address), 32)]
    route = h1.run("ip", "route", "show", "exact", NETWORK).stdout
    assert "dev flannel0" in route and "proto 111" in route
    assert h1.run("ss", "-lunH", "sport", "= :8285").stdout.count(f"{h1.ip}:8285") == 1

    pods = [lab.add_pod(h, bridge=f"nb{RUN_ID}") for h in hosts]
    ping_all(pods)
    sent, got = tcp_transfer(pods[0], pods[2], TRANSFER_BYTES, seed=int(RUN_ID[:4]) + 1)
    assert got == sent and sent.startswith(f"{TRANSFER_BYTES} ")
    sent, got = tcp_transfer(pods[2], pods[1], TRANSFER_BYTES // 5, seed=7)
    assert got == sent

    # restart: the persistent device is reused (same index, nothing rewritten), traffic resumes
    index = dev["ifindex"]
    assert lab.stop_agent(h1) == 0
    assert link_json(h1, "flannel0")["ifindex"] == index  # outlives the agent
    (h1.state_dir / "status.json").unlink()
    lab.start_agent(h1, "--repair-interval", "2")
    wait_for(lambda: h1.status().get("ready") and h1.status().get("reconciles", 0) >= 1,
             timeout=30, what="restarted agent ready")
    assert link_json(h1, "flannel0")["ifindex"] == index
    wait_for(lambda: pods[0].ping(pods[1].ip) and pods[1].ping(pods[0].ip), timeout=20,
             interval=0.2, what="traffic after restart")
    restarted = lab.log(h1).split("udp: flannel0")[-1]
    assert "created" not in restarted and "recreating" not in restarted
    route_after = h1.run("ip", "route", "show", "exact", NETWORK).stdout
    assert route_after == route

    # a vxlan host's lease is skipped (nothing listens on its udp port), not black-holed
    vx = IPv4Network("10.44.250.0/24")
    lab.etcd.put(f"{PREFIX}/subnets/10.44.250.0-24",
                 '{"PublicIP":"10.9.9.9","PublicIPv6":null,"BackendType":"vxlan",'
                 '"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}')
    wait_for(lambda: str(vx) in h1.status().get("skipped_peers", {}), timeout=20,
             what="vxlan lease skipped")
    assert "not udp" in h1.status()["skipped_peers"][str(vx)]
    # its destination gets net-unreachable at once (a connected UDP socket sees ENETUNREACH)
    out = sh(sys.executable, "-c", UDP_PROBE, "10.44.250.5", ns=pods[0].name).stdout
    assert out.strip() == "ENETUNREACH", out

    # shut down cleanly on SIGTERM; the device and route stay for the next start (the route
    # shows "linkdown" while no process holds the TUN)
    assert lab.stop_agent(h1, signal.SIGTERM) == 0
    left = h1.run("ip", "route", "show", "exact", NETWORK).stdout
    assert left.replace(" linkdown", "") == route
    assert link_json(h1, "flannel0")["ifindex"] == index
    (h1.state_dir / "status.json").unlink()  # so "ready" below is this run's
    lab.start_agent(h1, "--repair-interval", "2")
    wait_for(lambda: h1.status().get("ready"), timeout=30, what="h1 back")
    lab.etcd.ctl("del", f"{PREFIX}/subnets/10.44.250.0-24")

    # a live switch to vxlan: udp's teardown removes flannel0 and its route; pods stay reachable
    lab.etcd.put(f"{PREFIX}/config", json.dumps({"Network": NETWORK,
                                                 "Backend": {"Type": "vxlan"}}))
    for h in hosts:
        wait_for(lambda h=h: h.status().get("backend") == "vxlan" and h.run(
            "ip", "link", "show", "flannel0", check=False).returncode != 0,
            timeout=30, interval=0.2, what=f"{h.name} to drop flannel0 for vxlan")
        assert "flannel0" not in h.run("ip", "route").stdout
    ping_all(pods)
