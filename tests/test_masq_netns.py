"""--ip-masq rules in real network namespaces (nft-based iptables): exact layout, idempotence,
repair, only our chains touched, and the data path — pods reach the outside NATed, while
overlay-internal traffic keeps its pod source address."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from harness import REPO, RUN_ID, Lab, need_root, netns, sh, wait_for

pytestmark = pytest.mark.privileged

PREFIX = "/coreos.com/network"

FLANNEL_RULES = [
    '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
    '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s {sub} -d {net} -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s {net} -d {sub} -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG ! -s {net} -d {sub} -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s {net} ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" '
    '-j MASQUERADE --random-fully',
    '-A FLANNEL-POSTRTG ! -s {net} -d {net} -m comment --comment "flanneld masq" '
    '-j MASQUERADE --random-fully',
    '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
    '-A FLANNEL-FWD -s {net} -m comment --comment "flanneld forward" -j ACCEPT',
    '-A FLANNEL-FWD -d {net} -m comment --comment "flanneld forward" -j ACCEPT',
]


def rules(ns: str) -> list[str]:
    return [ln for ln in sh("iptables-save", ns=ns).stdout.splitlines() if ln.startswith("-A ")]


def ours(ns: str) -> list[str]:
    """Our rules in order, nat first then filter (iptables-save prints filter first)."""
    got = [r for r in rules(ns) if "flanneld" in r]
    return [r for r in got if "masq" in r] + [r for r in got if "forward" in r]


def masq(ns: str, action: str, net: str, sub: str) -> dict[str, object]:
    """Drive netagent.masq.Masquerade inside `ns` (iptables acts on the caller's namespace)."""
    code = (
        "import json, sys\n"
        "from ipaddress import IPv4Network as N\n"
        "from netagent.masq import Masquerade\n"
        f"m = Masquerade(N('{net}'), N('{sub}'))\n"
        f"action = '{action}'\n"
        "out = {}\n"
        "if action == 'ensure':\n"
        "    out['wrote'] = m.ensure(); out['check'] = m.check()\n"
        "elif action == 'remove':\n"
        "    m.remove()\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return json.loads(sh(sys.executable, "-c", code, ns=ns, env=env).stdout)  # type: ignore[no-any-return]


def test_layout_idempotence_repair_retarget_and_only_ours() -> None:
    need_root()
    with netns(f"na{RUN_ID}-mq") as ns:
        # someone else's rules, before and after where ours go
        sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "192.168.7.0/24", "-j",
           "MASQUERADE", ns=ns)
        sh("iptables", "-A", "FORWARD", "-i", "lo", "-j", "ACCEPT", ns=ns)
        net, sub = "10.5.0.0/16", "10.5.72.0/24"
        assert masq(ns, "ensure", net, sub) == {"wrote": True, "check": []}
        want = [r.format(net=net, sub=sub) for r in FLANNEL_RULES]
        got = rules(ns)
        assert ours(ns) == want  # flannel's exact text and order
        assert "-A POSTROUTING -s 192.168.7.0/24 -j MASQUERADE" in got
        assert "-A FORWARD -i lo -j ACCEPT" in got
        # second run: already in place, nothing written
        assert masq(ns, "ensure", net, sub) == {"wrote": False, "check": []}
        # someone deletes one of our rules and duplicates our hook: repaired in one batch
        sh("iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "-s", net, "!", "-d", "224.0.0.0/4",
           "-m", "comment", "--comment", "flanneld masq", "-j", "MASQUERADE", "--random-fully",
           ns=ns)
        sh("iptables", "-A", "FORWARD", "-m", "comment", "--comment", "flanneld forward", "-j",
           "FLANNEL-FWD", ns=ns)
        assert masq(ns, "ensure", net, sub)["wrote"] is True
        assert ours(ns) == want
        # renumbered subnet: replaced, not added to
        sub2 = "10.5.9.0/24"
        assert masq(ns, "ensure", net, sub2)["wrote"] is True
        assert ours(ns) == [
            r.format(net=net, sub=sub2) for r in FLANNEL_RULES]
        # removal takes only ours
        masq(ns, "remove", net, sub2)
        left = sh("iptables-save", ns=ns).stdout
        assert "FLANNEL" not in left and "flanneld" not in left
        assert "-A POSTROUTING -s 192.168.7.0/24 -j MASQUERADE" in left
        assert "-A FORWARD -i lo -j ACCEPT" in left


def source_seen(recv_ns: str, send_ns: str, dst: str, port: int = 40007) -> str:
    """Source address of a UDP datagram from `send_ns` as seen by a listener in `recv_ns`."""
    listener = subprocess.Popen(
        ["ip", "netns", "exec", recv_ns, sys.executable, "-c",
         "import socket\n"
         "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
         f"s.bind(('0.0.0.0', {port})); s.settimeout(15)\n"
         "print(s.recvfrom(64)[1][0], flush=True)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(100):  # until the listener is bound and got one
            sh(sys.executable, "-c", "import socket; socket.socket(socket.AF_INET, "
               f"socket.SOCK_DGRAM).sendto(b'x', ('{dst}', {port}))", ns=send_ns, check=False)
            if listener.poll() is not None:
                break
            time.sleep(0.1)
        out, _ = listener.communicate(timeout=15)
        return out.strip()
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(5)


def test_pod_reaches_outside_natted_and_overlay_traffic_keeps_pod_source(lab: Lab) -> None:
    assert lab.etcd is not None
    net = "10.13.0.0/16"
    lab.etcd.put(f"{PREFIX}/config", f'{{"Network":"{net}","Backend":{{"Type":"vxlan"}}}}')
    h1, h2 = lab.add_host(), lab.add_host()
    for h in (h1, h2):
        # Docker's FORWARD DROP: pod traffic passes only through FLANNEL-FWD
        sh("iptables", "-P", "FORWARD", "DROP", ns=h.name)
        lab.start_agent(h, "--ip-masq", "--repair-interval", "1")
    for h in (h1, h2):
        wait_for(h.subnet_file.exists, 30, what=f"{h.name} subnet.env")
        assert "FLANNEL_IPMASQ=true" in h.subnet_file.read_text()
    p1, p2 = lab.add_pod(h1), lab.add_pod(h2)
    sub1 = p1.ip.rsplit(".", 1)[0] + ".0/24"
    # the rules were in place before subnet.env was written, in flannel's layout
    assert ours(h1.name) == [
        r.format(net=net, sub=sub1) for r in FLANNEL_RULES]

    # outside the overlay (the underlay namespace has no route to pods): works only when NATed
    assert p1.ping(lab.etcd_ip, count=3)
    assert source_seen(lab.ul, p1.name, lab.etcd_ip) == h1.ip
    # overlay-internal: the receiving pod sees the sending pod's own address
    assert p1.ping(p2.ip, count=3)
    assert source_seen(p2.name, p1.name, p2.ip) == p1.ip

    # a deleted rule comes back on the re-check timer; foreign rules stay
    sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-d", "198.51.100.0/24", "-j", "RETURN",
       ns=h1.name)
    sh("iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG", ns=h1.name)
    wait_for(lambda: sum("FLANNEL-POSTRTG" in r for r in rules(h1.name)) == 7, 15,
             what="rules restored")
    assert "-A POSTROUTING -d 198.51.100.0/24 -j RETURN" in rules(h1.name)
    assert source_seen(lab.ul, p1.name, lab.etcd_ip, port=40008) == h1.ip
    for h in (h1, h2):
        assert lab.stop_agent(h) == 0
    # SIGTERM leaves the rules (restart must not interrupt traffic)
    assert sum("flanneld" in r for r in rules(h1.name)) == 10
