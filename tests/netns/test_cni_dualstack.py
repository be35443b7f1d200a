"""Dual-stack and IPv6-only attachments in real namespaces (root), issue 9's CNI part.

Same shape as tests/netns/test_cni.py: a run-unique "host" namespace whose subnet.env carries an
IPv6 pair (with or without the IPv4 one), pods as namespaces, the installed plugin executed
with ``ip netns exec <host>`` as a runtime on that host would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cni import (
    CniHost,
    cni_host,
    cni_path,
    plugin_fixture,
    pod_addrs,
    pod_routes,
    run_plugin,
)
from support.harness import RUN_ID, need, need_root, sh

from netagent.cni.conf import host_veth_name

plugin_exe = plugin_fixture()
pytestmark = pytest.mark.privileged


def _call(exe: str, h: CniHost, cmd: str, conf: dict[str, Any], cid: str, netns: str = "",
          **kw: Any) -> Any:
    return run_plugin(exe, cmd, conf, host_ns=h.ns, cid=cid, netns=netns, path=cni_path(exe),
                      **kw)


@pytest.fixture(params=["dual", "v6"])
def host(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CniHost]:
    need_root()
    with cni_host(tmp_path, request.param[0] + "s", stack=request.param) as h:
        yield h


@pytest.fixture
def dual(tmp_path: Path) -> Iterator[CniHost]:
    need_root()
    with cni_host(tmp_path, "ds", stack="dual") as h:
        yield h


def _ping(pod: str, ip: str) -> bool:
    return sh("ping", "-c1", "-W2", ip, ns=Path(pod).name, check=False).returncode == 0


def _ips(res: dict[str, Any]) -> dict[str, str]:
    """Family ("4"/"6") → address without prefix, from a result of any version."""
    return {("6" if ":" in ip["address"] else "4"): ip["address"].split("/")[0]
            for ip in res["ips"]}


# --------------------------------------------------------------------------- life cycle


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_add_check_del_both_families(plugin_exe: str, host: CniHost, version: str) -> None:
    pod = host.pod(1)
    conf = host.conf(version)
    res = _call(plugin_exe, host, "ADD", conf, "c1", pod).ok()
    dual = host.stack == "dual"

    # result: one address per family on the pod interface, IPv4 first, versioned per spec
    fams = ["4", "6"] if dual else ["6"]
    assert [("6" if ":" in ip["address"] else "4") for ip in res["ips"]] == fams
    ip6 = res["ips"][-1]
    assert ip6["address"].startswith(host.prefix6) and ip6["address"].endswith("/64")
    assert ip6["gateway"] == host.gateway6 and ip6["interface"] == 2
    if version == "0.4.0":
        assert [ip["version"] for ip in res["ips"]] == fams
    else:
        assert all("version" not in ip for ip in res["ips"])
    want_routes = [{"dst": "::/0", "gw": host.gateway6}]
    if dual:
        want_routes.insert(0, {"dst": "0.0.0.0/0", "gw": host.gateway})
    assert res["routes"] == want_routes

    # the pod: addresses, default routes per family, usable at once (no DAD wait)
    assert pod_addrs(pod, family="-6") == [ip6["address"]]
    assert pod_addrs(pod) == ([res["ips"][0]["address"]] if dual else [])
    assert any(r.startswith(f"default via {host.gateway6} dev eth0")
               for r in pod_routes(pod, "-6"))
    assert "tentative" not in sh("ip", "-6", "addr", "show", "dev", "eth0", "scope", "global",
                                 ns=Path(pod).name).stdout
    assert _ping(pod, host.gateway6)
    if dual:
        assert f"default via {host.gateway} dev eth0" in pod_routes(pod)
        assert _ping(pod, host.gateway)

    # the host: both gateways on the bridge, no DAD there, forwarding on for each family
    br6 = host.run("ip", "-6", "-o", "addr", "show", "dev", host.bridge, "scope", "global").stdout
    assert f"{host.gateway6}/64" in br6 and "tentative" not in br6
    br4 = host.run("ip", "-4", "-o", "addr", "show", "dev", host.bridge).stdout
    assert (f"{host.gateway}/24" in br4) == dual
    assert host.run("sysctl", "-n", f"net.ipv6.conf.{host.bridge}.accept_dad").stdout.strip() \
        == "0"
    assert host.run("sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"
    if dual:
        assert host.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"

    # IPAM: one reservation per family, host-local's files
    assert host.reservations() == {a: "c1/eth0" for a in _ips(res).values()}

    with_prev = dict(conf, prevResult=res)
    check = _call(plugin_exe, host, "CHECK", with_prev, "c1", pod)
    assert check.rc == 0 and check.stdout == "", check

    dele = _call(plugin_exe, host, "DEL", with_prev, "c1", pod)
    assert dele.rc == 0 and dele.stdout == "", dele
    assert host.reservations() == {} and host.host_veths() == []
    _call(plugin_exe, host, "CHECK", with_prev, "c1", pod).error(102)
    assert _call(plugin_exe, host, "DEL", conf, "c1").rc == 0  # idempotent, no netns


def test_two_pods_reach_each_other_over_both_families(plugin_exe: str, dual: CniHost) -> None:
    pods = [dual.pod(i) for i in (1, 2)]
    addrs = [_ips(_call(plugin_exe, dual, "ADD", dual.conf(), f"c{i}", p).ok())
             for i, p in enumerate(pods)]
    assert addrs[0] != addrs[1] and all(set(a) == {"4", "6"} for a in addrs)
    for fam in ("4", "6"):
        assert _ping(pods[0], addrs[1][fam]), fam
        assert _ping(pods[1], addrs[0][fam]), fam


def test_not_default_gateway_routes_each_overlay(plugin_exe: str, dual: CniHost) -> None:
    pod = dual.pod(1)
    conf = dual.conf(isDefaultGateway=False)
    res = _call(plugin_exe, dual, "ADD", conf, "c1", pod).ok()
    assert res["routes"] == [{"dst": dual.network, "gw": dual.gateway},
                             {"dst": dual.network6, "gw": dual.gateway6}]
    routes6 = pod_routes(pod, "-6")
    assert not any(r.startswith("default") for r in pod_routes(pod) + routes6)
    assert any(r.startswith(f"{dual.network6} via {dual.gateway6} dev eth0") for r in routes6)
    assert _call(plugin_exe, dual, "CHECK", dict(conf, prevResult=res), "c1", pod).rc == 0


# --------------------------------------------------------------------------- IPAM requests


def test_cni_args_ip_of_either_family(plugin_exe: str, dual: CniHost) -> None:
    pods = [dual.pod(i) for i in (1, 2, 3)]
    want4, want6 = f"{dual.prefix}.77", f"{dual.prefix6}77"
    both = _call(plugin_exe, dual, "ADD", dual.conf(), "c1", pods[0],
                 args=f"IgnoreUnknown=1;IP={want4},{want6}").ok()
    assert _ips(both) == {"4": want4, "6": want6}
    only6 = _call(plugin_exe, dual, "ADD", dual.conf(), "c2", pods[1],
                  args=f"IP={dual.prefix6}78").ok()
    assert _ips(only6)["6"] == f"{dual.prefix6}78" and _ips(only6)["4"] != want4
    # c3 asks for c1's IPv6 address: code 100, and its IPv4 reservation is not left behind
    err = _call(plugin_exe, dual, "ADD", dual.conf(), "c3", pods[2], args=f"IP={want6}").error(100)
    assert want6 in err["msg"]
    assert sorted(dual.reservations().values()) == ["c1/eth0"] * 2 + ["c2/eth0"] * 2
    assert sorted(dual.host_veths()) == sorted(host_veth_name(c, "eth0") for c in ("c1", "c2"))
    assert "eth0" not in sh("ip", "link", ns=Path(pods[2]).name).stdout


def test_requested_ipv6_on_ipv4_only_network_is_code_100(plugin_exe: str,
                                                         tmp_path: Path) -> None:
    need_root()
    with cni_host(tmp_path, "4s") as h:
        pod = h.pod(1)
        err = _call(plugin_exe, h, "ADD", h.conf(), "c1", pod, args="IP=fd00::5").error(100)
        assert "IPv6" in err["msg"]
        assert h.reservations() == {} and h.host_veths() == []


def test_failed_add_releases_both_families(plugin_exe: str, dual: CniHost) -> None:
    """The bridge name is taken by a non-bridge after IPAM reserved both addresses."""
    other = f"{dual.bridge}x"[-15:]
    dual.run("ip", "link", "add", dual.bridge, "type", "veth", "peer", "name", other)
    pod = dual.pod(1)
    assert "not a bridge" in _call(plugin_exe, dual, "ADD", dual.conf(), "c1", pod).error(7)["msg"]
    assert dual.reservations() == {}
    assert sorted(dual.host_veths()) == sorted([dual.bridge, other])
    assert "eth0" not in sh("ip", "link", ns=Path(pod).name).stdout


# --------------------------------------------------------------------------- CHECK, GC, delegate


def test_check_detects_ipv6_drift(plugin_exe: str, dual: CniHost) -> None:
    pod = dual.pod(1)
    conf = dual.conf()
    res = _call(plugin_exe, dual, "ADD", conf, "c1", pod).ok()
    with_prev = dict(conf, prevResult=res)
    sh("ip", "-6", "route", "del", "default", ns=Path(pod).name)
    assert "route ::/0" in _call(plugin_exe, dual, "CHECK", with_prev, "c1", pod).error(102)["msg"]
    sh("ip", "-6", "route", "add", "default", "via", dual.gateway6, ns=Path(pod).name)
    assert _call(plugin_exe, dual, "CHECK", with_prev, "c1", pod).rc == 0
    v6 = _ips(res)["6"]
    (dual.data_dir / v6).unlink()
    assert v6 in _call(plugin_exe, dual, "CHECK", with_prev, "c1", pod).error(102)["msg"]
    (dual.data_dir / v6).write_bytes(b"c1\r\neth0")
    sh("ip", "-6", "addr", "del", f"{v6}/64", "dev", "eth0", ns=Path(pod).name)
    assert "address" in _call(plugin_exe, dual, "CHECK", with_prev, "c1", pod).error(102)["msg"]


def test_gc_releases_both_families(plugin_exe: str, dual: CniHost) -> None:
    pods = [dual.pod(i) for i in (1, 2)]
    for i, p in enumerate(pods):
        _call(plugin_exe, dual, "ADD", dual.conf("1.1.0"), f"c{i}", p).ok()
    conf = dual.conf("1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "c1", "ifname": "eth0"}]})
    call = run_plugin(plugin_exe, "GC", conf, host_ns=dual.ns, ifname="",
                      path=cni_path(plugin_exe))
    assert call.rc == 0 and call.stdout == "", call
    assert sorted(dual.reservations().values()) == ["c1/eth0", "c1/eth0"]
    assert dual.host_veths() == [host_veth_name("c1", "eth0")]


def test_delegated_host_local_gets_two_range_sets(plugin_exe: str, dual: CniHost,
                                                  tmp_path: Path) -> None:
    pod = dual.pod(1)
    hl_dir = tmp_path / "host-local"
    conf = dual.conf(ipam={"type": "host-local", "dataDir": str(hl_dir)})
    res = _call(plugin_exe, dual, "ADD", conf, "c1", pod).ok()
    got = _ips(res)
    assert got["4"].startswith(dual.prefix) and got["6"].startswith(dual.prefix6)
    assert (hl_dir / dual.name / got["4"]).exists() and (hl_dir / dual.name / got["6"]).exists()
    assert pod_addrs(pod, family="-6") == [f"{got['6']}/64"]
    assert _call(plugin_exe, dual, "CHECK", dict(conf, prevResult=res), "c1", pod).rc == 0
    _call(plugin_exe, dual, "DEL", dict(conf, prevResult=res), "c1", pod).ok()
    assert not any((hl_dir / dual.name).glob("*:*")) and dual.host_veths() == []


def test_ip_masq_is_ipv4_only(plugin_exe: str, dual: CniHost) -> None:
    need(sh("iptables", "--version", check=False).returncode == 0, "needs iptables")
    pod = dual.pod(1)
    conf = dual.conf(ipMasq=True)
    res = _call(plugin_exe, dual, "ADD", conf, "c1", pod).ok()
    assert f"-A POSTROUTING -s {_ips(res)['4']}/32" in dual.run(
        "iptables", "-w", "5", "-t", "nat", "-S").stdout
    v6_nat = dual.run("ip6tables", "-w", "5", "-t", "nat", "-S", check=False).stdout
    assert "NA-" not in v6_nat
    _call(plugin_exe, dual, "DEL", dict(conf, prevResult=res), "c1", pod).ok()
    assert "NA-" not in dual.run("iptables", "-w", "5", "-t", "nat", "-S").stdout


# --------------------------------------------------------------------------- across hosts


@contextlib.contextmanager
def _distinct_host(tmp_path: Path, other: CniHost) -> Iterator[CniHost]:
    """A second dual-stack host whose random subnets differ from `other`'s (re-drawn, never
    skipped: a skip would hide the test in CI)."""
    for attempt in range(10):
        host = CniHost(tmp_path, f"h2{attempt}", stack="dual")
        if host.prefix != other.prefix and host.prefix6 != other.prefix6:
            try:
                yield host
            finally:
                host.close()
            return
        host.close()
    raise AssertionError("could not draw distinct subnets in 10 tries")


def test_pods_on_two_hosts_reach_each_other_over_ipv6(plugin_exe: str, tmp_path: Path) -> None:
    """Two dual-stack hosts on one link, each routing the other's pod subnets (what host-gw
    renders): pod to pod works over both families, which needs the plugin's host side
    (gateways, IPv6 forwarding) and nothing else."""
    need_root()
    with cni_host(tmp_path, "h1", stack="dual") as h1, \
            _distinct_host(tmp_path, h1) as h2:
        link1, link2 = f"nu{RUN_ID}1", f"nu{RUN_ID}2"
        sh("ip", "link", "add", link1, "netns", h1.ns, "type", "veth", "peer", "name", link2,
           "netns", h2.ns)
        under = {h1: ("192.0.2.1", "fd00:7e57::1", link1),
                 h2: ("192.0.2.2", "fd00:7e57::2", link2)}
        for h, (a4, a6, dev) in under.items():
            # a long-up uplink in real life: a host forwards IPv6 only once its uplink's
            # link-local address has left DAD (the source of its neighbour solicitations)
            h.run("sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_dad=0")
            h.run("ip", "addr", "add", f"{a4}/24", "dev", dev)
            h.run("ip", "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            h.run("ip", "link", "set", dev, "up")
        for h, peer in ((h1, h2), (h2, h1)):
            a4, a6, dev = under[peer]
            h.run("ip", "route", "add", peer.subnet.replace(".1/24", ".0/24"), "via", a4)
            h.run("ip", "-6", "route", "add", peer.subnet6.replace("::1/64", "::/64"), "via", a6)
        pods = [h1.pod(1), h2.pod(1)]
        addrs = [_ips(_call(plugin_exe, h, "ADD", h.conf(), "x1", p).ok())
                 for h, p in zip((h1, h2), pods, strict=True)]
        for fam in ("4", "6"):
            assert _ping(pods[0], addrs[1][fam]), fam
            assert _ping(pods[1], addrs[0][fam]), fam


def test_failed_add_keeps_an_older_reservation(plugin_exe: str, dual: CniHost) -> None:
    """Only what the failed ADD reserved is given back: an IPv4 address the attachment held
    from before (e.g. an ADD on an IPv4-only network) stays, the new IPv6 one goes."""
    old = f"{dual.prefix}.9"
    dual.data_dir.mkdir(parents=True)
    (dual.data_dir / old).write_bytes(b"c1\r\neth0")
    dual.run("ip", "link", "add", dual.bridge, "type", "veth", "peer", "name",
             f"{dual.bridge}x"[-15:])
    pod = dual.pod(1)
    _call(plugin_exe, dual, "ADD", dual.conf(), "c1", pod).error(7)
    assert dual.reservations() == {old: "c1/eth0"}
