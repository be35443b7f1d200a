"""udp backend under attack: 10,000 crafted datagrams at port 8285 while pods keep talking.

Two namespace hosts each run the real :class:`~backends.udp.UdpBackend` (prepare → activate →
sync, exactly the daemon's calls) in a small helper process (``python3 <this file> node``) that
also answers "stats" with the backend's counters; the daemon does not export them yet (metrics
issue). A third namespace on the underlay is the attacker. scapy builds the attack; a raw
socket sends it, paced (bounded in count and time), with outer source addresses spoofed where
the case needs a known peer. A sniffer in the target pod looks for the attack's marker.

What a header-less protocol cannot catch, and so is not tested: a packet whose outer *and*
inner sources are both forged consistently (peer's PublicIP, address in the peer's subnet).
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as the node helper inside a namespace: tests/ is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
from support.harness import REPO, Host, Lab, wait_for  # noqa: E402

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

NETWORK = "10.45.0.0/16"
SUBNETS = [IPv4Network("10.45.1.0/24"), IPv4Network("10.45.2.0/24")]
PORT = 8285
MARKER = b"NA-ATTACK"
LEGIT = b"NA-LEGIT"
LEGIT_COUNT = 300
ATTACK_COUNT = 10_000

# --------------------------------------------------------------------------- helpers run in netns

SNIFFER = """
import select, socket, sys, json
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", int(sys.argv[1])))
counts = {"attack_frames": 0, "legit_datagrams": 0}
print("listening", flush=True)
while True:
    ready, _, _ = select.select([s, u, sys.stdin], [], [], 120)
    if not ready or sys.stdin in ready:
        break
    if s in ready:
        if b"NA-ATTACK" in s.recv(65536):
            counts["attack_frames"] += 1
    if u in ready:
        if u.recv(65536).startswith(b"NA-LEGIT"):
            counts["legit_datagrams"] += 1
print(json.dumps(counts), flush=True)
"""

SENDER = """
import socket, struct, sys, time
data = open(sys.argv[1], "rb").read()
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
sent, off = 0, 0
while off < len(data):
    (n,) = struct.unpack_from("!H", data, off); pkt = data[off + 2:off + 2 + n]; off += 2 + n
    s.sendto(pkt, (socket.inet_ntoa(pkt[16:20]), 0)); sent += 1
    if sent % 200 == 0:
        time.sleep(0.005)  # paced: the agent's socket buffer must not overflow (uncounted loss)
