"""A netagent udp host and a flannel-format udp host share a network, both directions.

The second host runs no agent: its lease is written to etcd with flannel's udp value, and a
small helper process in its namespace does what flannel's udp backend does, nothing more: a
plain TUN ``flannel0`` (IFF_NO_PI, no virtio header, no offloads), one raw IPv4 packet per UDP
datagram on port 8285, TTL decremented. The helper checks every datagram it receives from the
agent the way a flannel peer's kernel will: exactly one IPv4 packet, no larger than the TUN MTU,
valid IP header checksum and valid TCP/UDP/ICMP checksum. scapy builds extra datagrams of its
own (ICMP echo, UDP) for the non-TCP paths.

So the agent's offloads (TSO segmentation in user space, UDP GSO, UDP GRO runs, the
super-packets it writes into its own TUN) are invisible on the wire: a 20 MB TCP transfer each
way arrives intact, and the flannel side never sees a malformed or oversized datagram.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support.harness import RUN_ID, Host, Lab, Pod, sh, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

PREFIX = "/coreos.com/network"
NETWORK = "10.47.0.0/16"
FLANNEL_SUBNET = "10.47.250.0/24"
FLANNEL_ADDR = "10.47.250.0"  # flannel puts the lease's network address on flannel0 (/32)
TRANSFER_BYTES = 20 * 1024 * 1024

FLANNEL = r"""
import fcntl, json, os, select, socket, struct, sys
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
own_ip, peer_ip, mtu = sys.argv[1], sys.argv[2], int(sys.argv[3])
tun = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH22x", b"flannel0", IFF_TUN | IFF_NO_PI))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
u.bind((own_ip, 8285))
st = {"datagrams": 0, "bytes": 0, "max_len": 0, "bad": 0, "bad_samples": [], "from_tun": 0,
      "protos": {}}

def csum_ok(data):
    if len(data) % 2:
        data += b"\0"
    v = int.from_bytes(data, "big")
    return v % 0xFFFF == 0

def valid(d):
    if len(d) < 20 or d[0] >> 4 != 4:
        return "not ipv4"
    ihl = (d[0] & 15) * 4
    if ihl < 20 or ihl > len(d) or int.from_bytes(d[2:4], "big") != len(d):
        return "length"
    if not csum_ok(d[:ihl]):
        return "ip checksum"
    if len(d) > mtu:
        return "larger than the TUN MTU"
    if int.from_bytes(d[6:8], "big") & 0x3FFF:
        return None  # a fragment: no L4 header to check
    body, proto = d[ihl:], d[9]
    if proto in (6, 17):
        if proto == 17 and body[6:8] == b"\0\0":
            return None
        pseudo = d[12:20] + bytes((0, proto)) + len(body).to_bytes(2, "big")
        return None if csum_ok(pseudo + body) else f"proto {proto} checksum"
    if proto == 1:
        return None if csum_ok(body) else "icmp checksum"
    return None

def ttl_down(p):
    p = bytearray(p)
    if p[8] <= 1:
        return None
    p[8] -= 1
    p[10:12] = b"\0\0"
    s = int.from_bytes(p[:(p[0] & 15) * 4], "big") % 0xFFFF
    p[10:12] = (~s & 0xFFFF).to_bytes(2, "big")
    return bytes(p)

def command(line):
    if line == "stats":
        print(json.dumps(st), flush=True)
    elif line.startswith("send "):  # a datagram built by the test (scapy)
        u.sendto(bytes.fromhex(line[5:]), (peer_ip, 8285))
    else:
        sys.exit(0)

print("ready", flush=True)
pending = b""
while True:
    r, _, _ = select.select([tun, u, 0], [], [])
    if 0 in r:  # read the fd, not sys.stdin: its buffer would hide lines from select
        data = os.read(0, 65536)
        if not data:
            break
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            command(line.decode().strip())
    if tun in r:  # flannel's tun -> udp: one packet, one datagram
        p = ttl_down(os.read(tun, 65536))
        st["from_tun"] += 1
        if p:
            u.sendto(p, (peer_ip, 8285))
    if u in r:  # udp -> tun, checked as a flannel peer's kernel will
        d, addr = u.recvfrom(65536)
        st["datagrams"] += 1
        st["bytes"] += len(d)
        st["max_len"] = max(st["max_len"], len(d))
        key = str(d[9]) if len(d) > 9 else "short"
        st["protos"][key] = st["protos"].get(key, 0) + 1
        why = valid(d)
        if why:
            st["bad"] += 1
            if len(st["bad_samples"]) < 5:
                st["bad_samples"].append([why, d[:60].hex()])
            continue
        p = ttl_down(d)
        if p:
            os.write(tun, p)
