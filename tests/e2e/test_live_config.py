"""Live reconfiguration (issue 9): operators change <prefix>/config with etcdctl while agents run."""

from __future__ import annotations

import json
import time

import pytest
from support.harness import Host, Lab, PingRun, kernel_state, read_env_file, sh, wait_for

pytestmark = pytest.mark.privileged

PREFIX = "/coreos.com/network"


def cfg(backend: dict[str, object], network: str = "10.50.0.0/16", **extra: object) -> str:
    return json.dumps({"Network": network, "Backend": backend, **extra})


def start(lab: Lab, n: int, config: str, *args: str) -> list[Host]:
    return lab.mesh(config, n, "--repair-interval", "2", *args)


def routes(h: Host) -> list[str]:
    return sh("ip", "-4", "route", "show", "proto", "111", ns=h.name).stdout.splitlines()


def mesh_ok(lab: Lab) -> bool:
    return all(p.ping(q.ip) for p in lab.pods for q in lab.pods if p is not q)


def test_direct_routing_and_mtu_change_live(lab: Lab) -> None:
    assert lab.etcd is not None
    hosts = start(lab, 3, cfg({"Type": "vxlan"}))
    assert all("flannel.1" in r for h in hosts for r in routes(h))
    p1, p2 = lab.pods[0], lab.pods[1]
    ping = PingRun(p1, p2.ip, 12, interval=0.05)
    lab.etcd.put(f"{PREFIX}/config", cfg({"Type": "vxlan", "DirectRouting": True}))
    for h in hosts:  # same L2: every peer is now routed straight over the underlay
        wait_for(lambda h=h: routes(h) and all("flannel.1" not in r and "eth0" in r
                                               for r in routes(h)), 15,
                 what=f"{h.name} direct routes")
    lab.etcd.put(f"{PREFIX}/config", cfg({"Type": "vxlan", "DirectRouting": True, "MTU": 1400}))
    for h in hosts:
        wait_for(lambda h=h: read_env_file(h.subnet_file)["FLANNEL_MTU"] == "1350", 15,
                 what=f"{h.name} subnet.env MTU")
        assert "mtu 1350" in h.run("ip", "link", "show", "flannel.1").stdout
    tx, rx = ping.result()
    print(f"\nvxlan -> DirectRouting -> MTU change: {tx - rx}/{tx} pings lost")
    assert mesh_ok(lab)
    for h in hosts:
        assert h.agent is not None and h.agent.poll() is None


def test_invalid_config_leaves_the_network_untouched(lab: Lab) -> None:
    assert lab.etcd is not None
    hosts = start(lab, 2, cfg({"Type": "vxlan"}))
    before = {h.name: (kernel_state(h.name, ["flannel.1"]), h.subnet_file.read_text())
              for h in hosts}
    leases = lab.etcd.get_prefix(f"{PREFIX}/subnets/")
    for bad, words in [
        ("{broken", "not valid JSON"),
        (cfg({"Type": "vxlan"}, network="10.50.0.0/30"), "too small"),
        (cfg({"Type": "quantum"}), "unknown backend type"),
        (cfg({"Type": "vxlan"}, SubnetLen=33), "SubnetLen"),
        (json.dumps({"Network": "10.50.0.0/16", "EnableIPv6": True,
                     "IPv6Network": "fc00::/48", "Backend": {"Type": "udp"}}),
         "udp carries IPv4 only"),
    ]:
        lab.etcd.put(f"{PREFIX}/config", bad)
        for h in hosts:
            wait_for(lambda h=h, w=words: w in lab.log(h), 10, what=f"{h.name} rejects {words}")
            status = json.loads((h.state_dir / "status.json").read_text())
            assert words in status["config_error"]
    time.sleep(2.5)  # a repair tick on the old config
    for h in hosts:
        assert h.agent is not None and h.agent.poll() is None
        assert (kernel_state(h.name, ["flannel.1"]), h.subnet_file.read_text()) == before[h.name]
    assert lab.etcd.get_prefix(f"{PREFIX}/subnets/") == leases
    assert mesh_ok(lab)
    # deleting the config keeps the running one too
    lab.etcd.ctl("del", f"{PREFIX}/config")
    for h in hosts:
        wait_for(lambda h=h: "was deleted; keeping" in lab.log(h), 10, what="delete ignored")
    assert mesh_ok(lab)


def test_network_change_renumbers_cleanly(lab: Lab) -> None:
    assert lab.etcd is not None
    hosts = start(lab, 2, cfg({"Type": "vxlan"}))
    lab.etcd.put(f"{PREFIX}/config", cfg({"Type": "vxlan"}, network="10.51.0.0/16"))
    for h in hosts:
        wait_for(lambda h=h: read_env_file(h.subnet_file)["FLANNEL_SUBNET"].startswith("10.51."),
                 20, what=f"{h.name} renumbered")
        assert read_env_file(h.subnet_file)["FLANNEL_NETWORK"] == "10.51.0.0/16"
        assert "must be re-attached" in lab.log(h)
    keys = lab.etcd.get_prefix(f"{PREFIX}/subnets/")
    assert len(keys) == 2 and all("/10.51." in k for k in keys)
    # old peer routes are gone; new ones point at the new subnets
    for h in hosts:
        wait_for(lambda h=h: routes(h) and all(r.startswith("10.51.") for r in routes(h)), 15,
                 what=f"{h.name} routes in the new network")
    # pods re-attached in the new subnets reach each other
    for pod in list(lab.pods):
        sh("ip", "netns", "del", pod.name, check=False)
        lab.pods.remove(pod)
    for h in hosts:
        sh("ip", "link", "del", "cni0", ns=h.name, check=False)
    new_pods = [lab.add_pod(h) for h in hosts]
    wait_for(lambda: new_pods[0].ping(new_pods[1].ip), 20, what="new pods ping")