print(sent, flush=True)
"""

LEGIT_SENDER = """
import socket, sys, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    u.sendto(b"NA-LEGIT %d" % i, (sys.argv[1], int(sys.argv[2]))); time.sleep(0.002)
"""


def node_main(spec: dict[str, Any]) -> None:
    """Run UdpBackend as the daemon would, answering 'stats' / 'sync <json>' / 'quit' on stdin."""
    sys.path.insert(0, str(REPO))
    from netagent.backends.base import HostFacts
    from netagent.backends.udp import UdpBackend
    from netagent.config import parse_network_config
    from netagent.lease import Lease, LeaseAttrs

    config = parse_network_config(json.dumps({"Network": spec["network"],
                                              "Backend": {"Type": "udp"}}))
    ip = IPv4Address(spec["ip"])
    host = HostFacts("eth0", socket.if_nametoindex("eth0"), 1500, ip, ip,
                     Path(spec["state_dir"]))

    def peers(items: list[list[str]]) -> dict[IPv4Network, Lease]:
        return {IPv4Network(s): Lease(IPv4Network(s), LeaseAttrs(IPv4Address(p)))
                for s, p in items}

    backend = UdpBackend(config, host)
    backend.prepare()
    own = IPv4Network(spec["subnet"])
    backend.activate(Lease(own, LeaseAttrs(ip)))
    backend.sync(peers(spec["peers"]), None)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "stats":
            print(json.dumps(backend.stats), flush=True)
        elif cmd == "sync":
            report = backend.sync(peers(json.loads(arg)), None)
            print(json.dumps(report.entries), flush=True)
        elif cmd == "quit":
            break
    backend.shutdown()
    print("bye", flush=True)


# --------------------------------------------------------------------------- test-side plumbing


class Node:
    """A helper process running the backend in a host namespace."""

    def __init__(self, host: Host, subnet: IPv4Network, peers: list[list[str]]) -> None:
        self.host = host
        host.state_dir.mkdir(parents=True, exist_ok=True)
        host.subnet_file.write_text(f"FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET="
                                    f"{subnet.network_address + 1}/{subnet.prefixlen}\n"
                                    "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")
        spec = {"network": NETWORK, "ip": host.ip, "subnet": str(subnet), "peers": peers,
                "state_dir": str(host.state_dir)}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", host.name, sys.executable, __file__, "node", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert self.readline(30) == "ready"

    def readline(self, timeout: float = 10) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"{self.host.name} helper did not answer in {timeout} s"
        return self.proc.stdout.readline().strip()

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.readline()

    def stats(self) -> dict[str, Any]:
        return json.loads(self.ask("stats"))  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.ask("quit") == "bye"
                self.proc.wait(10)
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait(5)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Lab, list[Node], Host]]:
    lab = Lab(tmp_path, tag="s")
    nodes: list[Node] = []
    try:
        h1, h2, attacker = lab.add_host(), lab.add_host(), lab.add_host()
        nodes.append(Node(h1, SUBNETS[0], [[str(SUBNETS[1]), h2.ip]]))
        nodes.append(Node(h2, SUBNETS[1], [[str(SUBNETS[0]), h1.ip]]))
        yield lab, nodes, attacker
    finally:
        for n in nodes:
            n.close()
        lab.close()


def inner(src: str, dst: str, ttl: int = 64, payload: bytes = MARKER) -> Any:
    from scapy.layers.inet import IP, UDP

    return IP(src=src, dst=dst, ttl=ttl, id=random.randrange(65536)) / UDP(
        sport=4000, dport=5555) / (payload + b" " + os.urandom(8))


def well_formed(p: bytes) -> bool:
    """The receive path's own definition, restated independently for the test's generator."""
    if len(p) < 20 or p[0] >> 4 != 4 or (p[0] & 15) < 5 or (p[0] & 15) * 4 > len(p):
        return False
    if struct.unpack("!H", p[2:4])[0] != len(p):
        return False
    words = struct.unpack(f"!{(p[0] & 15) * 2}H", p[:(p[0] & 15) * 4])
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def build_attack(h1: Host, h2: Host, attacker: Host, pod_ip: str, rng: random.Random
                 ) -> tuple[list[bytes], dict[str, int]]:
    """10,000 outer packets for h1's port and the drop reason each must be counted under."""
    from scapy.layers.inet import IP, UDP

    own1, own2 = SUBNETS
    peer_src = str(own2.network_address + 10)
    good = bytes(inner(peer_src, pod_ip))
    expect: dict[str, int] = {}
    out: list[bytes] = []

    def add(reason: str, outer_src: str, payload: bytes) -> None:
        out.append(bytes(IP(src=outer_src, dst=h1.ip) / UDP(sport=PORT, dport=PORT) / payload))
        expect[reason] = expect.get(reason, 0) + 1

    for i in range(2000):  # from a host with no lease: well-formed, random and empty payloads
        payload = good if i % 3 == 0 else (b"" if i % 3 == 1 else rng.randbytes(rng.randrange(200)))
        add("unknown_source", attacker.ip, payload)
    for i in range(3000):  # "from" the peer (spoofed outer source), malformed
        p = bytearray(bytes(inner(peer_src, pod_ip)))
        kind = i % 8
        if kind == 0:
            p = bytearray(MARKER + rng.randbytes(rng.randrange(0, 100)))
        elif kind == 1:
            p = p[:rng.randrange(0, len(p) - 1)]  # truncated
        elif kind == 2:
            p[10] ^= 0x5A  # header checksum
        elif kind == 3:
            p[0] = (rng.choice([0, 1, 5, 6, 7, 15]) << 4) | 5  # version
        elif kind == 4:
            p[0] = 0x40 | rng.randrange(0, 5)  # IHL too small
        elif kind == 5:
            p[0] = 0x4F  # IHL beyond the packet
        elif kind == 6:
            p += rng.randbytes(rng.randrange(1, 30))  # trailing bytes: total length ≠ datagram
        else:
            struct.pack_into("!H", p, 2, rng.randrange(20, 65536))  # total length lies
        if well_formed(bytes(p)):
            p[10] ^= 0xFF  # the rare accident: make it malformed for certain
        add("malformed", h2.ip, bytes(p))
    for i in range(2500):  # from the peer, inner source outside its subnet (ours, others, any)
        src = [str(own1.network_address + 5), "10.45.77.3", "8.8.8.8",
               str(IPv4Address(rng.randrange(1 << 32)))][i % 4]
        if IPv4Address(src) in own2:
            src = "10.45.77.3"
        add("spoofed_inner_source", h2.ip, bytes(inner(src, pod_ip)))
    for i in range(1500):  # from the peer, for somebody else
        dst = ["10.45.2.9", "10.45.99.1", "192.0.2.1"][i % 3]
        add("not_for_us", h2.ip, bytes(inner(peer_src, dst)))
    for i in range(1000):  # from the peer, TTL 0 or 1
        add("ttl_expired", h2.ip, bytes(inner(peer_src, pod_ip, ttl=i % 2)))
    order = list(range(len(out)))
    rng.shuffle(order)
    return [out[i] for i in order], expect


