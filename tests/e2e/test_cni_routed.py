"""Routed (bridge-less) pod attachment, ``"mode": "routed"`` (root, real namespaces).

Same shape as tests/netns/test_cni.py: a run-unique "host" namespace with its own subnet.env, pods as
namespaces, the installed plugin executed with ``ip netns exec <host>`` as a runtime on that
host would (client + CNI server; the life cycle also through the Python launcher alone). The
last test runs two namespace hosts with the real agent (vxlan) and checks that its drift
repair leaves the pods' host routes alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
from support.cni import (
    CniHost,
    cni_host,
    cni_path,
    launcher_fixture,
    plugin_fixture,
    pod_addrs,
    pod_routes,
    run_plugin,
)
from support.harness import (
    Host,
    Lab,
    add_netns,
    del_netns,
    need,
    need_root,
    read_env_file,
    sh,
    wait_for,
)

from netagent.cni.conf import POD_ROUTE_PROTO, host_veth_name

plugin_exe = plugin_fixture()
launcher_exe = launcher_fixture()
pytestmark = pytest.mark.privileged


@pytest.fixture(params=["client", "launcher"])
def exe(request: pytest.FixtureRequest) -> str:
    """Both ways a runtime's exec reaches the plugin: the C client handing the call to the CNI
    server, and the Python launcher alone."""
    need_root()
    return str(request.getfixturevalue("plugin_exe" if request.param == "client"
                                       else "launcher_exe"))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[CniHost]:
    need_root()
    with cni_host(tmp_path, "rt") as h:
        yield h


@pytest.fixture
def dual(tmp_path: Path) -> Iterator[CniHost]:
    need_root()
    with cni_host(tmp_path, "rd", stack="dual") as h:
        yield h


def _call(exe: str, h: CniHost, cmd: str, conf: dict[str, Any], cid: str, netns: str = "",
          **kw: Any) -> Any:
    return run_plugin(exe, cmd, conf, host_ns=h.ns, cid=cid, netns=netns, path=cni_path(exe),
                      **kw)


def _routed(h: CniHost, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    return h.conf(version, mode="routed", **extra)


def _ping(pod: str, ip: str) -> bool:
    return sh("ping", "-c1", "-W2", ip, ns=Path(pod).name, check=False).returncode == 0


def _ips(res: dict[str, Any]) -> dict[str, str]:
    """Family ("4"/"6") → address without prefix."""
    return {("6" if ":" in ip["address"] else "4"): ip["address"].split("/")[0]
            for ip in res["ips"]}


def _mac(ns: str, dev: str) -> str:
    return str(json.loads(sh("ip", "-j", "link", "show", dev, ns=ns).stdout)[0]["address"])


def _neighs(ns: str, dev: str, family: str = "-4", proxy: bool = False) -> list[dict[str, Any]]:
    args = ["ip", "-j", family, "neigh", "show", "dev", dev]
    if proxy:
        args.append("proxy")
    out = sh(*args, ns=ns).stdout.strip()
    return json.loads(out) if out else []  # type: ignore[no-any-return]


def _host_routes(h: CniHost, family: str = "-4") -> list[dict[str, Any]]:
    """The host's routes marked as routed pods' (proto POD_ROUTE_PROTO)."""
    out = h.run("ip", "-j", family, "route", "show", "proto", str(POD_ROUTE_PROTO)).stdout
    return json.loads(out) if out.strip() else []  # type: ignore[no-any-return]


def _assert_routed_kernel(h: CniHost, pod: str, cid: str, ip: str, gw: str) -> None:
    """Both sides of one routed attachment for one address family, as the kernel shows them."""
    fam = "-6" if ":" in ip else "-4"
    plen = 128 if ":" in ip else 32
    hv = host_veth_name(cid, "eth0")
    host_mac, pod_mac = _mac(h.ns, hv), _mac(Path(pod).name, "eth0")
    assert f"{ip}/{plen}" in pod_addrs(pod, family=fam)
    routes = pod_routes(pod, fam)
    assert any(r.startswith(f"{gw} dev eth0") for r in routes), routes
    if fam == "-4":
        assert f"{gw} dev eth0 scope link" in routes
    neigh = {n["dst"]: n for n in _neighs(Path(pod).name, "eth0", fam)}
    assert neigh[gw]["lladdr"] == host_mac and "PERMANENT" in neigh[gw]["state"], neigh
    mine = [r for r in _host_routes(h, fam) if r["dst"] in (ip, f"{ip}/{plen}")]
    assert len(mine) == 1 and mine[0]["dev"] == hv, _host_routes(h, fam)
    if fam == "-4":
        assert mine[0].get("scope") == "link", mine
    hn = {n["dst"]: n for n in _neighs(h.ns, hv, fam)}
    assert hn[ip]["lladdr"] == pod_mac and "PERMANENT" in hn[ip]["state"], hn
    assert h.run("ip", "-o", fam, "route", "get", ip).stdout.split(" dev ")[1].split()[0] == hv


# --------------------------------------------------------------------------- config


def test_unknown_mode_is_code_7_naming_the_field(plugin_exe: str, host: CniHost) -> None:
    pod = host.pod(1)
    err = _call(plugin_exe, host, "ADD", host.conf(mode="ptp"), "c1", pod).error(7)
    assert "mode" in err["msg"] and "ptp" in err.get("details", ""), err
    assert host.reservations() == {} and host.host_veths() == []
    _call(plugin_exe, host, "ADD", host.conf(mode=None), "c1", pod).error(7)


def test_route_owner_never_claims_pod_routes() -> None:
    """The agent's sweep deletes only routes route_owner claims: never a routed pod's host
    route, inside the own subnet or outside it (a subnet the host held before a renumbering)."""
    from netagent.kernel import Route, route_owner

    net, own = ip_network("10.50.0.0/16"), ip_network("10.50.3.0/24")
    is_ours = route_owner(net, lambda: own)  # type: ignore[arg-type]
    for dst in ("10.50.3.7/32", "10.50.9.7/32"):
        assert not is_ours(Route(ip_network(dst), None, 5, proto=POD_ROUTE_PROTO))
    assert is_ours(Route(ip_network("10.50.9.0/24"), None, 5))  # a peer route: the agent's


# --------------------------------------------------------------------------- life cycle


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_routed_add_check_del_ipv4(exe: str, host: CniHost, version: str) -> None:
    pod = host.pod(1)
    conf = _routed(host, version)
    res = _call(exe, host, "ADD", conf, "c1", pod).ok()

    # result: no bridge entry, the pod's address as a /32 on interface 1
    hv = host_veth_name("c1", "eth0")
    assert [i["name"] for i in res["interfaces"]] == [hv, "eth0"]
    assert res["interfaces"][1]["sandbox"] == pod
    assert res["interfaces"][0]["mac"] == _mac(host.ns, hv)
    ip = res["ips"][0]
    assert ip["address"].startswith(f"{host.prefix}.") and ip["address"].endswith("/32")
    assert ip["gateway"] == host.gateway and ip["interface"] == 1
    assert ("version" in ip) == (version == "0.4.0")
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": host.gateway}]

    addr = ip["address"].split("/")[0]
    _assert_routed_kernel(host, pod, "c1", addr, host.gateway)
    assert f"default via {host.gateway} dev eth0" in pod_routes(pod)
    assert f"mtu {host.mtu}" in sh("ip", "-o", "link", "show", "eth0", ns=Path(pod).name).stdout
    assert f"mtu {host.mtu}" in host.run("ip", "-o", "link", "show", hv).stdout
    assert "master" not in host.run("ip", "-o", "link", "show", hv).stdout
    assert host.run("ip", "link", "show", host.bridge, check=False).returncode != 0  # no bridge
    assert host.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    assert host.reservations() == {addr: "c1/eth0"}

    with_prev = dict(conf, prevResult=res)
    check = _call(exe, host, "CHECK", with_prev, "c1", pod)
    assert check.rc == 0 and check.stdout == "", check
    # a bridge-mode CHECK of a routed pod fails (the conf decides what is checked)
    _call(exe, host, "CHECK", dict(host.conf(version), prevResult=res), "c1", pod).error(102)

    dele = _call(exe, host, "DEL", with_prev, "c1", pod)
    assert dele.rc == 0 and dele.stdout == "", dele
    assert host.reservations() == {} and host.host_veths() == []
    assert _host_routes(host) == []
    assert host.run("ip", "neigh", "show", "nud", "permanent").stdout == ""
    assert "eth0" not in sh("ip", "-o", "link", ns=Path(pod).name).stdout
    _call(exe, host, "CHECK", with_prev, "c1", pod).error(102)
    assert _call(exe, host, "DEL", with_prev, "c1", pod).rc == 0
    host.drop_pod(pod)
    assert _call(exe, host, "DEL", conf, "c1", pod).rc == 0
    assert _call(exe, host, "DEL", conf, "c1").rc == 0


@pytest.mark.parametrize("stack", ["dual", "v6"])
def test_routed_add_check_del_dual_stack(exe: str, tmp_path: Path, stack: str) -> None:
    need_root()
    with cni_host(tmp_path, f"r{stack[0]}", stack=stack) as h:
        pod = h.pod(1)
        conf = _routed(h)
        res = _call(exe, h, "ADD", conf, "c1", pod).ok()
        fams = ["4", "6"] if stack == "dual" else ["6"]
        assert [("6" if ":" in ip["address"] else "4") for ip in res["ips"]] == fams
        assert all(ip["interface"] == 1 for ip in res["ips"])
        ip6 = res["ips"][-1]
        assert ip6["address"].startswith(h.prefix6) and ip6["address"].endswith("/128")
        assert ip6["gateway"] == h.gateway6
        want_routes = [{"dst": "::/0", "gw": h.gateway6}]
        if stack == "dual":
            want_routes.insert(0, {"dst": "0.0.0.0/0", "gw": h.gateway})
        assert res["routes"] == want_routes

        got = _ips(res)
        _assert_routed_kernel(h, pod, "c1", got["6"], h.gateway6)
        assert any(r.startswith(f"default via {h.gateway6} dev eth0")
                   for r in pod_routes(pod, "-6"))
        assert "tentative" not in sh("ip", "-6", "addr", "show", "dev", "eth0", "scope",
                                     "global", ns=Path(pod).name).stdout
        assert h.run("sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"
        if stack == "dual":
            _assert_routed_kernel(h, pod, "c1", got["4"], h.gateway)
        assert h.reservations() == {a: "c1/eth0" for a in got.values()}

        with_prev = dict(conf, prevResult=res)
        check = _call(exe, h, "CHECK", with_prev, "c1", pod)
        assert check.rc == 0 and check.stdout == "", check
        assert _call(exe, h, "DEL", with_prev, "c1", pod).ok() is None
        assert h.reservations() == {} and h.host_veths() == []
        assert _host_routes(h, "-6") == [] and _host_routes(h) == []
        _call(exe, h, "CHECK", with_prev, "c1", pod).error(102)
        assert _call(exe, h, "DEL", conf, "c1").rc == 0


def test_routed_not_default_gateway_routes_each_overlay(plugin_exe: str, dual: CniHost) -> None:
    pod = dual.pod(1)
    conf = _routed(dual, isDefaultGateway=False)
    res = _call(plugin_exe, dual, "ADD", conf, "c1", pod).ok()
    assert res["routes"] == [{"dst": dual.network, "gw": dual.gateway},
                             {"dst": dual.network6, "gw": dual.gateway6}]
    assert f"{dual.network} via {dual.gateway} dev eth0" in pod_routes(pod)
    assert not any(r.startswith("default") for r in pod_routes(pod) + pod_routes(pod, "-6"))
    assert _call(plugin_exe, dual, "CHECK", dict(conf, prevResult=res), "c1", pod).rc == 0


def test_routed_with_delegated_host_local(plugin_exe: str, dual: CniHost,
                                         tmp_path: Path) -> None:
    pod = dual.pod(1)
    hl_dir = tmp_path / "host-local"
    conf = _routed(dual, ipam={"type": "host-local", "dataDir": str(hl_dir)})
    res = _call(plugin_exe, dual, "ADD", conf, "c1", pod).ok()
    got = _ips(res)
    assert (hl_dir / dual.name / got["4"]).exists() and (hl_dir / dual.name / got["6"]).exists()
    assert [ip["address"].rsplit("/", 1)[1] for ip in res["ips"]] == ["32", "128"]
    _assert_routed_kernel(dual, pod, "c1", got["4"], dual.gateway)
    _assert_routed_kernel(dual, pod, "c1", got["6"], dual.gateway6)
    assert _call(plugin_exe, dual, "CHECK", dict(conf, prevResult=res), "c1", pod).rc == 0
    _call(plugin_exe, dual, "DEL", dict(conf, prevResult=res), "c1", pod).ok()
    assert not (hl_dir / dual.name / got["4"]).exists() and dual.host_veths() == []


# --------------------------------------------------------------------------- reachability


def test_two_routed_pods_reach_each_other_over_both_families(plugin_exe: str,
                                                             dual: CniHost) -> None:
    pods = [dual.pod(i) for i in (1, 2)]
    addrs = [_ips(_call(plugin_exe, dual, "ADD", _routed(dual), f"c{i}", p).ok())
             for i, p in enumerate(pods)]
    assert addrs[0] != addrs[1]
    for fam in ("4", "6"):
        assert _ping(pods[0], addrs[1][fam]), fam
        assert _ping(pods[1], addrs[0][fam]), fam


@pytest.mark.parametrize("first", ["bridge", "routed"])
def test_routed_and_bridged_pods_reach_each_other(plugin_exe: str, dual: CniHost,
                                                  first: str) -> None:
    """Both orders: the bridge existing before the routed pod, and created after it. The
    host's /32 (/128) beats the bridge's connected /24 (/64); a bridge pod, which holds the
    whole subnet on-link, gets the host's ARP/NDP answer for the routed pod."""
    pods = {"bridge": dual.pod("b"), "routed": dual.pod("r")}
    confs = {"bridge": dual.conf(), "routed": _routed(dual)}
    order = [first, "routed" if first == "bridge" else "bridge"]
    addrs = {kind: _ips(_call(plugin_exe, dual, "ADD", confs[kind], f"c{kind}",
                              pods[kind]).ok()) for kind in order}
    hv = host_veth_name("crouted", "eth0")
    for fam, flag in (("4", "-4"), ("6", "-6")):
        dev = dual.run("ip", "-o", flag, "route", "get", addrs["routed"][fam]).stdout
        assert f" dev {hv} " in dev, dev
        assert _ping(pods["bridge"], addrs["routed"][fam]), fam
        assert _ping(pods["routed"], addrs["bridge"][fam]), fam
    proxies = [n["dst"] for n in _neighs(dual.ns, dual.bridge, "-6", proxy=True)]
    assert proxies == [addrs["routed"]["6"]]
    pod3 = dual.pod(3)
    res = _call(plugin_exe, dual, "ADD", confs["routed"], "c3", pod3).ok()
    assert _call(plugin_exe, dual, "CHECK", dict(confs["routed"], prevResult=res), "c3",
                 pod3).rc == 0
    # DEL takes the proxy entry with it, whatever mode the DEL's conf names
    assert _call(plugin_exe, dual, "DEL", confs["bridge"], "crouted").rc == 0
    _call(plugin_exe, dual, "DEL", confs["routed"], "c3").ok()
    assert _neighs(dual.ns, dual.bridge, "-6", proxy=True) == []
    assert _host_routes(dual) == [] and _host_routes(dual, "-6") == []
    assert dual.host_veths() == [host_veth_name("cbridge", "eth0")]