"""


class FlannelHost:
    """The helper process standing in for flanneld's udp backend on `host`."""

    def __init__(self, host: Host, peer_ip: str, mtu: int) -> None:
        self.host = host
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", host.name, sys.executable, "-c", FLANNEL, host.ip, peer_ip,
             str(mtu)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", self.proc.stderr.read() if self.proc.stderr else line
        # what flannel's udp backend configures around its TUN
        host.run("ip", "addr", "add", f"{FLANNEL_ADDR}/32", "dev", "flannel0")
        host.run("ip", "link", "set", "flannel0", "mtu", str(mtu), "up")
        host.run("ip", "route", "add", NETWORK, "dev", "flannel0")

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def send(self, inner: Any) -> None:
        """One inner packet as one datagram from the flannel host's port 8285 to the agent."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"send {bytes(inner).hex()}\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def world(lab: Lab) -> Iterator[tuple[Lab, Host, Pod, FlannelHost]]:
    assert lab.etcd is not None
    lab.etcd.put(f"{PREFIX}/config", json.dumps({"Network": NETWORK, "SubnetMin": "10.47.1.0",
                                                 "SubnetMax": "10.47.200.0",
                                                 "Backend": {"Type": "udp"}}))
    agent_host, flannel_host = lab.add_host(), lab.add_host()
    lab.start_agent(agent_host)
    wait_for(lambda: agent_host.subnet_file.exists(), timeout=60, what="agent lease")
    # flannel's udp lease value for the second host, byte for byte
    lab.etcd.put(f"{PREFIX}/subnets/10.47.250.0-24",
                 f'{{"PublicIP":"{flannel_host.ip}","PublicIPv6":null}}')
    wait_for(lambda: agent_host.status().get("peers") == 1, timeout=20,
             what="agent to take the flannel host as a peer")
    pod = lab.add_pod(agent_host, bridge=f"nb{RUN_ID}")
    flannel = FlannelHost(flannel_host, agent_host.ip, 1472)
    try:
        yield lab, agent_host, pod, flannel
    finally:
        flannel.close()


def test_flannel_udp_host_and_netagent_interoperate(
        world: tuple[Lab, Host, Pod, FlannelHost]) -> None:
    from scapy.layers.inet import ICMP, IP, UDP

    lab, agent_host, pod, flannel = world
    fl = flannel.host
    # ping both ways across the two implementations
    wait_for(lambda: pod.ping(FLANNEL_ADDR), timeout=20, interval=0.2,
             what="pod -> flannel host")
    assert sh("ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", FLANNEL_ADDR, pod.ip,
              ns=fl.name, check=False).returncode == 0

    # TCP both ways: the agent's TSO/GSO path towards a peer that takes single packets only,
    # and its receive path for single datagrams (no runs from a flannel peer)
    sent, got = tcp_transfer_to_ns(pod, fl.name, FLANNEL_ADDR, TRANSFER_BYTES, seed=11)
    assert got == sent and sent.startswith(f"{TRANSFER_BYTES} ")
    sent, got = tcp_transfer_from_ns(fl.name, FLANNEL_ADDR, pod, TRANSFER_BYTES, seed=12)
    assert got == sent and sent.startswith(f"{TRANSFER_BYTES} ")

    # scapy-built datagrams as a flannel host sends them: ICMP echo and UDP to the pod; the
    # pod's answers come back to the flannel host as single valid packets
    before = flannel.stats()
    for i in range(5):
        flannel.send(IP(src="10.47.250.9", dst=pod.ip, ttl=64, id=900 + i)
                     / ICMP(id=77, seq=i) / (b"na-flannel-%d" % i))
        flannel.send(IP(src="10.47.250.9", dst=pod.ip, ttl=64)
                     / UDP(sport=5000, dport=9) / b"na-udp")  # port 9: ICMP port unreachable
    wait_for(lambda: flannel.stats()["protos"].get("1", 0) >= before["protos"].get("1", 0) + 10,
             timeout=10, what="echo replies and port-unreachables back at the flannel host")

    st = flannel.stats()
    print("flannel side:", {k: v for k, v in st.items() if k != "bad_samples"})
    print([ln for ln in lab.log(agent_host).splitlines() if "udp: flannel0" in ln])
    assert st["bad"] == 0, st["bad_samples"]
    assert 0 < st["max_len"] <= 1472
    assert st["datagrams"] > TRANSFER_BYTES // 1472  # the first transfer came as single packets
    assert lab.stop_agent(agent_host) == 0  # no traceback, clean exit


SERVER = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[2], int(sys.argv[1]))); s.listen(1); s.settimeout(60)
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
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60,
                                     source_address=(sys.argv[5], 0) if sys.argv[5] else None)
        break
    except OSError:
        time.sleep(0.1)
c.sendall(data); c.shutdown(socket.SHUT_WR); c.recv(1)
print(len(data), hashlib.sha256(data).hexdigest())
"""


def _transfer(client_ns: str, source: str, server_ns: str, server_ip: str, bind: str,
              size: int, seed: int) -> tuple[str, str]:
    port = str(21000 + seed)
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, sys.executable, "-c", SERVER,
                               port, bind], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        time.sleep(0.2)
        sent = sh(sys.executable, "-c", CLIENT, server_ip, port, str(seed), str(size), source,
                  ns=client_ns, timeout=120).stdout.strip()
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0, err
        return sent, out.strip()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def tcp_transfer_to_ns(pod: Pod, ns: str, ip: str, size: int, seed: int) -> tuple[str, str]:
    return _transfer(pod.name, "", ns, ip, ip, size, seed)


def tcp_transfer_from_ns(ns: str, ip: str, pod: Pod, size: int, seed: int) -> tuple[str, str]:
    return _transfer(ns, ip, pod.name, pod.ip, "0.0.0.0", size, seed)