def ns_popen(ns: str, code: str, *args: str, stdin: Any = None) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


# --------------------------------------------------------------------------- the test


def test_attack_is_dropped_counted_and_never_reaches_a_pod(
        world: tuple[Lab, list[Node], Host], tmp_path: Path) -> None:
    lab, (n1, n2), attacker = world
    h1, h2 = n1.host, n2.host
    pod1, pod2 = lab.add_pod(h1, bridge="cni0"), lab.add_pod(h2, bridge="cni0")
    wait_for(lambda: pod2.ping(pod1.ip) and pod1.ping(pod2.ip), timeout=20, interval=0.2,
             what="pods reach each other over udp")
    rng = random.Random(20240611)
    packets, expect = build_attack(h1, h2, attacker, pod1.ip, rng)
    assert len(packets) == ATTACK_COUNT and sum(expect.values()) == ATTACK_COUNT
    blob = tmp_path / "attack.bin"
    blob.write_bytes(b"".join(struct.pack("!H", len(p)) + p for p in packets))

    before = n1.stats()
    sniffer = ns_popen(pod1.name, SNIFFER, "5555", stdin=subprocess.PIPE)
    assert sniffer.stdout is not None and sniffer.stdout.readline().strip() == "listening"
    legit = ns_popen(pod2.name, LEGIT_SENDER, pod1.ip, "5555", str(LEGIT_COUNT))
    attack = ns_popen(attacker.name, SENDER, str(blob))
    # the reconcile core updates the peer table mid-traffic: a third peer appears
    more = [[str(SUBNETS[1]), h2.ip], ["10.45.3.0/24", "10.9.9.9"]]
    assert json.loads(n1.ask(f"sync {json.dumps(more)}"))["udp_peer"] == 2
    out, err = attack.communicate(timeout=120)
    assert attack.returncode == 0 and out.strip() == str(ATTACK_COUNT), err
    legit.communicate(timeout=60)

    def dropped() -> dict[str, int]:
        now = n1.stats()["drops"]
        return {k: now[k] - before["drops"][k] for k in now if now[k] != before["drops"][k]}

    wait_for(lambda: dropped() == expect, timeout=30, interval=0.2,
             what=f"drops to be counted as {expect}")
    # a little settling time for any stray packet to show up at the pod, then stop the sniffer
    time.sleep(0.5)
    counts = json.loads(sniffer.communicate("stop\n", timeout=30)[0].strip().splitlines()[-1])
    assert counts["attack_frames"] == 0, "an attack packet reached the pod"
    assert counts["legit_datagrams"] == LEGIT_COUNT, "legitimate traffic was lost"
    after = n1.stats()
    assert after["rx_packets"] - before["rx_packets"] >= LEGIT_COUNT
    # and it still forwards both ways afterwards
    assert pod1.ping(pod2.ip) and pod2.ping(pod1.ip)


if __name__ == "__main__" and sys.argv[1:2] == ["node"]:
    node_main(json.loads(sys.argv[2]))
