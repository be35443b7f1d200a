"""End to end: the wireguard backend on three namespace hosts (real agents, etcd, wireguard-go).

The machine has no WireGuard kernel module, so every device here is wireguard-go's. Its UAPI
socket lives in the file system (``/var/run/wireguard/NAME.sock``), not in the network
namespace, so namespace "hosts" on one machine would share it: :class:`WgLab` starts each agent
in a private mount namespace with a per-host directory bound on ``/run/wireguard`` (the same
directory again after a restart, so the restarted agent finds its wireguard-go). The test talks
to each host's device through that directory's socket.

The tests of the module share one 3-host lab and run in file order (each says what it leaves).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.all import ICMP, IP, UDP, rdpcap  # type: ignore[attr-defined]
from support.harness import REPO, Host, PingRun, kernel_state, ping_all, sh, wait_for
from support.wireguard import DEV, WgLab

from netagent.backends.wireguard.model import WgState, public_key

pytestmark = pytest.mark.privileged

PREFIX = "/coreos.com/network"
NETWORK = "10.61.0.0/16"


#: agent flags of the module's hosts (the restart test starts an agent again with them)
AGENT_ARGS = ("--repair-interval", "2", "--metrics-port", "9105", "--healthz-port", "9106",
              "--healthz-ip", "127.0.0.1")


def http_get(host: Host, port: int, path: str) -> tuple[int, str]:
    """GET from inside the host namespace (the agent listens on its loopback)."""
    code = ("import urllib.request, urllib.error\n"
            f"u = 'http://127.0.0.1:{port}{path}'\n"
            "try:\n    r = urllib.request.urlopen(u, timeout=3); print(r.status); "
            "print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n")
    out = sh(sys.executable, "-c", code, ns=host.name).stdout
    status, _, body = out.partition("\n")
    return int(status), body


def cfg(backend: dict[str, object]) -> str:
    return json.dumps({"Network": NETWORK, "Backend": backend})


def config_text(lab: WgLab, host: Host) -> str:
    """The device's configuration (no counters, no handshake times)."""
    return lab.device(host).get().config_text()


def state(lab: WgLab, host: Host) -> WgState:
    return lab.device(host).get()


def health(host: Host) -> dict[str, object]:
    return host.status().get("backend_health", {})  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def wg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WgLab, list[Host]]]:
    lab = WgLab(tmp_path_factory.mktemp("wg"))
    try:
        lab.start_etcd()
        hosts = lab.start_hosts(cfg({"Type": "wireguard"}), 3, *AGENT_ARGS)
        for h in hosts:
            lab.add_pod(h)
        yield lab, hosts
    finally:
        lab.close()


# --------------------------------------------------------------------------- the mesh


def test_mesh_ping_matrix_lease_shape_and_device(wg: tuple[WgLab, list[Host]]) -> None:
    """Every pod reaches every other over wireguard-go; each lease is flannel's exact bytes;
    device, address, route and peers are what flannel programs."""
    lab, hosts = wg
    ping_all(lab.pods)
    leases = lab.leases()
    assert len(leases) == 3
    for h in hosts:
        key_file = h.state_dir / "wgkey"
        assert oct(key_file.stat().st_mode & 0o777) == "0o400"
        priv = key_file.read_text().strip()
        assert len(base64.b64decode(priv)) == 32
        pub = sh("wg", "pubkey", input=priv + "\n").stdout.strip()
        assert public_key(priv) == pub
        s = h.subnet()
        raw = leases[f"{s.network_address}-{s.prefixlen}"]
        assert raw == (f'{{"PublicIP":"{h.ip}","PublicIPv6":null,"BackendType":"wireguard",'
                       f'"BackendData":{{"PublicKey":"{pub}","Port":51820}}}}')
        env = h.subnet_file.read_text()
        assert "FLANNEL_MTU=1420" in env  # 1500 − 80
        link = h.run("ip", "-d", "link", "show", DEV).stdout
        assert "tun" in link and "mtu 1420" in link
        addrs = h.run("ip", "-4", "addr", "show", "dev", DEV).stdout
        assert f"inet {s.network_address}/32" in addrs
        route = h.run("ip", "route", "show", NETWORK).stdout
        assert f"dev {DEV} proto 111 scope link" in route
        st = state(lab, h)
        assert st.listen_port == 51820 and public_key(st.private_key) == pub
        others = [o for o in hosts if o is not h]
        assert sorted(p.endpoint for p in st.peers.values()) == sorted(
            f"{o.ip}:51820" for o in others)
        assert sorted(str(n) for p in st.peers.values() for n in p.allowed_ips) == sorted(
            str(o.subnet()) for o in others)
        hl = health(h)
        assert hl["ok"] is True and hl["implementation"] == "wireguard-go", hl
        assert "running wireguard-go" in lab.log(h)
    # the implementation reaches /metrics, /readyz and `netagent status`
    h1 = hosts[0]
    code, body = http_get(h1, 9105, "/metrics")
    assert code == 200
    assert 'netagent_wireguard_implementation{implementation="wireguard-go"} 1.0' in body, body
    assert 'netagent_wireguard_up{device="flannel-wg"} 1.0' in body
    assert 'netagent_wireguard_peers{device="flannel-wg"} 2.0' in body
    assert http_get(h1, 9106, "/readyz")[0] == 200
    human = sh(sys.executable, "-m", "netagent", "status", "--state-dir", str(h1.state_dir),
               "--etcd-endpoints", lab.etcd.endpoint if lab.etcd else "", ns=h1.name,
               env=dict(os.environ, PYTHONPATH=str(REPO))).stdout
    assert "backend health" in human and "wireguard-go" in human, human