def test_proxy_entries_of_others_are_left_alone(plugin_exe: str, dual: CniHost) -> None:
    """DEL sweeps only the proxy entries it marked."""
    _call(plugin_exe, dual, "ADD", dual.conf(), "cb", dual.pod("b")).ok()
    foreign = f"{dual.prefix6}abcd"
    dual.run("ip", "-6", "neigh", "add", "proxy", foreign, "dev", dual.bridge)
    _call(plugin_exe, dual, "ADD", _routed(dual), "cr", dual.pod("r")).ok()
    _call(plugin_exe, dual, "DEL", _routed(dual), "cr").ok()
    assert [n["dst"] for n in _neighs(dual.ns, dual.bridge, "-6", proxy=True)] == [foreign]


def test_ip_masq_rules_follow_the_routed_pod(plugin_exe: str, host: CniHost) -> None:
    need(sh("iptables", "--version", check=False).returncode == 0, "needs iptables")
    pod = host.pod(1)
    conf = _routed(host, ipMasq=True)
    res = _call(plugin_exe, host, "ADD", conf, "c1", pod).ok()
    ip = _ips(res)["4"]
    rules = host.run("iptables", "-w", "5", "-t", "nat", "-S").stdout
    assert f"-A POSTROUTING -s {ip}/32" in rules and "MASQUERADE" in rules
    _call(plugin_exe, host, "DEL", dict(conf, prevResult=res), "c1", pod).ok()
    assert "NA-" not in host.run("iptables", "-w", "5", "-t", "nat", "-S").stdout