def test_generated_hostile_configs_are_rejected_while_agents_run(lab: Lab) -> None:
    """200 configs drawn by hypothesis, none of them usable, written with etcdctl."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from netagent.config import ConfigError, parse_network_config

    assert lab.etcd is not None
    hosts = start(lab, 2, cfg({"Type": "vxlan"}))
    before = {h.name: kernel_state(h.name, ["flannel.1"]) for h in hosts}
    written: list[str] = []
    value = st.one_of(st.none(), st.booleans(), st.integers(-3, 70000), st.text(max_size=12),
                      st.sampled_from(["10.50.0.0/16", "10.50.0.0/31", "fc00::/64", "10.50.1.7",
                                       "300.1.1.0/16", "10.50.0.0/8"]))
    backend = st.dictionaries(st.sampled_from(["Type", "VNI", "Port", "MTU", "DirectRouting"]),
                              st.one_of(value, st.sampled_from(["vxlan", "udp", "nope", ""])))
    doc = st.dictionaries(st.sampled_from(["Network", "SubnetLen", "SubnetMin", "SubnetMax",
                                           "EnableIPv4", "EnableIPv6", "IPv6Network",
                                           "Backend"]),
                          st.one_of(value, backend), min_size=1)
    # NUL cannot pass through etcdctl's argv, so operators cannot write it either
    raw = st.one_of(doc.map(json.dumps), st.text(max_size=40), st.binary(max_size=40).map(
        lambda b: b.decode("latin-1"))).filter(lambda t: "\x00" not in t)

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(raw)
    def write(text: str) -> None:
        try:
            parse_network_config(text)
        except ConfigError:
            lab.etcd.ctl("put", f"{PREFIX}/config", "--", text)  # type: ignore[union-attr]
            written.append(text)

    write()
    assert len(written) >= 150
    lab.etcd.put(f"{PREFIX}/config", '{"Network":"10.50.0.0/16","Backend":{"Type":"vxlan"}}')
    for h in hosts:
        wait_for(lambda h=h: lab.log(h).count("new network config rejected") >= len(written),
                 30, what=f"{h.name} rejecting every generated config")
        assert h.agent is not None and h.agent.poll() is None
    time.sleep(2.5)
    for h in hosts:
        assert kernel_state(h.name, ["flannel.1"]) == before[h.name]
    assert mesh_ok(lab)


def _artifacts(h: Host) -> dict[str, bool]:
    links = sh("ip", "-o", "link", "show", ns=h.name).stdout
    via_eth0 = [r for r in routes(h) if "dev eth0" in r]
    via_vxlan = [r for r in routes(h) if "dev flannel.1" in r]
    return {"flannel.1": " flannel.1:" in links, "flannel0": " flannel0:" in links,
            "host-gw routes": bool(via_eth0), "vxlan routes": bool(via_vxlan)}


EXPECTED = {
    "vxlan": {"flannel.1": True, "flannel0": False, "host-gw routes": False, "vxlan routes": True},
    "host-gw": {"flannel.1": False, "flannel0": False, "host-gw routes": True,
                "vxlan routes": False},
    "udp": {"flannel.1": False, "flannel0": True, "host-gw routes": False, "vxlan routes": False},
}


def test_switch_backends_live_under_ping(lab: Lab) -> None:
    assert lab.etcd is not None
    hosts = start(lab, 3, cfg({"Type": "vxlan"}))
    p1, p2 = lab.pods[0], lab.pods[1]
    losses = []
    for target in ("host-gw", "udp", "vxlan"):
        ping = PingRun(p1, p2.ip, 10, interval=0.05)
        time.sleep(0.5)
        t0 = time.monotonic()
        lab.etcd.put(f"{PREFIX}/config", cfg({"Type": target}))
        for h in hosts:  # converged: the new backend's entries, none of the old one's
            wait_for(lambda h=h, t=target: _artifacts(h) == EXPECTED[t], 20,
                     what=f"{h.name} running {target} with no leftovers")
        converged = time.monotonic() - t0
        wait_for(lambda: mesh_ok(lab), 20, what=f"mesh over {target}")
        tx, rx = ping.result()
        losses.append((target, tx - rx, tx, round(converged, 2)))
        leases = lab.leases()
        for v in leases.values():
            attrs = json.loads(v)
            assert attrs.get("BackendType", "") == ("" if target == "udp" else target)
    print("\nlive backend switches (target, pings lost, sent, seconds to converge on all hosts):",
          losses)
    for h in hosts:
        assert h.agent is not None and h.agent.poll() is None
        assert "Traceback" not in lab.log(h)
