"""The real `netagent run` process in namespace hosts against a real etcd (control plane only)."""

from __future__ import annotations

import json
import signal
import time

import pytest
from support.harness import Lab, read_env_file, wait_for

pytestmark = pytest.mark.privileged

PREFIX = "/coreos.com/network"


def subnets(lab: Lab) -> dict[str, str]:
    return lab.leases()


def lease_of(lab: Lab, ip: str) -> str | None:
    for name, value in subnets(lab).items():
        if json.loads(value).get("PublicIP") == ip:
            return name
    return None


@pytest.mark.parametrize("agents, free", [(21, 20), (50, 40)], ids=["21-for-20", "50-for-40"])
def test_more_agents_than_subnets(lab: Lab, agents: int, free: int) -> None:
    """All agents start at once: `free` distinct leases, every other agent exits with status 2
    and "out of subnets", writes no subnet.env, and no etcd lease is left from a lost race."""
    assert lab.etcd is not None
    lab.etcd.put(f"{PREFIX}/config", '{"Network":"10.6.0.0/16","SubnetMin":"10.6.1.0",'
                 f'"SubnetMax":"10.6.{free}.0","Backend":{{"Type":"alloc"}}}}')
    hosts = [lab.add_host() for _ in range(agents)]
    for h in hosts:
        lab.start_agent(h)

    def settled() -> bool:
        done = sum(1 for h in hosts if h.agent is not None and h.agent.poll() is not None)
        return done >= agents - free and sum(h.subnet_file.exists() for h in hosts) >= free

    wait_for(settled, 180, interval=0.5, what=f"{free} leases and {agents - free} exits")
    time.sleep(1.0)
    exited = [h for h in hosts if h.agent is not None and h.agent.poll() is not None]
    assert len(exited) == agents - free, [lab.log(h)[-500:] for h in exited]
    for h in exited:
        assert h.agent is not None and h.agent.returncode == 2, lab.log(h)[-800:]
        assert "out of subnets" in lab.log(h)
        assert not h.subnet_file.exists()
    leases = subnets(lab)
    assert len(leases) == free
    owners = {json.loads(v)["PublicIP"] for v in leases.values()}
    assert len(owners) == free and not owners & {h.ip for h in exited}
    listed = lab.etcd.ctl("lease", "list").stdout.splitlines()
    assert len(listed) - 1 == free, listed[:3]  # one etcd lease per key, no orphans
    winners = [h for h in hosts if h not in exited]
    got = set()
    for h in winners:
        env = read_env_file(h.subnet_file)
        got.add(env["FLANNEL_SUBNET"])
        assert lease_of(lab, h.ip) == env["FLANNEL_SUBNET"].replace(".1/", ".0-")
    assert len(got) == free
    for h in winners:
        assert lab.stop_agent(h) == 0


def test_formats_restart_and_deleted_key(lab: Lab) -> None:
    assert lab.etcd is not None
    lab.etcd.put(f"{PREFIX}/config", '{"Network":"10.7.0.0/16","Backend":{"Type":"alloc"}}')
    h = lab.add_host()
    lab.start_agent(h)
    wait_for(h.subnet_file.exists, 20, what="subnet.env")
    name = lease_of(lab, h.ip)
    assert name is not None
    third = name.split(".")[2]
    # subnet.env and the lease value, field by field against flannel's literal formats
    assert h.subnet_file.read_text() == (
        "FLANNEL_NETWORK=10.7.0.0/16\n"
        f"FLANNEL_SUBNET=10.7.{third}.1/24\n"
        "FLANNEL_MTU=1500\n"
        "FLANNEL_IPMASQ=false\n"
    )
    assert subnets(lab)[name] == f'{{"PublicIP":"{h.ip}","PublicIPv6":null,"BackendType":"alloc"}}'
    meta = lab.etcd.get_json(f"{PREFIX}/subnets/{name}")
    lease_id = int(meta["kvs"][0]["lease"])  # type: ignore[index]
    ttl = lab.etcd.ctl("lease", "timetolive", format(lease_id, "x")).stdout
    assert "granted with TTL(86400s)" in ttl

    # etcdctl del: the same subnet comes back within 1 s and the agent keeps running
    lab.etcd.ctl("del", f"{PREFIX}/subnets/{name}")
    t0 = time.monotonic()
    wait_for(lambda: lease_of(lab, h.ip) == name, 5, interval=0.02, what="key re-created")
    assert time.monotonic() - t0 < 1.0
    assert h.agent is not None and h.agent.poll() is None
    assert "re-created it for the same subnet" in lab.log(h)

    # restart: same subnet, key untouched (same mod revision: no watch event for peers)
    rev_before = lab.etcd.get_json(f"{PREFIX}/subnets/{name}")["kvs"][0]["mod_revision"]  # type: ignore[index]
    assert lab.stop_agent(h) == 0
    assert lease_of(lab, h.ip) == name  # SIGTERM leaves the lease in etcd
    lab.start_agent(h)
    wait_for(lambda: "ready" in lab.log(h).split("received SIGTERM")[-1], 20, what="ready again")
    assert lease_of(lab, h.ip) == name
    rev_after = lab.etcd.get_json(f"{PREFIX}/subnets/{name}")["kvs"][0]["mod_revision"]  # type: ignore[index]
    assert rev_after == rev_before
    assert lab.stop_agent(h) == 0