# --------------------------------------------------------------------------- failed ADD


def test_failed_add_leaves_nothing_ipv6_disabled_in_pod(exe: str, dual: CniHost) -> None:
    """IPv6 is off in the pod: the IPv4 address is on, IPv6 fails; everything goes."""
    pod = dual.pod(1)
    sh("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
       "net.ipv6.conf.default.disable_ipv6=1", ns=Path(pod).name)
    err = _call(exe, dual, "ADD", _routed(dual), "c1", pod).error(999)
    assert "IPv6 is disabled" in err["msg"]
    assert dual.reservations() == {} and dual.host_veths() == []
    assert _host_routes(dual) == [] and _host_routes(dual, "-6") == []
    assert "eth0" not in sh("ip", "link", ns=Path(pod).name).stdout


def test_failed_add_leaves_nothing_host_route_taken(plugin_exe: str, dual: CniHost) -> None:
    """Someone else routes the pod's address on the host: code 100 once both families'
    addresses, pod routes, neighbours and a proxy entry on an existing bridge were made;
    all of it goes, the foreign route stays."""
    _call(plugin_exe, dual, "ADD", dual.conf(), "cb", dual.pod("b")).ok()
    want6 = f"{dual.prefix6}77"
    dual.run("ip", "-6", "route", "add", f"{want6}/128", "dev", "lo")
    pod = dual.pod(1)
    err = _call(plugin_exe, dual, "ADD", _routed(dual), "c1", pod,
                args=f"IP={dual.prefix}.77,{want6}").error(100)
    assert want6 in err["msg"]
    assert sorted(dual.reservations().values()) == ["cb/eth0", "cb/eth0"]
    assert dual.host_veths() == [host_veth_name("cb", "eth0")]
    assert _host_routes(dual) == [] and _host_routes(dual, "-6") == []
    assert _neighs(dual.ns, dual.bridge, "-6", proxy=True) == []
    assert f"{want6} dev lo" in dual.run("ip", "-6", "route", "show", f"{want6}/128").stdout
    assert "eth0" not in sh("ip", "link", ns=Path(pod).name).stdout


