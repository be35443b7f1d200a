"""Real-namespace tier (root): the installed plugin run as libcni runs it, bridge in a test host.

Each test gets a run-unique host namespace (bridge, veths and nat rules live and die there) and
pod namespaces; the plugin is executed with ``ip netns exec <host>`` like a runtime on that host.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cni import (
    REF_PLUGINS,
    CniHost,
    cni_host,
    cni_path,
    plugin_fixture,
    pod_addrs,
    pod_routes,
    run_plugin,
)
from support.harness import need, need_root, sh

from netagent.cni.conf import host_veth_name

plugin_exe = plugin_fixture()
pytestmark = pytest.mark.privileged


@pytest.fixture
def host(tmp_path: Path) -> Iterator[CniHost]:
    need_root()
    with cni_host(tmp_path, "n") as h:
        yield h


def _call(exe: str, h: CniHost, cmd: str, conf: dict[str, Any], cid: str, netns: str = "",
          **kw: Any) -> Any:
    return run_plugin(exe, cmd, conf, host_ns=h.ns, cid=cid, netns=netns, path=cni_path(exe),
                      **kw)


def _nat_rules(h: CniHost) -> str:
    return h.run("iptables", "-w", "5", "-t", "nat", "-S").stdout


# --------------------------------------------------------------------------- life cycle


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_check_del_life_cycle(plugin_exe: str, host: CniHost, version: str) -> None:
    pod = host.pod(1)
    conf = host.conf(version)
    res = _call(plugin_exe, host, "ADD", conf, "c1", pod).ok()

    # result shaped for the requested version
    assert res["cniVersion"] == version
    names = [i["name"] for i in res["interfaces"]]
    assert names == [host.bridge, host_veth_name("c1", "eth0"), "eth0"]
    assert res["interfaces"][2]["sandbox"] == pod
    ip = res["ips"][0]
    assert ip["address"].startswith(f"{host.prefix}.") and ip["address"].endswith("/24")
    assert ip["gateway"] == host.gateway and ip["interface"] == 2
    assert ("version" in ip) == (version in ("0.3.1", "0.4.0"))
    assert ("mtu" in res["interfaces"][2]) == (version == "1.1.0")
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": host.gateway}]

    # the kernel agrees
    assert pod_addrs(pod) == [ip["address"]]
    assert f"default via {host.gateway} dev eth0" in pod_routes(pod)
    pod_link = sh("ip", "-o", "link", "show", "eth0", ns=Path(pod).name).stdout
    assert f"mtu {host.mtu}" in pod_link and res["interfaces"][2]["mac"] in pod_link
    br = host.run("ip", "-o", "addr", "show", "dev", host.bridge).stdout
    assert f"{host.gateway}/24" in br
    assert f"mtu {host.mtu}" in host.run("ip", "-o", "link", "show", host.bridge).stdout
    hv = host.run("ip", "-d", "-o", "link", "show", names[1]).stdout
    assert f"master {host.bridge}" in hv and "hairpin on" in hv
    assert host.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    assert sh("ping", "-c1", "-W2", host.gateway, ns=Path(pod).name, check=False).returncode == 0
    assert host.reservations() == {ip["address"].split("/")[0]: "c1/eth0"}

    with_prev = dict(conf, prevResult=res)
    check = _call(plugin_exe, host, "CHECK", with_prev, "c1", pod)
    assert check.rc == 0 and check.stdout == "", check

    dele = _call(plugin_exe, host, "DEL", with_prev, "c1", pod)
    assert dele.rc == 0 and dele.stdout == "", dele
    assert host.reservations() == {} and host.host_veths() == []
    assert "eth0" not in sh("ip", "-o", "link", ns=Path(pod).name).stdout
    _call(plugin_exe, host, "CHECK", with_prev, "c1", pod).error(102)
    # DEL again, then with the netns gone and no prevResult: still fine
    assert _call(plugin_exe, host, "DEL", with_prev, "c1", pod).rc == 0
    host.drop_pod(pod)
    assert _call(plugin_exe, host, "DEL", conf, "c1", pod).rc == 0
    assert _call(plugin_exe, host, "DEL", conf, "c1").rc == 0


def test_del_with_netns_gone_releases_everything(plugin_exe: str, host: CniHost) -> None:
    pod = host.pod(1)
    conf = host.conf()
    _call(plugin_exe, host, "ADD", conf, "c1", pod).ok()
    host.drop_pod(pod)  # the runtime lost the netns: the veth pair died with it
    call = _call(plugin_exe, host, "DEL", conf, "c1", pod)
    assert call.rc == 0, call
    assert host.reservations() == {} and host.host_veths() == []


def test_not_default_gateway_routes_only_the_overlay(plugin_exe: str, host: CniHost) -> None:
    pod = host.pod(1)
    res = _call(plugin_exe, host, "ADD", host.conf(isDefaultGateway=False), "c1", pod).ok()
    assert res["routes"] == [{"dst": host.network, "gw": host.gateway}]
    routes = pod_routes(pod)
    assert not any(r.startswith("default") for r in routes)
    assert f"{host.network} via {host.gateway} dev eth0" in routes
    check = _call(plugin_exe, host, "CHECK", host.conf(isDefaultGateway=False, prevResult=res),
                  "c1", pod)
    assert check.rc == 0, check


def test_two_pods_reach_each_other_and_hairpin_is_optional(plugin_exe: str,
                                                           host: CniHost) -> None:
    pods = [host.pod(i) for i in (1, 2)]
    conf = host.conf(hairpinMode=False)
    ips = [_call(plugin_exe, host, "ADD", conf, f"c{i}", p).ok()["ips"][0]["address"]
           for i, p in enumerate(pods)]
    assert len(set(ips)) == 2
    target = ips[1].split("/")[0]
    assert sh("ping", "-c1", "-W2", target, ns=Path(pods[0]).name, check=False).returncode == 0
    hv = host.run("ip", "-d", "-o", "link", "show", host_veth_name("c0", "eth0")).stdout
    assert "hairpin off" in hv


def test_ip_masq_rules_follow_the_pod(plugin_exe: str, host: CniHost) -> None:
    need(sh("iptables", "--version", check=False).returncode == 0, "needs iptables")
    pod = host.pod(1)
    conf = host.conf(ipMasq=True)
    res = _call(plugin_exe, host, "ADD", conf, "c1", pod).ok()
    ip = res["ips"][0]["address"].split("/")[0]
    rules = _nat_rules(host)
    assert f"-A POSTROUTING -s {ip}/32" in rules and "MASQUERADE" in rules
    assert f"-d {host.network} -j ACCEPT" in rules
    _call(plugin_exe, host, "DEL", dict(conf, prevResult=res), "c1", pod).ok()
    rules = _nat_rules(host)
    assert ip not in rules and "NA-" not in rules


def test_ip_masq_defaults_to_inverse_of_flannel_ipmasq(plugin_exe: str, tmp_path: Path) -> None:
    need_root()
    with cni_host(tmp_path, "m", ipmasq=False) as h:
        pod = h.pod(1)
        conf = h.conf()
        del conf["ipMasq"]
        _call(plugin_exe, h, "ADD", conf, "c1", pod).ok()
        assert "MASQUERADE" in _nat_rules(h)
        _call(plugin_exe, h, "DEL", conf, "c1").ok()
        assert "NA-" not in _nat_rules(h)


# --------------------------------------------------------------------------- IPAM


def test_cni_args_ip_is_honoured(plugin_exe: str, host: CniHost) -> None:
    pods = [host.pod(i) for i in (1, 2)]
    want = f"{host.prefix}.77"
    res = _call(plugin_exe, host, "ADD", host.conf(), "c1", pods[0],
                args=f"IgnoreUnknown=1;K8S_POD_NAME=x;IP={want}").ok()
    assert res["ips"][0]["address"] == f"{want}/24"
    # taken by c1: c2 fails with code 100 and leaves nothing behind
    err = _call(plugin_exe, host, "ADD", host.conf(), "c2", pods[1], args=f"IP={want}").error(100)
    assert want in err["msg"]
    assert host.reservations() == {want: "c1/eth0"}
    assert host.host_veths() == [host_veth_name("c1", "eth0")]
    assert "eth0" not in sh("ip", "link", ns=Path(pods[1]).name).stdout


def test_delegated_ipam_host_local(plugin_exe: str, host: CniHost, tmp_path: Path) -> None:
    pod = host.pod(1)
    hl_dir = tmp_path / "host-local"
    conf = host.conf(ipam={"type": "host-local", "dataDir": str(hl_dir)})
    res = _call(plugin_exe, host, "ADD", conf, "c1", pod).ok()
    ip = res["ips"][0]["address"].split("/")[0]
    assert ip.startswith(host.prefix) and (hl_dir / host.name / ip).exists()
    assert host.reservations() == {}  # our own store is not used
    assert pod_addrs(pod) == [res["ips"][0]["address"]]
    assert _call(plugin_exe, host, "CHECK", dict(conf, prevResult=res), "c1", pod).rc == 0
    _call(plugin_exe, host, "DEL", dict(conf, prevResult=res), "c1", pod).ok()
    assert not (hl_dir / host.name / ip).exists() and host.host_veths() == []


def test_delegated_ipam_failure_leaves_nothing(plugin_exe: str, host: CniHost) -> None:
    pod = host.pod(1)
    conf = host.conf(ipam={"type": "nosuchipam"})
    err = _call(plugin_exe, host, "ADD", conf, "c1", pod).error(7)
    assert "nosuchipam" in err["msg"]
    assert host.host_veths() == [] and "eth0" not in sh("ip", "link", ns=Path(pod).name).stdout
    # a delegate that errors (host-local with an invalid range): its code is passed through
    bad = host.conf(ipam={"type": "host-local", "ranges": [[{"subnet": "nonsense"}]]})
    call = _call(plugin_exe, host, "ADD", bad, "c1", pod)
    assert call.rc != 0 and call.json["msg"].startswith("host-local:"), call
    assert host.host_veths() == []


# --------------------------------------------------------------------------- failed ADD


def test_add_when_interface_exists_fails_and_keeps_prior_state(plugin_exe: str,
                                                               host: CniHost) -> None:
    pod = host.pod(1)
    conf = host.conf()
    first = _call(plugin_exe, host, "ADD", conf, "c1", pod).ok()
    _call(plugin_exe, host, "ADD", conf, "c1", pod).error(103)
    # the failed repeat did not release the first attachment's address or veth
    assert host.reservations() == {first["ips"][0]["address"].split("/")[0]: "c1/eth0"}
    assert host.host_veths() == [host_veth_name("c1", "eth0")]
    # a foreign eth0 in another pod: fails, no reservation, no veth
    pod2 = host.pod(2)
    sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0", ns=Path(pod2).name)
    _call(plugin_exe, host, "ADD", conf, "c2", pod2).error(103)
    assert len(host.reservations()) == 1 and len(host.host_veths()) == 1


def test_add_failing_after_reservation_rolls_back(plugin_exe: str, host: CniHost) -> None:
    """The bridge name is taken by a non-bridge: IPAM had reserved, the veth must not exist."""
    host.run("ip", "link", "add", host.bridge, "type", "veth", "peer", "name", f"{host.bridge}x"[-15:])
    pod = host.pod(1)
    err = _call(plugin_exe, host, "ADD", host.conf(), "c1", pod).error(7)
    assert "not a bridge" in err["msg"]
    assert host.reservations() == {}
    assert sorted(host.host_veths()) == sorted([host.bridge, f"{host.bridge}x"[-15:]])
    assert "eth0" not in sh("ip", "link", ns=Path(pod).name).stdout


# --------------------------------------------------------------------------- CHECK, GC, chains


def test_check_detects_drift(plugin_exe: str, host: CniHost) -> None:
    pod = host.pod(1)
    conf = host.conf()
    res = _call(plugin_exe, host, "ADD", conf, "c1", pod).ok()
    with_prev = dict(conf, prevResult=res)
    sh("ip", "route", "del", "default", ns=Path(pod).name)
    assert "route 0.0.0.0/0" in _call(plugin_exe, host, "CHECK", with_prev, "c1",
                                      pod).error(102)["msg"]
    sh("ip", "route", "add", "default", "via", host.gateway, ns=Path(pod).name)
    assert _call(plugin_exe, host, "CHECK", with_prev, "c1", pod).rc == 0
    sh("ip", "addr", "flush", "dev", "eth0", ns=Path(pod).name)
    assert "address" in _call(plugin_exe, host, "CHECK", with_prev, "c1", pod).error(102)["msg"]


def test_check_detects_lost_reservation(plugin_exe: str, host: CniHost) -> None:
    pod = host.pod(1)
    conf = host.conf()
    res = _call(plugin_exe, host, "ADD", conf, "c1", pod).ok()
    for f in host.data_dir.glob("10.*"):
        f.unlink()
    err = _call(plugin_exe, host, "CHECK", dict(conf, prevResult=res), "c1", pod).error(102)
    assert "reservation" in err["msg"]


def test_gc_releases_stale_attachments(plugin_exe: str, host: CniHost) -> None:
    pods = [host.pod(i) for i in (1, 2, 3)]
    for i, p in enumerate(pods):
        _call(plugin_exe, host, "ADD", host.conf("1.1.0"), f"c{i}", p).ok()
    conf = host.conf("1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "c0", "ifname": "eth0"}, {"containerID": "c2", "ifname": "eth0"}]})
    call = run_plugin(plugin_exe, "GC", conf, host_ns=host.ns, ifname="", path=cni_path(plugin_exe))
    assert call.rc == 0 and call.stdout == "", call
    assert sorted(host.reservations().values()) == ["c0/eth0", "c2/eth0"]
    assert sorted(host.host_veths()) == sorted(host_veth_name(c, "eth0") for c in ("c0", "c2"))


def test_status(plugin_exe: str, host: CniHost) -> None:
    conf = host.conf("1.1.0")
    assert run_plugin(plugin_exe, "STATUS", conf, host_ns=host.ns, ifname="").rc == 0
    host.subnet_file.unlink()
    run_plugin(plugin_exe, "STATUS", conf, host_ns=host.ns, ifname="").error(50)


def test_prev_result_is_passed_through(plugin_exe: str, host: CniHost) -> None:
    """Chained after another plugin: its interfaces/ips stay, ours are appended."""
    pod = host.pod(1)
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "lo", "sandbox": pod}],
            "ips": [{"address": "127.0.0.1/8", "interface": 0}],
            "dns": {"nameservers": ["10.0.0.10"]}}
    res = _call(plugin_exe, host, "ADD", host.conf(prevResult=prev), "c1", pod).ok()
    assert [i["name"] for i in res["interfaces"]][0] == "lo" and len(res["interfaces"]) == 4
    assert res["ips"][0]["address"] == "127.0.0.1/8" and res["ips"][1]["interface"] == 3
    assert res["dns"] == prev["dns"]


def test_chained_with_portmap(plugin_exe: str, host: CniHost) -> None:
    """Conflist [netagent, portmap]: ADD in order with prevResult, DEL reversed (libcni order)."""
    need(Path(REF_PLUGINS, "portmap").exists(), "needs containernetworking-plugins")
    pod = host.pod(1)
    port = 20000 + int(host.prefix.split(".")[2]) * 10
    mappings = [{"hostPort": port, "containerPort": 80, "protocol": "tcp"}]
    ours = host.conf(capabilities={"aliases": True})
    pm = {"cniVersion": "1.0.0", "name": host.name, "type": "portmap",
          "capabilities": {"portMappings": True}, "runtimeConfig": {"portMappings": mappings}}
    cni_path_ = cni_path(plugin_exe)
    env = dict(host_ns=host.ns, cid="c1", netns=pod, path=cni_path_,
               args="IgnoreUnknown=1;K8S_POD_NAME=pm")
    res = run_plugin(plugin_exe, "ADD", ours, **env).ok()
    final = run_plugin(f"{REF_PLUGINS}/portmap", "ADD", dict(pm, prevResult=res), **env).ok()
    assert final["ips"] == res["ips"]
    ip = res["ips"][0]["address"].split("/")[0]
    assert f"{ip}:80" in _nat_rules(host)
    # CHECK: ours only. Debian's portmap 1.1.1 fails its own CHECK on IPv4-only results
    # ("could not check ipv6 dnat: chain CNI-DN-… not found"), whoever created the interface.
    call = run_plugin(plugin_exe, "CHECK", dict(ours, prevResult=final), **env)
    assert call.rc == 0, call
    for exe, conf in ((f"{REF_PLUGINS}/portmap", pm), (plugin_exe, ours)):
        call = run_plugin(exe, "DEL", dict(conf, prevResult=final), **env)
        assert call.rc == 0, call
    assert f"{ip}:80" not in _nat_rules(host)
    assert host.reservations() == {} and host.host_veths() == []