def test_expired_lease_is_reacquired_and_previous_subnet_reused(lab: Lab) -> None:
    assert lab.etcd is not None
    lab.etcd.put(f"{PREFIX}/config", '{"Network":"10.8.0.0/16","Backend":{"Type":"alloc"}}')
    h = lab.add_host()
    lab.start_agent(h, "--subnet-lease-ttl", "4")
    wait_for(h.subnet_file.exists, 20, what="subnet.env")
    name = lease_of(lab, h.ip)
    meta = lab.etcd.get_json(f"{PREFIX}/subnets/{name}")
    lease_hex = format(int(meta["kvs"][0]["lease"]), "x")  # type: ignore[index]
    time.sleep(5)  # keepalives hold a 4 s lease past its TTL
    assert lease_of(lab, h.ip) == name
    lab.etcd.ctl("lease", "revoke", lease_hex)  # as if it expired during an outage
    wait_for(lambda: lease_of(lab, h.ip) == name, 10, what="lease re-acquired")
    assert h.agent is not None and h.agent.poll() is None
    # etcd loses everything: the subnet from subnet.env is requested again
    lab.stop_agent(h)
    lab.etcd.ctl("del", "--prefix", f"{PREFIX}/subnets/")
    lab.etcd.put(f"{PREFIX}/subnets/10.8.200.0-24", '{"PublicIP":"10.255.0.1"}')  # a reservation
    lab.start_agent(h, "--subnet-lease-ttl", "4")
    wait_for(lambda: lease_of(lab, h.ip) == name, 20, what="previous subnet reused")
    assert "from the subnet file" in lab.log(h)
    assert lab.stop_agent(h) == 0


def test_reservation_is_honoured_and_keeps_no_ttl(lab: Lab) -> None:
    assert lab.etcd is not None
    h = lab.add_host()
    lab.etcd.put(f"{PREFIX}/config", '{"Network":"10.9.0.0/16","Backend":{"Type":"alloc"}}')
    lab.etcd.put(f"{PREFIX}/subnets/10.9.77.0-24", f'{{"PublicIP":"{h.ip}","PublicIPv6":null}}')
    lab.start_agent(h)
    wait_for(h.subnet_file.exists, 20, what="subnet.env")
    assert read_env_file(h.subnet_file)["FLANNEL_SUBNET"] == "10.9.77.1/24"
    meta = lab.etcd.get_json(f"{PREFIX}/subnets/10.9.77.0-24")
    assert int(meta["kvs"][0].get("lease", 0)) == 0  # type: ignore[index,union-attr]
    assert lab.stop_agent(h, signal.SIGTERM) == 0


def test_bad_configs_are_rejected_naming_the_field_and_nothing_is_written(lab: Lab) -> None:
    assert lab.etcd is not None
    h = lab.add_host()
    cases = [
        ("{bad json", "not valid JSON"),
        ('{"Network":"10.300.0.0/16"}', "Network: '10.300.0.0/16' is not a CIDR"),
        ('{"Network":"10.10.0.0/16","SubnetLen":31}', "SubnetLen: must be at most /30"),
        ('{"Network":"10.10.0.0/16","SubnetMin":"10.10.1.5"}', "SubnetMin: 10.10.1.5 is not on"),
        ('{"Network":"10.10.0.0/16","SubnetMin":"10.10.9.0","SubnetMax":"10.10.2.0"}',
         "SubnetMin: 10.10.9.0 is above SubnetMax"),
        ('{"Network":"10.10.0.0/16","Backend":{"Type":"token-ring"}}',
         "Backend.Type: unknown backend type 'token-ring'"),
    ]
    lab.start_agent(h)
    wait_for(lambda: "not found in etcd (v3 API)" in lab.log(h), 20, what="missing-config message")
    assert "etcdctl put /coreos.com/network/config" in lab.log(h)
    for raw, words in cases:
        lab.etcd.ctl("put", f"{PREFIX}/config", "--", raw) if raw.startswith("-") else \
            lab.etcd.put(f"{PREFIX}/config", raw)
        wait_for(lambda w=words: w in lab.log(h), 10, what=f"rejection {words!r}")
        assert h.agent is not None and h.agent.poll() is None
        assert not h.subnet_file.exists()
        assert subnets(lab) == {}
    lab.etcd.put(f"{PREFIX}/config", '{"Network":"10.10.0.0/16","Backend":{"Type":"alloc"}}')
    wait_for(h.subnet_file.exists, 20, what="subnet.env after a good config")
    assert len(subnets(lab)) == 1
    assert lab.stop_agent(h) == 0