def test_add_when_interface_exists_keeps_prior_state(plugin_exe: str, host: CniHost) -> None:
    pod = host.pod(1)
    first = _call(plugin_exe, host, "ADD", _routed(host), "c1", pod).ok()
    _call(plugin_exe, host, "ADD", _routed(host), "c1", pod).error(103)
    ip = _ips(first)["4"]
    assert host.reservations() == {ip: "c1/eth0"}
    _assert_routed_kernel(host, pod, "c1", ip, host.gateway)


# --------------------------------------------------------------------------- CHECK, GC


def test_check_detects_routed_drift(plugin_exe: str, dual: CniHost) -> None:
    pod = dual.pod(1)
    conf = _routed(dual)
    res = _call(plugin_exe, dual, "ADD", conf, "c1", pod).ok()
    with_prev = dict(conf, prevResult=res)
    got = _ips(res)
    hv = host_veth_name("c1", "eth0")
    pod_mac = _mac(Path(pod).name, "eth0")

    def check_msg() -> str:
        return str(_call(plugin_exe, dual, "CHECK", with_prev, "c1", pod).error(102)["msg"])

    # the host route to the pod
    dual.run("ip", "route", "del", f"{got['4']}/32")
    assert "host route" in check_msg() and got["4"] in check_msg()
    dual.run("ip", "route", "add", f"{got['4']}/32", "dev", hv, "scope", "link", "proto",
             str(POD_ROUTE_PROTO))
    assert _call(plugin_exe, dual, "CHECK", with_prev, "c1", pod).rc == 0
    # the same route with another proto is not ours
    dual.run("ip", "-6", "route", "del", f"{got['6']}/128")
    dual.run("ip", "-6", "route", "add", f"{got['6']}/128", "dev", hv)
    assert "host route" in check_msg()
    dual.run("ip", "-6", "route", "del", f"{got['6']}/128")
    dual.run("ip", "-6", "route", "add", f"{got['6']}/128", "dev", hv, "proto",
             str(POD_ROUTE_PROTO))
    assert _call(plugin_exe, dual, "CHECK", with_prev, "c1", pod).rc == 0
    # the host's neighbour for the pod
    dual.run("ip", "neigh", "del", got["4"], "dev", hv)
    assert "neighbour" in check_msg()
    dual.run("ip", "neigh", "replace", got["4"], "lladdr", pod_mac, "dev", hv, "nud",
             "permanent")
    # the pod's neighbour for its gateway
    sh("ip", "-6", "neigh", "del", dual.gateway6, "dev", "eth0", ns=Path(pod).name)
    assert dual.gateway6 in check_msg()
    sh("ip", "-6", "neigh", "replace", dual.gateway6, "lladdr", _mac(dual.ns, hv), "dev",
       "eth0", "nud", "permanent", ns=Path(pod).name)
    assert _call(plugin_exe, dual, "CHECK", with_prev, "c1", pod).rc == 0
    # the host end
    dual.run("ip", "link", "set", hv, "down")
    assert "down" in check_msg()