def test_underlay_capture_shows_only_encrypted_udp(wg: tuple[WgLab, list[Host]]) -> None:
    """A capture on host 1's underlay while pod 1 pings pod 2 with a marker payload: only UDP
    between the hosts' listen ports, no ICMP, and the marker nowhere in the bytes."""
    lab, hosts = wg
    h1, h2 = hosts[0], hosts[1]
    p1, p2 = lab.pods[0], lab.pods[1]
    pcap = lab.tmp / "underlay.pcap"
    cap = subprocess.Popen(["ip", "netns", "exec", h1.name, "tcpdump", "-i", "eth0", "-U", "-n",
                            "-c", "400", "-w", str(pcap), "not", "tcp", "port", "2379", "and",
                            "not", "arp"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # tcpdump attached
        marker = "deadbeefcafe4e41"
        out = sh("ping", "-c", "10", "-i", "0.1", "-W", "1", "-p", marker, "-s", "200", p2.ip,
                 ns=p1.name, timeout=20)
        assert " 0% packet loss" in out.stdout, out.stdout
        time.sleep(0.5)
    finally:
        cap.send_signal(signal.SIGINT)
        cap.wait(10)
    packets = rdpcap(str(pcap))
    wg_pkts = [p for p in packets if UDP in p and IP in p]
    assert len(wg_pkts) >= 20, f"expected 10 echo requests + replies, saw {len(wg_pkts)}"
    for p in packets:
        assert ICMP not in p or IP not in p or p[IP].src not in (p1.ip, p2.ip), p.summary()
        assert bytes.fromhex(marker) not in bytes(p), f"marker in clear: {p.summary()}"
        if IP in p and p[IP].src in (h1.ip, h2.ip) and p[IP].dst in (h1.ip, h2.ip):
            assert UDP in p and 51820 in (p[UDP].sport, p[UDP].dport), p.summary()
    # the same ping in the clear would show the marker: the check above can fail
    assert bytes.fromhex(marker) * 2 in bytes.fromhex(marker * 3)


def test_kill9_and_restart_under_ping_loses_nothing_and_writes_nothing(
        wg: tuple[WgLab, list[Host]]) -> None:
    """kill -9 of host 1's agent under a 20/s ping, then a restart: wireguard-go (its own
    session) keeps forwarding, and the new agent finds the device right and writes nothing
    (same configuration dump; its device-write counter stays 0 through full syncs)."""
    lab, hosts = wg
    h1 = hosts[0]
    p1, p2 = lab.pods[0], lab.pods[1]
    before = config_text(lab, h1)
    kernel_before = (kernel_state(h1.name), h1.run("ip", "addr", "show", "dev", DEV).stdout)
    pid_before = lab.wg_pids()
    link_before = h1.run("ip", "-o", "link", "show", DEV).stdout.split(":")[0]
    ping = PingRun(p1, p2.ip, 8, interval=0.05)
    time.sleep(1.0)
    assert h1.agent is not None
    h1.agent.send_signal(signal.SIGKILL)
    h1.agent.wait(10)
    h1.agent = None
    time.sleep(1.0)
    reconciles_needed = 3  # the first (full) sync and two repair ticks
    log_from = len(lab.log(h1))
    lab.start_agent(h1, *AGENT_ARGS)
    wait_for(lambda: (h1.status().get("ready") and
                      h1.status().get("reconciles", 0) >= reconciles_needed), 20,
             what="restarted agent ready, past two full syncs")
    tx, rx = ping.result()
    assert tx - rx == 0, f"lost {tx - rx} of {tx} pings across kill -9 + restart"
    assert config_text(lab, h1) == before
    assert (kernel_state(h1.name), h1.run("ip", "addr", "show", "dev", DEV).stdout) == \
        kernel_before  # address, Network route: untouched
    assert lab.wg_pids() == pid_before
    assert h1.run("ip", "-o", "link", "show", DEV).stdout.split(":")[0] == link_before
    hl = health(h1)
    assert hl["device_writes"] == 0, hl
    new_log = lab.log(h1)[log_from:]
    assert "running wireguard-go" not in new_log  # adopted, not restarted
    assert "drift repair" not in new_log and "reconciled:" not in new_log, new_log
    assert not [ln for ln in new_log.splitlines() if ": peer " in ln], new_log
    print(f"\nkill -9 + restart under 20/s ping: {tx} sent, {tx - rx} lost; device writes 0")


def test_bad_psk_is_refused_and_changes_nothing(wg: tuple[WgLab, list[Host]]) -> None:
    """A config with a PSK that is not a 32-byte base64 key is rejected naming Backend.PSK; the
    devices keep their configuration and traffic flows. A good PSK then reaches every peer
    live, and goes again."""
    lab, hosts = wg
    assert lab.etcd is not None
    before = [config_text(lab, h) for h in hosts]
    lab.etcd.put(f"{PREFIX}/config", cfg({"Type": "wireguard", "PSK": "bm90LWEta2V5"}))
    for h in hosts:
        wait_for(lambda h=h: "Backend.PSK" in h.status().get("config_error", ""), 15,
                 what=f"{h.name} to reject the PSK")
    time.sleep(2.5)  # a repair tick under the rejected config
    assert [config_text(lab, h) for h in hosts] == before
    assert lab.pods[0].ping(lab.pods[2].ip)
    # a good PSK is applied live to every peer (only that field is written), then taken away
    psk = base64.b64encode(os.urandom(32)).decode()
    for want in (psk, ""):
        lab.etcd.put(f"{PREFIX}/config", cfg({"Type": "wireguard", **({"PSK": want} if want
                                                                       else {})}))
        for h in hosts:
            wait_for(lambda h=h, w=want: {p.preshared_key for p in state(lab, h).peers.values()}
                     == {w}, 15, what=f"{h.name} peers with PSK {bool(want)}")
        assert all(not h.status().get("config_error") for h in hosts)
        ping_all(lab.pods, timeout=20)


def test_dead_wireguard_go_is_restarted_with_its_device(wg: tuple[WgLab, list[Host]]) -> None:
    """kill -9 of host 2's wireguard-go (its device vanishes with it): the next sync starts a
    new one, re-creates device, address, route and peers, and counts the restart."""
    lab, hosts = wg
    h2 = hosts[1]
    (old,) = [int(f.read_text()) for f in h2.state_dir.glob("flannel-wg.wireguard-go.pid")]
    before = config_text(lab, h2)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: health(h2).get("wireguard_go_restarts") == 1 and health(h2).get("ok"), 15,
             what="wireguard-go restarted")
    (new,) = [int(f.read_text()) for f in h2.state_dir.glob("flannel-wg.wireguard-go.pid")]
    assert new != old
    assert config_text(lab, h2) == before
    assert "restarting it (the device is re-created)" in lab.log(h2)
    ping_all(lab.pods, timeout=15)


def test_malformed_public_key_keeps_old_peer_then_lease_delete_removes_it(
        wg: tuple[WgLab, list[Host]]) -> None:
    """Host 3 stops (SIGTERM: wireguard-go stays). Its lease gets a malformed PublicKey: the
    others log it and keep its old peer (pods still reach it). Its lease is deleted: every
    other host removes the peer (flannel never does, k3s#5216)."""
    lab, hosts = wg
    assert lab.etcd is not None
    h1, h2, h3 = hosts
    lab.stop_agent(h3)
    s3 = h3.subnet()
    key = f"{PREFIX}/subnets/{s3.network_address}-{s3.prefixlen}"
    attrs = json.loads(lab.etcd.get(key) or "{}")
    good = attrs["BackendData"]["PublicKey"]
    attrs["BackendData"]["PublicKey"] = "not!a!key"
    lab.etcd.ctl("put", "--ignore-lease", key, json.dumps(attrs, separators=(",", ":")))
    for h in (h1, h2):
        wait_for(lambda h=h: "PublicKey is malformed" in lab.log(h), 10,
                 what=f"{h.name} to log the malformed key")
        assert good in state(lab, h).peers
    assert lab.pods[0].ping(lab.pods[2].ip)
    lab.etcd.ctl("del", key)
    for h in (h1, h2):
        wait_for(lambda h=h: good not in state(lab, h).peers, 10,
                 what=f"{h.name} to remove host 3's peer")
        assert len(state(lab, h).peers) == 1
    assert not lab.pods[0].ping(lab.pods[2].ip, wait=0.5)
    assert lab.pods[0].ping(lab.pods[1].ip)


# --------------------------------------------------------------------------- dual stack


def test_dual_stack_separate_devices(tmp_path: Path) -> None:
    """Mode separate with IPv6: flannel-wg and flannel-wg-v6 (port 51821), BackendV6Data, and
    pods reach each other over both families."""
    lab = WgLab(tmp_path, tag="d")  # beside the module lab
    try:
        lab.start_etcd()
        hosts = lab.start_hosts(json.dumps({
            "Network": NETWORK, "EnableIPv6": True, "IPv6Network": "fd61:61::/48",
            "Backend": {"Type": "wireguard"}}), 2, "--repair-interval", "2")
        pods = [lab.add_pod(h) for h in hosts]
        for a, b in ((pods[0], pods[1]), (pods[1], pods[0])):
            for dst in (b.ip, b.ip6):
                wait_for(lambda a=a, dst=dst: a.ping(dst), 20, interval=0.2,
                         what=f"{a.name} → {dst}")
        h1, h2 = hosts
        s1 = h1.subnet()
        (raw,) = [json.loads(v) for k, v in lab.leases().items()
                  if k.startswith(f"{s1.network_address}-{s1.prefixlen}&")]
        pub = public_key((h1.state_dir / "wgkey").read_text().strip())
        assert raw["BackendData"] == {"PublicKey": pub, "Port": 51820}
        assert raw["BackendV6Data"] == {"PublicKey": pub, "Port": 51821}
        st6 = lab.device(h1, "flannel-wg-v6").get()
        assert st6.listen_port == 51821
        assert [p.endpoint for p in st6.peers.values()] == [f"[{h2.ip6}]:51821"]
        route6 = h1.run("ip", "-6", "route", "show", "fd61:61::/48").stdout
        assert "dev flannel-wg-v6 proto 111" in route6, route6
    finally:
        lab.close()


# --------------------------------------------------------------------------- a flannel peer


def test_a_flannel_wireguard_host_is_a_peer(tmp_path: Path) -> None:
    """A host configured the way flannel's wireguard backend configures itself (wireguard-go +
    `wg` by hand, no agent; its lease written with flannel's exact value) and a netagent host
    reach each other: a netagent pod pings the flannel host's flannel-wg address, and the
    netagent host programs the flannel lease's key, endpoint and subnet as it is."""
    lab = WgLab(tmp_path, tag="f")  # beside the module lab
    try:
        lab.start_etcd()
        assert lab.etcd is not None
        config = json.dumps({"Network": NETWORK, "SubnetMax": "10.61.199.0",
                             "Backend": {"Type": "wireguard"}})
        (h1,) = lab.start_hosts(config, 1, "--repair-interval", "2")
        pod = lab.add_pod(h1)
        fl = lab.add_host()  # the flannel host: no agent
        run = lab.wg_dir(fl)
        wggo = subprocess.Popen(
            ["ip", "netns", "exec", fl.name, "unshare", "-m", "--propagation", "private", "sh",
             "-c", 'mount --bind "$0" /run/wireguard && exec wireguard-go -f flannel-wg',
             str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: (run / "flannel-wg.sock").exists(), 10, what="flannel's device")
            priv = sh("wg", "genkey").stdout.strip()
            pub = sh("wg", "pubkey", input=priv + "\n").stdout.strip()
            keyfile = tmp_path / "flannel-wgkey"
            keyfile.write_text(priv + "\n")
            keyfile.chmod(0o400)
            s1 = h1.subnet()
            agent_pub = json.loads(lab.leases()[f"{s1.network_address}-{s1.prefixlen}"]
                                   )["BackendData"]["PublicKey"]

            def wg(*args: str) -> None:  # `wg` inside the flannel host's mount namespace
                sh("nsenter", "-t", str(wggo.pid), "-m", "-n", "wg", *args)

            wg("set", "flannel-wg", "listen-port", "51820", "private-key", str(keyfile),
               "peer", agent_pub, "endpoint", f"{h1.ip}:51820", "allowed-ips", str(s1))
            for cmd in (("ip", "addr", "add", "10.61.250.0/32", "dev", "flannel-wg"),
                        ("ip", "link", "set", "flannel-wg", "up"),
                        ("ip", "route", "add", NETWORK, "dev", "flannel-wg")):
                fl.run(*cmd)
            # flannel's lease value, byte for byte (Go's struct order, compact)
            lab.etcd.put(f"{PREFIX}/subnets/10.61.250.0-24",
                         f'{{"PublicIP":"{fl.ip}","PublicIPv6":null,"BackendType":"wireguard",'
                         f'"BackendData":{{"PublicKey":"{pub}","Port":51820}}}}')
            wait_for(lambda: pub in state(lab, h1).peers, 10, what="the flannel peer programmed")
            peer = state(lab, h1).peers[pub]
            assert peer.endpoint == f"{fl.ip}:51820"
            assert [str(n) for n in peer.allowed_ips] == ["10.61.250.0/24"]
            wait_for(lambda: pod.ping("10.61.250.0"), 15, interval=0.3,
                     what="netagent pod → flannel host over wireguard")
        finally:
            wggo.kill()
            wggo.wait(5)
    finally:
        lab.close()


# --------------------------------------------------------------------------- live switch


def test_live_switch_vxlan_wireguard_hostgw_under_ping(tmp_path: Path) -> None:
    """vxlan → wireguard → host-gw with etcdctl put while pod 1 pings pod 2 at 20/s; the
    losses are printed (the other backends lose ≤ 1 of 200 per switch)."""
    lab = WgLab(tmp_path, tag="s")  # beside the module lab
    try:
        lab.start_etcd()
        hosts = lab.mesh(cfg({"Type": "vxlan"}), 3, "--repair-interval", "2")
        assert lab.etcd is not None
        p1, p2 = lab.pods[0], lab.pods[1]
        losses = []
        for target in ("wireguard", "host-gw"):
            ping = PingRun(p1, p2.ip, 10, interval=0.05)
            time.sleep(0.5)
            t0 = time.monotonic()
            lab.etcd.put(f"{PREFIX}/config", cfg({"Type": target}))
            for h in hosts:
                wait_for(lambda h=h, t=target: all(
                    json.loads(v).get("BackendType") == t for v in lab.leases().values())
                    and h.status().get("backend") == t, 20, what=f"{h.name} on {target}")
            if target == "wireguard":
                for h in hosts:
                    wait_for(lambda h=h: len(state(lab, h).peers) == 2, 20,
                             what=f"{h.name} wireguard peers")
                    assert "flannel.1" not in h.run("ip", "link").stdout
            else:
                for h in hosts:
                    wait_for(lambda h=h: DEV not in h.run("ip", "link").stdout, 20,
                             what=f"{h.name} flannel-wg removed")
            converged = time.monotonic() - t0
            ping_all(lab.pods, timeout=20)
            tx, rx = ping.result()
            losses.append((target, tx - rx, tx, round(converged, 2)))
        print("\nlive switches (target, pings lost, sent, seconds to converge):", losses)
        for h in hosts:
            assert h.agent is not None and h.agent.poll() is None
            assert "Traceback" not in lab.log(h)
        assert lab.wg_pids() == [] or all(
            not Path(f"/proc/{p}").exists() for p in lab.wg_pids())
        for target, lost, sent, _ in losses:
            assert lost <= sent // 10, f"switch to {target} lost {lost} of {sent}"
    finally:
        lab.close()
