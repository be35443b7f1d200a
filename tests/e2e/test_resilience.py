"""Resilience scenarios (issue 7) on a real etcd and namespace hosts running the real agent.

Each scenario is bounded in time; figures (packets lost, recovery time) are printed with -s and
recorded in RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from support.harness import Host, Lab, PingRun, kernel_state, sh, wait_for

pytestmark = pytest.mark.privileged

PREFIX = "/coreos.com/network"
VXLAN = '{"Network":"10.20.0.0/16","Backend":{"Type":"vxlan"}}'
#: etcd outage length in scenario 1 (the issue asks for 60 s; override to iterate faster)
OUTAGE = float(os.environ.get("NETAGENT_TEST_OUTAGE", "60"))


def leases(lab: Lab) -> dict[str, str]:
    return lab.leases()


def subnet_of(host: Host) -> str:
    return str(host.subnet())


def vxlan_lab(lab: Lab, n: int = 3, *agent_args: str) -> list[Host]:
    return lab.mesh(VXLAN, n, *agent_args)


def route_to(host: Host, subnet: str) -> bool:
    return subnet in sh("ip", "-4", "route", "show", ns=host.name).stdout


def test_etcd_outage_loses_no_packets_and_no_kernel_entries(lab: Lab) -> None:
    assert lab.etcd is not None
    hosts = vxlan_lab(lab)
    p1, p2, p3 = lab.pods
    before_leases = leases(lab)
    before = {h.name: kernel_state(h.name, ["flannel.1"]) for h in hosts}
    pings = [PingRun(p1, p2.ip, OUTAGE + 8), PingRun(p2, p3.ip, OUTAGE + 8),
             PingRun(p3, p1.ip, OUTAGE + 8)]
    time.sleep(2)
    lab.etcd.stop()
    t0 = time.monotonic()
    time.sleep(OUTAGE)
    for h in hosts:
        assert h.agent is not None and h.agent.poll() is None, lab.log(h)[-2000:]
        assert kernel_state(h.name, ["flannel.1"]) == before[h.name]
    lab.etcd.start()
    down = time.monotonic() - t0
    # a change made by another agent right after etcd returns reaches every host
    h4 = lab.add_host()
    lab.start_agent(h4)
    wait_for(h4.subnet_file.exists, 30, what="new host's subnet.env")
    new = subnet_of(h4)
    t1 = time.monotonic()
    for h in hosts:
        wait_for(lambda h=h: route_to(h, new), 20, what=f"{h.name} route to the new host")
    converge = time.monotonic() - t1
    results = [p.result() for p in pings]
    lost = sum(tx - rx for tx, rx in results)
    print(f"\netcd down {down:.1f} s; pings {results}; lost {lost}; new peer on every host "
          f"{converge:.2f} s after its lease")
    assert lost == 0
    after = leases(lab)
    for name, value in before_leases.items():
        assert after[name] == value  # same subnets, same values
    for h in hosts:
        assert h.agent is not None and h.agent.poll() is None
        assert "watch on" in lab.log(h) and "resuming at revision" in lab.log(h)


def test_dead_peer_expires_and_is_removed_everywhere(lab: Lab) -> None:
    assert lab.etcd is not None
    hosts = vxlan_lab(lab, 3, "--subnet-lease-ttl", "4")
    h1, h2, h3 = hosts
    dead = subnet_of(h3)
    assert route_to(h1, dead) and route_to(h2, dead)
    lab.stop_agent(h3, signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: not any(k.startswith(dead.split("/")[0]) for k in leases(lab)), 15,
             what="the dead peer's lease to expire")
    expired = time.monotonic() - t0
    for h in (h1, h2):
        wait_for(lambda h=h: not route_to(h, dead), 5, what=f"{h.name} dropping the dead peer")
        state = kernel_state(h.name, ["flannel.1"])
        assert not any(dead.split("/")[0] in ln for ln in state["routes"] + state["neigh"])
    removed = time.monotonic() - t0
    print(f"\nlease expired {expired:.1f} s after SIGKILL (TTL 4 s); entries gone after "
          f"{removed:.1f} s")
    p1, p2 = lab.pods[0], lab.pods[1]
    assert p1.ping(p2.ip) and p2.ping(p1.ip)


def test_reboot_keeps_subnet_and_vtep_mac(lab: Lab) -> None:
    assert lab.etcd is not None
    hosts = vxlan_lab(lab, 2)
    h1, h2 = hosts
    before = leases(lab)
    mine = next(k for k, v in before.items() if json.loads(v)["PublicIP"] == h2.ip)
    lab.reboot_host(h2)  # namespace (device, routes, everything) gone and recreated
    assert not h2.run("ip", "link", "show", "flannel.1", check=False).returncode == 0
    lab.start_agent(h2)
    wait_for(lambda: h2.run("ip", "link", "show", "flannel.1", check=False).returncode == 0, 20,
             what="flannel.1 recreated")
    pod = lab.add_pod(h2)
    wait_for(lambda: pod.ping(lab.pods[0].ip), 20, what="pods reach each other after reboot")
    after = leases(lab)
    assert after[mine] == before[mine]  # same subnet, same VtepMAC, byte for byte
    mac = json.loads(after[mine])["BackendData"]["VtepMAC"]
    assert mac in h2.run("ip", "link", "show", "flannel.1").stdout


def test_watch_relists_after_compaction_past_its_revision(lab: Lab) -> None:
    assert lab.etcd is not None
    hosts = vxlan_lab(lab, 3)
    h1, h2, h3 = hosts
    gone = subnet_of(h3)
    assert h1.agent is not None
    os.kill(h1.agent.pid, 0)
    # freeze h1's agent, break its etcd connection, change the world, compact history
    agent_pid = int(sh("ip", "netns", "pids", h1.name).stdout.split()[0])
    os.kill(agent_pid, signal.SIGSTOP)
    try:
        lab.stop_agent(h3, signal.SIGKILL)
        lab.etcd.stop()
        lab.etcd.start()
        lab.etcd.ctl("del", f"{PREFIX}/subnets/{gone.replace('/', '-')}")
        fake = "10.20.250.0/24"
        lab.etcd.put(f"{PREFIX}/subnets/10.20.250.0-24",
                     '{"PublicIP":"' + lab.prefix + '.250","PublicIPv6":null,"BackendType":'
                     '"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:02:50"}}')
        rev = json.loads(lab.etcd.ctl("endpoint", "status", "-w", "json").stdout)[0]["Status"][
            "header"]["revision"]
        lab.etcd.ctl("compact", str(rev), "--physical")
    finally:
        os.kill(agent_pid, signal.SIGCONT)
    wait_for(lambda: route_to(h1, fake) and not route_to(h1, gone), 20,
             what="h1 re-listed after compaction")
    assert "compacted" in lab.log(h1)
    assert h1.agent is not None and h1.agent.poll() is None
    assert lab.pods[0].ping(lab.pods[1].ip)


def _malformed_values(n: int, seed: int) -> list[tuple[str, str]]:
    """(key name, value) pairs that no host may act on."""
    import random

    from netagent.lease import LeaseError, decode_lease

    rng = random.Random(seed)
    templates = [
        lambda: "{not json",
        lambda: "",
        lambda: "[]",
        lambda: "null",
        lambda: '{"PublicIP":' + str(rng.randrange(10**6)) + "}",
        lambda: '{"PublicIP":"300.1.1.' + str(rng.randrange(256)) + '"}',
        lambda: '{"PublicIPv6":"::1"}',
        lambda: '{"PublicIP":"10.0.0.1","BackendData":"' + "x" * rng.randrange(50) + '"}',
        lambda: '{"PublicIP":"10.0.0.1","BackendType":' + str(rng.randrange(9)) + "}",
        lambda: '{"PublicIP":"10.0.0.1","PublicIPv6":"nope"}',
        lambda: "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(1, 80))),
        lambda: '{"PublicIP":"10.0.0.1"' + "," * rng.randrange(1, 5) + "}",
    ]
    out: list[tuple[str, str]] = []
    while len(out) < n:
        kind = rng.randrange(3)
        third = rng.randrange(100, 250)
        if kind == 0:  # off-grammar key, plausible value
            name = rng.choice([f"10.20.{third}.0", f"10.20.{third}.5-24", "x", f"10.20.{third}.0-99",
                               f"../10.20.{third}.0-24", f"10.20.{third}.0-24&zz-64"])
            value = '{"PublicIP":"10.0.0.9","BackendType":"vxlan"}'
        else:
            name = f"10.20.{third}.0-24"
            value = rng.choice(templates)()
        try:
            decode_lease(name, value)
        except LeaseError:
            out.append((name, value))
    return out


def test_malformed_peer_leases_change_nothing(lab: Lab) -> None:
    assert lab.etcd is not None
    hosts = vxlan_lab(lab, 3)
    before = {h.name: kernel_state(h.name, ["flannel.1"]) for h in hosts}
    real = leases(lab)
    bad = _malformed_values(200, seed=7)
    # and garbage over two live peers' own keys: their owners restore them
    victims = sorted(real)[:2]
    bad += [(victims[0], "{garbage"), (victims[1], '{"PublicIP":"not-an-ip"}')]
    script = "".join(f"put {PREFIX}/subnets/{k} {json.dumps(v)}\n" for k, v in bad)
    del script  # etcdctl's txn/batch input cannot carry arbitrary bytes; write one by one
    for name, value in bad:
        lab.etcd.ctl("put", f"{PREFIX}/subnets/{name}", "--", value)
    wait_for(lambda: all(leases(lab).get(k) == v for k, v in real.items()), 10,
             what="owners to restore their overwritten keys")
    for name, _ in bad:
        if name not in real:
            lab.etcd.ctl("del", f"{PREFIX}/subnets/{name}")
    time.sleep(1.5)
    for h in hosts:
        assert h.agent is not None and h.agent.poll() is None, lab.log(h)[-2000:]
        assert kernel_state(h.name, ["flannel.1"]) == before[h.name]
        assert "skipping malformed lease" in lab.log(h)
    assert all(p.ping(q.ip) for p in lab.pods for q in lab.pods if p is not q)
    assert sum("restoring" in lab.log(h) for h in hosts) >= 1


def _mount(*args: str) -> None:
    sh("mount", *args)


def test_disk_full_and_read_only_keep_the_previous_subnet_env(lab: Lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert lab.etcd is not None
    h = lab.add_host()
    lab.etcd.put(f"{PREFIX}/config", '{"Network":"10.40.0.0/16","Backend":{"Type":"alloc"}}')
    full = tmp_path / "full"
    full.mkdir()
    _mount("-t", "tmpfs", "-o", "size=16k", "tmpfs", str(full))
    try:
        env_file = full / "subnet.env"
        lab.start_agent(h, "--subnet-file", str(env_file), "--repair-interval", "1")
        wait_for(env_file.exists, 20, what="first subnet.env")
        lab.stop_agent(h)
        first = env_file.read_text()
        # the network's MTU changes while the disk is full: the rewrite must fail cleanly
        lab.etcd.put(f"{PREFIX}/config",
                     '{"Network":"10.40.0.0/16","Backend":{"Type":"alloc","MTU":1400}}')
        filler = full / "filler"
        try:
            with open(filler, "wb") as fh:
                for _ in range(1000):  # 16 kB fill up long before 1000 pages
                    fh.write(b"\0" * 4096)
                    fh.flush()
        except OSError:
            pass
        lab.start_agent(h, "--subnet-file", str(env_file), "--repair-interval", "1")
        wait_for(lambda: "No space left on device" in lab.log(h), 20, what="ENOSPC reported")
        assert f"cannot write {env_file}" in lab.log(h)
        assert env_file.read_text() == first
        assert sorted(p.name for p in full.iterdir()) == ["filler", "subnet.env"]
        assert h.agent is not None and h.agent.poll() is None
        status = json.loads((h.state_dir / "status.json").read_text())
        assert status["ready"] is False
        filler.unlink()  # space comes back: the agent writes on its next repair tick
        wait_for(lambda: "FLANNEL_MTU=1400" in env_file.read_text(), 10, what="rewrite")
        wait_for(lambda: json.loads((h.state_dir / "status.json").read_text())["ready"], 10,
                 what="ready after the rewrite")
        lab.stop_agent(h)
    finally:
        sh("umount", str(full), check=False)
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "subnet.env").write_text("FLANNEL_NETWORK=old\n")
    _mount("--bind", str(ro), str(ro))
    try:
        _mount("-o", "remount,ro,bind", str(ro), str(ro))
        lab.start_agent(h, "--subnet-file", str(ro / "subnet.env"))
        wait_for(lambda: "Read-only file system" in lab.log(h), 20, what="EROFS reported")
        assert (ro / "subnet.env").read_text() == "FLANNEL_NETWORK=old\n"
        assert h.agent is not None and h.agent.poll() is None
        lab.stop_agent(h)
    finally:
        sh("umount", str(ro), check=False)


def test_etcd_cluster_loses_leader_then_quorum(lab: Lab) -> None:
    cluster = lab.start_cluster(3)
    cluster.ctl("put", f"{PREFIX}/config", VXLAN)
    hosts = [lab.add_host() for _ in range(2)]
    for h in hosts:
        lab.start_agent(h, "--subnet-lease-ttl", "30")
    for h in hosts:
        wait_for(h.subnet_file.exists, 30, what=f"{h.name} subnet.env")
    pods = [lab.add_pod(h) for h in hosts]
    wait_for(lambda: pods[0].ping(pods[1].ip), 20, what="pods ping")
    before = {h.name: kernel_state(h.name, ["flannel.1"]) for h in hosts}
    ping = PingRun(pods[0], pods[1].ip, 25)
    first = cluster.leader()
    first.kill()
    time.sleep(4)
    second = next(m for m in cluster.members if m is not first)
    second.kill()  # quorum lost
    time.sleep(8)
    for h in hosts:
        assert h.agent is not None and h.agent.poll() is None
        assert kernel_state(h.name, ["flannel.1"]) == before[h.name]
    first.start(wait=False)
    second.start(wait=False)
    first.wait_healthy()
    second.wait_healthy()
    tx, rx = ping.result()
    print(f"\nleader then quorum lost for ~12 s: {tx - rx} of {tx} pings lost")
    assert tx == rx
    # recovered: a new host's lease reaches both
    h3 = lab.add_host()
    lab.start_agent(h3)
    wait_for(h3.subnet_file.exists, 30, what="new host joins after recovery")
    new = subnet_of(h3)
    for h in hosts:
        wait_for(lambda h=h: route_to(h, new), 20, what=f"{h.name} sees the new host")
    logs = lab.log(hosts[0]) + lab.log(hosts[1])
    assert "switching to etcd endpoint" in logs or "resuming at revision" in logs
    out = cluster.ctl("get", "--prefix", f"{PREFIX}/subnets/", "--keys-only").stdout
    assert len([ln for ln in out.splitlines() if ln.strip()]) == 3


def _rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _sample(pid: int, ns: str) -> dict[str, float]:
    """What a soak watches for growth: RSS, open fds, threads, CPU seconds used so far (user +
    system, from /proc/PID/stat) and the kernel entries on flannel.1."""
    stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    state = kernel_state(ns, ["flannel.1"])
    return {"rss_kb": _rss_kb(pid), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(stat[17]),
            "cpu_s": (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"),
            "routes": len([ln for ln in state["routes"] if "flannel.1" in ln]),
            "neigh": len(state["neigh"]), "fdb": len(state["fdb"])}


CHURN_SECONDS = float(os.environ.get("NETAGENT_TEST_CHURN_SECONDS", "60"))


def test_memory_stays_flat_under_lease_churn(lab: Lab) -> None:
    """Short form for CI (60 s); NETAGENT_TEST_CHURN_SECONDS=1800 runs the 30-minute soak.
    RSS, fds, threads, CPU and kernel entry counts are sampled at start, middle and end."""
    assert lab.etcd is not None
    hosts = vxlan_lab(lab, 1, "--repair-interval", "2")
    h = hosts[0]
    assert h.agent is not None
    pid = h.agent.pid
    base = lab.prefix

    def churn(seconds: float) -> int:
        rounds = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end and rounds < 100_000:
            i = rounds % 50
            key = f"{PREFIX}/subnets/10.20.{200 + i}.0-24"
            value = ('{"PublicIP":"' + f"{base}.{100 + i}" + '","PublicIPv6":null,"BackendType":'
                     '"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:' + f"{i:02x}" + '"}}')
            lab.etcd.ctl("put", key, value)  # type: ignore[union-attr]
            lab.etcd.ctl("del", key)  # type: ignore[union-attr]
            rounds += 1
        return rounds

    churn(min(15.0, CHURN_SECONDS / 4))  # warm-up: caches, allocator arenas
    time.sleep(3)  # the last deletes applied
    start = _sample(pid, h.name)
    rounds = churn(CHURN_SECONDS / 2)
    time.sleep(3)
    middle = _sample(pid, h.name)
    rounds += churn(CHURN_SECONDS / 2)
    time.sleep(3)
    end = _sample(pid, h.name)
    print(f"\nchurn {CHURN_SECONDS:.0f} s, {rounds} join+leave rounds")
    for name, s in (("start", start), ("middle", middle), ("end", end)):
        print(f"  {name:6}: " + ", ".join(f"{k} {v:g}" for k, v in s.items()))
    print(f"  agent CPU during churn: {100 * (end['cpu_s'] - start['cpu_s']) / CHURN_SECONDS:.1f} %")
    assert h.agent.poll() is None
    assert end["rss_kb"] - start["rss_kb"] < 4096, (start, end)
    # no leak of fds or threads, and the kernel holds exactly what it held before the churn
    for key in ("fds", "threads", "routes", "neigh", "fdb"):
        assert end[key] == start[key] == middle[key], (key, start, middle, end)
    state = kernel_state(h.name, ["flannel.1"])
    churned = [ln for ln in state["routes"] if ln.startswith("10.20.2") and "flannel.1" in ln]
    assert churned == []  # every churned peer was removed again


def test_sigkill_restart_under_ping_and_iperf_changes_nothing(lab: Lab) -> None:
    import random
    import subprocess

    hosts = vxlan_lab(lab, 2)
    h1, _ = hosts
    p1, p2 = lab.pods
    subnet_before = subnet_of(h1)
    state_before = kernel_state(h1.name, ["flannel.1"])
    port = str(random.randrange(20000, 30000))
    server = subprocess.Popen(["ip", "netns", "exec", p2.name, "iperf3", "-s", "-1", "-p", port],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)  # let IPv6 link-local set-up of the new links settle (not the agent's doing)
    monitor = subprocess.Popen(["ip", "netns", "exec", h1.name, "ip", "-o", "monitor", "route",
                                "neigh", "link", "address"], stdout=subprocess.PIPE, text=True)
    fdb_monitor = subprocess.Popen(["ip", "netns", "exec", h1.name, "bridge", "monitor", "fdb"],
                                   stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        client = subprocess.Popen(["ip", "netns", "exec", p1.name, "iperf3", "-c", p2.ip, "-p",
                                   port, "-t", "8", "-J"], stdout=subprocess.PIPE, text=True)
        ping = PingRun(p1, p2.ip, 8, interval=0.05)
        time.sleep(2)
        lab.stop_agent(h1, signal.SIGKILL)
        lab.start_agent(h1)
        wait_for(lambda: lab.log(h1).count("ready: subnet") >= 2, 20,
                 what="restarted agent ready")
        out, _ = client.communicate(timeout=30)
        tx, rx = ping.result()
    finally:
        monitor.terminate()
        fdb_monitor.terminate()
        changes, _ = monitor.communicate(timeout=5)
        fdb_changes, _ = fdb_monitor.communicate(timeout=5)
        server.kill()
        server.wait(5)
    report = json.loads(out)
    sent = report["end"]["sum_sent"]["bytes"]
    received = report["end"]["sum_received"]["bytes"]
    # what the agent writes: proto-111 routes, permanent neighbours and FDB entries on its
    # device, the device itself and its address (kernel-made link-local routes and ARP entries
    # driven by traffic are not the agent's)
    ours = [ln for ln in changes.splitlines()
            if "proto 111" in ln or ("flannel.1" in ln and ("PERMANENT" in ln or " inet " in ln
                                                              or ": flannel.1" in ln))]
    ours += [ln for ln in fdb_changes.splitlines() if "flannel.1" in ln]
    print(f"\nSIGKILL+restart: ping {tx - rx}/{tx} lost; iperf3 {received / 1e6:.0f} MB received, "
          f"{report['end']['sum_sent'].get('retransmits', 0)} retransmits; "
          f"{len(ours)} kernel changes on our devices")
    assert tx == rx
    assert received > 0 and received >= sent * 0.99
    assert ours == [], ours
    assert subnet_of(h1) == subnet_before
    assert kernel_state(h1.name, ["flannel.1"]) == state_before


def test_peer_that_vanished_while_we_were_down_is_swept_at_start(lab: Lab) -> None:
    assert lab.etcd is not None
    hosts = vxlan_lab(lab, 3)
    h1, h2, h3 = hosts
    gone = subnet_of(h3)
    assert route_to(h1, gone)
    lab.stop_agent(h1)  # SIGTERM: h1's kernel entries stay, as they should
    lab.stop_agent(h3, signal.SIGKILL)
    lab.etcd.ctl("del", f"{PREFIX}/subnets/{gone.replace('/', '-')}")
    assert route_to(h1, gone)  # stale: nobody is running on h1 to notice
    lab.start_agent(h1)
    wait_for(lambda: lab.log(h1).count("ready: subnet") >= 2, 20, what="h1 restarted")
    state = kernel_state(h1.name, ["flannel.1"])
    net = gone.split("/")[0]
    assert not any(ln.startswith(net) for ln in state["routes"])
    assert not any(ln.startswith(net + " ") for ln in state["neigh"])
    assert lab.pods[0].ping(lab.pods[1].ip)