def test_gc_releases_stale_routed_attachments(plugin_exe: str, dual: CniHost) -> None:
    _call(plugin_exe, dual, "ADD", dual.conf("1.1.0"), "cb", dual.pod("b")).ok()
    for i in (1, 2):
        _call(plugin_exe, dual, "ADD", _routed(dual, "1.1.0"), f"c{i}", dual.pod(i)).ok()
    conf = _routed(dual, "1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "c1", "ifname": "eth0"}, {"containerID": "cb", "ifname": "eth0"}]})
    call = run_plugin(plugin_exe, "GC", conf, host_ns=dual.ns, ifname="",
                      path=cni_path(plugin_exe))
    assert call.rc == 0 and call.stdout == "", call
    assert sorted(set(dual.reservations().values())) == ["c1/eth0", "cb/eth0"]
    assert len(_host_routes(dual)) == 1 and len(_host_routes(dual, "-6")) == 1
    assert len(_neighs(dual.ns, dual.bridge, "-6", proxy=True)) == 1


# --------------------------------------------------------------------------- two vxlan hosts


def _start_two_hosts(lab: Lab) -> list[Host]:
    assert lab.etcd is not None
    lab.etcd.put("/coreos.com/network/config", json.dumps(
        {"Network": "10.44.0.0/16", "EnableIPv6": True, "IPv6Network": "fd44:44::/48",
         "Backend": {"Type": "vxlan"}}))
    hosts = [lab.add_host() for _ in range(2)]
    for h in hosts:
        lab.start_agent(h, "--repair-interval", "1")
    for h in hosts:
        wait_for(lambda h=h: h.subnet_file.exists() or h.agent.poll() is not None,  # type: ignore[union-attr]
                 timeout=60, what=f"{h.name} subnet.env")
        assert h.subnet_file.exists(), lab.log(h)
        wait_for(lambda h=h: h.status().get("peers") == 1, timeout=30,
                 what=f"{h.name} sees its peer")
    return hosts


@pytest.mark.slow
def test_routed_pods_on_two_vxlan_hosts(lab: Lab, plugin_exe: str, tmp_path: Path) -> None:
    """Dual stack over vxlan with the real agent: routed pods on two hosts reach each other,
    a bridge pod beside one of them reaches both, over both families; the agents' drift
    repair (every second) leaves the pods' host routes, neighbours and proxy entries alone."""
    hosts = _start_two_hosts(lab)

    def conf(h: Host, mode: str) -> dict[str, Any]:
        return {"cniVersion": "1.0.0", "name": "nart", "type": "netagent", "mode": mode,
                "subnetFile": str(h.subnet_file), "dataDir": str(tmp_path / h.name / "ipam"),
                "bridge": "cni0", "ipMasq": False, "subnetFileWait": 0}

    placement = ((hosts[0], "routed"), (hosts[1], "routed"), (hosts[0], "bridge"))
    pods: list[str] = []
    try:
        addrs: list[dict[str, str]] = []
        for h, mode in placement:
            pod = f"{h.name}-{mode[0]}{len(pods)}"
            add_netns(pod)
            pods.append(pod)
            res = run_plugin(plugin_exe, "ADD", conf(h, mode), host_ns=h.name,
                             cid=f"rt{len(pods)}", netns=f"/run/netns/{pod}",
                             path=cni_path(plugin_exe)).ok()
            got = _ips(res)
            env = read_env_file(h.subnet_file)
            assert got["4"].rsplit(".", 1)[0] == env["FLANNEL_SUBNET"].rsplit(".", 1)[0]
            assert got["6"].startswith(env["FLANNEL_IPV6_SUBNET"].split("::")[0])
            addrs.append(got)

        def reach(src: int, dst: int) -> None:
            for fam in ("4", "6"):
                ip = addrs[dst][fam]
                wait_for(lambda ip=ip: sh("ping", "-c1", "-W1", ip, ns=pods[src],
                                          check=False).returncode == 0,
                         timeout=20, interval=0.2, what=f"pod {addrs[src][fam]} → {ip}")

        pairs = ((0, 1), (1, 0), (2, 1), (1, 2), (0, 2), (2, 0))
        for src, dst in pairs:
            reach(src, dst)

        def pod_state(h: Host) -> list[str]:
            out = []
            for fam in ("-4", "-6"):
                out += h.run("ip", fam, "route", "show", "proto",
                             str(POD_ROUTE_PROTO)).stdout.splitlines()
                out += [ln for ln in h.run("ip", fam, "neigh", "show", "nud",
                                           "permanent").stdout.splitlines()
                        if f"proto {POD_ROUTE_PROTO}" in ln]
            if h.run("ip", "link", "show", "cni0", check=False).returncode == 0:
                out += h.run("ip", "-6", "neigh", "show", "proxy", "dev",
                             "cni0").stdout.splitlines()
            return sorted(out)

        before = [pod_state(h) for h in hosts]
        # per routed pod: a route and a neighbour per family; host 1 adds the proxy entry
        assert [len(s) for s in before] == [5, 4], before
        syncs = [int(h.status().get("reconciles", 0)) for h in hosts]
        time.sleep(2.5)  # more than two repair cycles (full compare + sweep) of each agent
        for h, n in zip(hosts, syncs, strict=True):
            wait_for(lambda h=h, n=n: int(h.status().get("reconciles", 0)) >= n + 2,
                     timeout=10, what=f"{h.name} ran two drift repairs")
            assert h.agent is not None and h.agent.poll() is None, lab.log(h)
        assert [pod_state(h) for h in hosts] == before
        for src, dst in pairs:
            reach(src, dst)

        for i, (h, mode) in enumerate(placement):
            call = run_plugin(plugin_exe, "DEL", conf(h, mode), host_ns=h.name,
                              cid=f"rt{i + 1}", netns=f"/run/netns/{pods[i]}",
                              path=cni_path(plugin_exe))
            assert call.rc == 0, call
        assert all(pod_state(h) == [] for h in hosts)
    finally:
        for pod in pods:
            del_netns(pod)
