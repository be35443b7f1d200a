"""--ip-masq rules in real network namespaces (nft-based iptables): exact layout, idempotence,
repair, only our chains touched, and the data path — pods reach the outside NATed, while
overlay-internal traffic keeps its pod source address. The same for IPv6 through ip6tables, and
both families side by side in one namespace."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from support.harness import REPO, RUN_ID, Lab, need, need_root, netns, sh, wait_for

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


#: ip6tables: the same with the IPv6 network/subnet and multicast ff00::/8 (§14.2)
FLANNEL_RULES6 = [r.replace("224.0.0.0/4", "ff00::/8") for r in FLANNEL_RULES]


def rules(ns: str, save: str = "iptables-save") -> list[str]:
    return [ln for ln in sh(save, ns=ns).stdout.splitlines() if ln.startswith("-A ")]


def ours(ns: str, save: str = "iptables-save") -> list[str]:
    """Our rules in order, nat first then filter (iptables-save prints filter first)."""
    got = [r for r in rules(ns, save) if "flanneld" in r]
    return [r for r in got if "masq" in r] + [r for r in got if "forward" in r]


def ours6(ns: str) -> list[str]:
    return ours(ns, "ip6tables-save")


def need_ip6tables() -> None:
    need_root()
    need(all(shutil.which(b) for b in ("ip6tables", "ip6tables-save", "ip6tables-restore")),
         "needs ip6tables (apt-get install iptables)")


def masq(ns: str, action: str, net: str, sub: str) -> dict[str, object]:
    """Drive netagent.masq.Masquerade inside `ns` (iptables acts on the caller's namespace).

    `net`/`sub` of either family: the network picks iptables or ip6tables."""
    code = (
        "import json, sys\n"
        "from ipaddress import ip_network as N\n"
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


def test_ipv6_layout_idempotence_repair_and_only_ours() -> None:
    need_ip6tables()
    with netns(f"na{RUN_ID}-mq6") as ns:
        sh("ip6tables", "-t", "nat", "-A", "POSTROUTING", "-s", "fd00:99::/64", "-j",
           "MASQUERADE", ns=ns)
        sh("ip6tables", "-A", "FORWARD", "-i", "lo", "-j", "ACCEPT", ns=ns)
        net, sub = "fd00:10:5::/48", "fd00:10:5:72::/64"
        assert masq(ns, "ensure", net, sub) == {"wrote": True, "check": []}
        want = [r.format(net=net, sub=sub) for r in FLANNEL_RULES6]
        assert ours6(ns) == want  # flannel's ip6tables text and order
        assert ours(ns) == []  # nothing in the IPv4 tables
        # second run: already in place, nothing written
        assert masq(ns, "ensure", net, sub) == {"wrote": False, "check": []}
        # a hand-deleted rule in each chain comes back, in place and order
        sh("ip6tables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "-s", net, "!", "-d", "ff00::/8",
           "-m", "comment", "--comment", "flanneld masq", "-j", "MASQUERADE", "--random-fully",
           ns=ns)
        sh("ip6tables", "-D", "FLANNEL-FWD", "-d", net, "-m", "comment", "--comment",
           "flanneld forward", "-j", "ACCEPT", ns=ns)
        assert len(ours6(ns)) == len(want) - 2
        assert masq(ns, "ensure", net, sub) == {"wrote": True, "check": []}
        assert ours6(ns) == want
        # removal takes only ours: the foreign POSTROUTING and FORWARD rules stay
        masq(ns, "remove", net, sub)
        left = sh("ip6tables-save", ns=ns).stdout
        assert "FLANNEL" not in left and "flanneld" not in left
        assert "-A POSTROUTING -s fd00:99::/64 -j MASQUERADE" in left
        assert "-A FORWARD -i lo -j ACCEPT" in left


def test_ipv4_and_ipv6_masquerade_in_one_namespace_do_not_disturb_each_other() -> None:
    need_ip6tables()
    with netns(f"na{RUN_ID}-mq46") as ns:
        net4, sub4, net6, sub6 = "10.5.0.0/16", "10.5.72.0/24", "fd00:10:5::/48", "fd00:10:5:72::/64"
        sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "192.168.7.0/24", "-j",
           "MASQUERADE", ns=ns)
        sh("ip6tables", "-t", "nat", "-A", "POSTROUTING", "-s", "fd00:99::/64", "-j",
           "MASQUERADE", ns=ns)
        want4 = [r.format(net=net4, sub=sub4) for r in FLANNEL_RULES]
        want6 = [r.format(net=net6, sub=sub6) for r in FLANNEL_RULES6]
        assert masq(ns, "ensure", net4, sub4)["wrote"] is True
        assert masq(ns, "ensure", net6, sub6)["wrote"] is True
        assert (ours(ns), ours6(ns)) == (want4, want6)
        # each family's re-check finds its own rules untouched by the other's batch
        assert masq(ns, "ensure", net4, sub4) == {"wrote": False, "check": []}
        assert masq(ns, "ensure", net6, sub6) == {"wrote": False, "check": []}
        # removing one family leaves the other's rules and both foreign rules
        masq(ns, "remove", net6, sub6)
        assert (ours(ns), ours6(ns)) == (want4, [])
        assert masq(ns, "ensure", net4, sub4) == {"wrote": False, "check": []}
        assert masq(ns, "ensure", net6, sub6)["wrote"] is True
        masq(ns, "remove", net4, sub4)
        assert (ours(ns), ours6(ns)) == ([], want6)
        assert masq(ns, "ensure", net6, sub6) == {"wrote": False, "check": []}
        # one instance retargeted across families (a live switch to an IPv6-only network):
        # the next ensure() deletes its IPv4 rules and installs the IPv6 ones
        masq(ns, "remove", net6, sub6)
        code = (
            "from ipaddress import ip_network as N\n"
            "from netagent.masq import Masquerade\n"
            f"m = Masquerade(N('{net4}'), N('{sub4}'))\n"
            "assert m.ensure()\n"
            f"m.retarget(N('{net6}'), N('{sub6}'))\n"
            "assert m.ensure() and m.check() == []\n"
        )
        sh(sys.executable, "-c", code, ns=ns, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert (ours(ns), ours6(ns)) == ([], want6)
        assert "-A POSTROUTING -s 192.168.7.0/24 -j MASQUERADE" in rules(ns)
        assert "-A POSTROUTING -s fd00:99::/64 -j MASQUERADE" in rules(ns, "ip6tables-save")


def source_seen(recv_ns: str, send_ns: str, dst: str, port: int = 40007) -> str:
    """Source address of a UDP datagram from `send_ns` as seen by a listener in `recv_ns`."""
    fam, any_addr = ("AF_INET6", "::") if ":" in dst else ("AF_INET", "0.0.0.0")
    listener = subprocess.Popen(
        ["ip", "netns", "exec", recv_ns, sys.executable, "-c",
         "import socket\n"
         f"s = socket.socket(socket.{fam}, socket.SOCK_DGRAM)\n"
         f"s.bind(('{any_addr}', {port})); s.settimeout(15)\n"
         "print(s.recvfrom(64)[1][0], flush=True)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(100):  # until the listener is bound and got one
            sh(sys.executable, "-c", f"import socket; socket.socket(socket.{fam}, "
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


def veth(host: str, name: str, peer_ns: str, host_addr: str, peer_addr: str) -> None:
    """A veth from `host` (`name`) to `peer_ns` (eth0), addresses without DAD wait."""
    sh("ip", "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", peer_ns, ns=host)
    sh("ip", "addr", "add", host_addr, "dev", name, "nodad", ns=host)
    sh("ip", "addr", "add", peer_addr, "dev", "eth0", "nodad", ns=peer_ns)
    sh("ip", "link", "set", name, "up", ns=host)
    sh("ip", "link", "set", "eth0", "up", ns=peer_ns)


def test_ipv6_pod_reaches_outside_natted_and_overlay_traffic_keeps_pod_source() -> None:
    """A host namespace routing between a pod (our subnet), a remote pod (elsewhere in the
    overlay network) and the outside, which has no route back to the overlay: only a
    masqueraded datagram carries an address the outside can answer."""
    need_ip6tables()
    net, sub = "fd00:10:5::/48", "fd00:10:5:72::/64"
    pod, remote, host_out, outside = ("fd00:10:5:72::2", "fd00:10:5:9::2", "2001:db8:100::1",
                                      "2001:db8:100::2")
    with contextlib.ExitStack() as stack:
        h, p, r, o = (stack.enter_context(netns(f"na{RUN_ID}-m6{x}")) for x in "hpro")
        sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=h)
        veth(h, "vp", p, "fd00:10:5:72::1/64", f"{pod}/64")
        veth(h, "vr", r, "fd00:10:5:9::1/64", f"{remote}/64")
        veth(h, "vo", o, f"{host_out}/64", f"{outside}/64")
        sh("ip", "-6", "route", "add", "default", "via", "fd00:10:5:72::1", ns=p)
        sh("ip", "-6", "route", "add", "default", "via", "fd00:10:5:9::1", ns=r)
        # Docker's FORWARD DROP: pod traffic passes only through FLANNEL-FWD
        sh("ip6tables", "-P", "FORWARD", "DROP", ns=h)
        assert masq(h, "ensure", net, sub) == {"wrote": True, "check": []}
        assert source_seen(o, p, outside, port=40016) == host_out
        assert source_seen(r, p, remote, port=40017) == pod
        # without our rules (and FORWARD opened by hand) the outside sees the pod's own address:
        # the NAT above was ours
        masq(h, "remove", net, sub)
        sh("ip6tables", "-P", "FORWARD", "ACCEPT", ns=h)
        assert source_seen(o, p, outside, port=40018) == pod


def test_forward_rules_by_default_and_the_flanneld_flags(lab: Lab) -> None:
    """Docker's FORWARD DROP on both hosts and no --ip-masq: pods still reach each other,
    because the agent installs FLANNEL-FWD by default (flannel's --iptables-forward-rules,
    default true) and no nat chain. Restarted with flanneld's one-dash
    ``-iptables-forward-rules=false`` its FORWARD rules go (and pod traffic with them, which
    shows they carried it); with ``-ip-masq -ip-masq-fully-random-disable`` both chains are
    back, the masquerade rules without --random-fully."""
    assert lab.etcd is not None
    net = "10.14.0.0/16"
    lab.etcd.put(f"{PREFIX}/config", f'{{"Network":"{net}","Backend":{{"Type":"vxlan"}}}}')
    h1, h2 = lab.add_host(), lab.add_host()
    for h in (h1, h2):
        sh("iptables", "-P", "FORWARD", "DROP", ns=h.name)
        lab.start_agent(h, "--iptables-resync", "1")
    for h in (h1, h2):
        wait_for(h.subnet_file.exists, 30, what=f"{h.name} subnet.env")
    p1, p2 = lab.add_pod(h1), lab.add_pod(h2)
    fwd = [r.format(net=net) for r in FLANNEL_RULES if "forward" in r]
    wait_for(lambda: ours(h1.name) == fwd, 10, what="FORWARD rules on h1")
    assert ours(h2.name) == fwd and "FLANNEL-POSTRTG" not in sh("iptables-save", ns=h1.name).stdout
    assert h1.status()["masquerade"] == "off (FORWARD rules in place)"
    wait_for(lambda: p1.ping(p2.ip), 20, interval=0.3, what="pods reach each other")

    assert lab.stop_agent(h2) == 0
    lab.start_agent(h2, "-iptables-forward-rules=false", "-iptables-resync=1")
    wait_for(lambda: ours(h2.name) == [], 15, what="h2's FORWARD rules removed")
    assert not p1.ping(p2.ip, count=2), "FORWARD DROP without our rules must drop pod traffic"
    assert "FLANNEL" not in sh("iptables-save", ns=h2.name).stdout

    assert lab.stop_agent(h2) == 0
    lab.start_agent(h2, "-ip-masq", "-ip-masq-fully-random-disable", "-iptables-resync", "1")
    sub2 = p2.ip.rsplit(".", 1)[0] + ".0/24"
    want = [r.format(net=net, sub=sub2).replace(" --random-fully", "") for r in FLANNEL_RULES]
    wait_for(lambda: ours(h2.name) == want, 15, what="h2's masquerade + FORWARD rules")
    wait_for(lambda: p1.ping(p2.ip), 20, interval=0.3, what="pods reach each other again")
    # a deleted FORWARD rule is back within the --iptables-resync period (1 s here)
    sh("iptables", "-F", "FLANNEL-FWD", ns=h1.name)
    t0 = time.monotonic()
    wait_for(lambda: ours(h1.name) == fwd, 10, interval=0.05, what="h1's FORWARD rules restored")
    print(f"FORWARD rules restored in {time.monotonic() - t0:.2f} s (--iptables-resync 1)")
