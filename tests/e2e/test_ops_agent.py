"""Operating the real agent in namespace hosts: sd_notify, /healthz /readyz, /metrics, and the
`status`/`leases`/`doctor` commands checked against etcd and the kernel."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.harness import REPO, RUN_ID, Host, Lab, sh, wait_for

pytestmark = pytest.mark.privileged

PREFIX = "/coreos.com/network"
HTTP_PORT = 9105  # inside each host's own namespace: no clash with anything outside


def http_get(host: Host, path: str, port: int = HTTP_PORT) -> tuple[int, str]:
    """GET from inside the host namespace (the agent listens there)."""
    code = (
        "import sys, urllib.request, urllib.error\n"
        f"u = 'http://127.0.0.1:{port}{path}'\n"
        "try:\n"
        "    r = urllib.request.urlopen(u, timeout=3); print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode())\n"
        "except OSError as e:\n"
        "    print(0); print(e)\n"
    )
    out = sh(sys.executable, "-c", code, ns=host.name).stdout
    status, _, body = out.partition("\n")
    return int(status), body


def netagent(host: Host, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return sh(sys.executable, "-m", "netagent", *args, ns=host.name, check=check, env=env,
              timeout=60)


def metrics(host: Host) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)], parsed by prometheus-client's own parser."""
    status, body = http_get(host, "/metrics")
    assert status == 200, body
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def one(m: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    hits = [v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(hits) == 1, (name, labels, m.get(name))
    return hits[0]


class NotifyListener:
    """A NOTIFY_SOCKET like systemd's; records each message and whether subnet.env existed."""

    def __init__(self, path: Path, subnet_file: Path) -> None:
        self.path = path
        self.subnet_file = subnet_file
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[str, bool]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.messages.append((line, self.subnet_file.exists()))

    def lines(self, prefix: str) -> list[tuple[str, bool]]:
        return [(m, f) for m, f in self.messages if m.startswith(prefix)]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def test_ready_only_after_subnet_env_and_sd_notify_protocol(lab: Lab, tmp_path: Path) -> None:
    assert lab.etcd is not None
    h = lab.add_host()
    listener = NotifyListener(tmp_path / f"notify-{RUN_ID}.sock", h.subnet_file)
    try:
        lab.start_agent(h, "--healthz-port", str(HTTP_PORT), "--healthz-ip", "127.0.0.1",
                        env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000"})
        # no config yet: alive but not ready, nothing written
        wait_for(lambda: http_get(h, "/healthz")[0] == 200, 20, what="/healthz")
        status, body = http_get(h, "/readyz")
        assert status == 503 and "not ready" in body
        assert http_get(h, "/healthz")[1].strip() == "flanneld is running"
        wait_for(lambda: listener.lines("STATUS=waiting for network config"), 10,
                 what="STATUS line")
        assert not h.subnet_file.exists()
        assert not listener.lines("READY=1")

        lab.etcd.put(f"{PREFIX}/config", '{"Network":"10.11.0.0/16","Backend":{"Type":"alloc"}}')
        seen: list[tuple[int, bool]] = []

        def ready() -> bool:
            code, _ = http_get(h, "/readyz")
            seen.append((code, h.subnet_file.exists()))  # file checked after the answer
            return code == 200

        wait_for(ready, 30, interval=0.02, what="/readyz 200")
        assert all(exists for code, exists in seen if code == 200)
        assert seen[0][0] == 503
        assert http_get(h, "/readyz")[1].strip() == "flanneld is ready"

        wait_for(lambda: listener.lines("READY=1"), 10, what="READY=1")
        ready_msgs = listener.lines("READY=1")
        assert len(ready_msgs) == 1 and ready_msgs[0][1], "READY=1 before subnet.env"
        statuses = [m for m, _ in listener.lines("STATUS=")]
        for phase in ("waiting for network config", "acquiring lease", "programming backend",
                      "running"):
            assert f"STATUS={phase}" in statuses, statuses
        # WATCHDOG_USEC=1 s: pings every 0.5 s
        wait_for(lambda: len(listener.lines("WATCHDOG=1")) >= 3, 10, what="watchdog pings")

        assert lab.stop_agent(h, signal.SIGTERM) == 0
        wait_for(lambda: listener.lines("STOPPING=1"), 5, what="STOPPING=1")
        assert len(listener.lines("READY=1")) == 1
    finally:
        listener.close()


def test_metrics_status_and_leases_match_etcd_and_kernel(lab: Lab) -> None:
    assert lab.etcd is not None
    lab.etcd.put(f"{PREFIX}/config", '{"Network":"10.12.0.0/16","Backend":{"Type":"vxlan"}}')
    # a reservation for a host that does not exist: a peer that never answers probes
    lab.etcd.put(f"{PREFIX}/subnets/10.12.250.0-24", '{"PublicIP":"192.0.2.77","BackendType":'
                 '"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:77"}}')
    h1, h2 = lab.add_host(), lab.add_host()
    for h in (h1, h2):
        lab.start_agent(h, "--metrics-port", str(HTTP_PORT), "--healthz-ip", "127.0.0.1",
                        "--repair-interval", "1", "--subnet-lease-ttl", "60")
    for h in (h1, h2):
        wait_for(h.subnet_file.exists, 30, what=f"{h.name} subnet.env")
        lab.add_pod(h)  # the pod bridge carries the gateway address the probe pings
    leases = lab.etcd.get_prefix(f"{PREFIX}/subnets/")
    by_ip = {json.loads(v)["PublicIP"]: k[len(PREFIX) + 9:] for k, v in leases.items()}
    own, other = by_ip[h1.ip].replace("-", "/"), by_ip[h2.ip].replace("-", "/")

    def probed() -> dict[str, list[tuple[dict[str, str], float]]] | None:
        m = metrics(h1)
        r = {lab_["subnet"]: v for lab_, v in m.get("netagent_peer_reachable", [])}
        return m if r.get(other) == 1.0 and "10.12.250.0/24" in r else None

    m = wait_for(probed, 30, interval=0.5, what="peer probe results")
    assert one(m, "netagent_peers") == 2.0
    assert one(m, "netagent_ready") == 1.0
    assert one(m, "netagent_lease_info", subnet=own, backend="vxlan", network="10.12.0.0/16",
               public_ip=h1.ip, reserved="false") == 1.0
    assert 0 < one(m, "netagent_lease_expiry_seconds") <= 60
    assert one(m, "netagent_peer_reachable", subnet="10.12.250.0/24") == 0.0
    assert one(m, "netagent_peer_reachable", subnet=other, public_ip=h2.ip) == 1.0
    assert one(m, "netagent_reconcile_duration_seconds_count") >= 1
    assert one(m, "netagent_reconciles_total") >= 1
    # kernel entries: what the agent reports equals what `ip` shows (one vxlan peer each)
    routes = sh("ip", "-j", "route", "show", "proto", "111", ns=h1.name).stdout
    assert one(m, "netagent_kernel_entries", kind="route") == len(json.loads(routes)) == 2
    assert "netagent_etcd_request_errors_total" not in m or all(
        v == 0 for _, v in m["netagent_etcd_request_errors_total"])

    # a lease added in etcd shows up in the metrics; renewals are counted
    lab.etcd.put(f"{PREFIX}/subnets/10.12.251.0-24", '{"PublicIP":"192.0.2.78","BackendType":'
                 '"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:78"}}')
    wait_for(lambda: one(metrics(h1), "netagent_peers") == 3.0, 10, what="3 peers")

    # status --json against etcd and status.json
    st_proc = netagent(h1, "status", "--json", "--state-dir", str(h1.state_dir),
                       "--etcd-endpoints", lab.etcd.endpoint)
    assert st_proc.returncode == 0, st_proc.stderr
    st = json.loads(st_proc.stdout)
    key = f"{PREFIX}/subnets/{by_ip[h1.ip]}"
    meta = lab.etcd.get_json(key)["kvs"][0]  # type: ignore[index]
    assert st["subnet"] == own and st["backend"] == "vxlan" and st["public_ip"] == h1.ip
    assert st["lease"]["key"] == key and st["lease"]["in_etcd"] is True
    assert st["lease"]["lease_id"] == format(int(meta["lease"]), "016x")  # type: ignore[index]
    assert 0 < st["lease"]["ttl"] <= 60 and st["lease"]["reserved"] is False
    assert st["etcd"] == "ok" and st["ready"] is True
    peers = {p["subnet"]: p for p in st["peers"]}
    assert peers[other]["public_ip"] == h2.ip and peers[other]["reachable"] is True
    assert peers["10.12.250.0/24"]["reachable"] is False
    assert st["kernel_entries"]["route"] == 2 or st["kernel_entries"]["route"] == 3
    human = netagent(h1, "status", "--state-dir", str(h1.state_dir), "--etcd-endpoints",
                     lab.etcd.endpoint).stdout
    assert "PEER SUBNET" in human and other in human

    # leases --json lists exactly what etcd holds, TTLs and the reservation marked
    lp = netagent(h1, "leases", "--json", "--etcd-endpoints", lab.etcd.endpoint)
    assert lp.returncode == 0, lp.stderr
    rows = {r["key"]: r for r in json.loads(lp.stdout)["leases"]}
    in_etcd = lab.etcd.get_prefix(f"{PREFIX}/subnets/")
    assert set(rows) == set(in_etcd)
    for k, v in in_etcd.items():
        r = rows[k]
        assert r["public_ip"] == json.loads(v)["PublicIP"]
        lease_id = int(lab.etcd.get_json(k)["kvs"][0].get("lease", 0))  # type: ignore[index,union-attr]
        if lease_id:
            assert r["lease_id"] == format(lease_id, "016x") and not r["reserved"]
            assert 0 < r["ttl"] <= 60
        else:
            assert r["reserved"] and r["lease_id"] is None and r["ttl"] is None
    assert sum(r["reserved"] for r in rows.values()) == 2

    # doctor: healthy host passes ip_forward; with ip_forward=0 it fails and says how to fix
    ok = json.loads(netagent(h1, "doctor", "--json", "--etcd-endpoints", lab.etcd.endpoint,
                             "--subnet-file", str(h1.subnet_file), "--state-dir",
                             str(h1.state_dir), "--iface", "eth0").stdout)
    checks = {c["name"]: c for c in ok["checks"]}
    assert checks["ip_forward"]["ok"] is True and checks["etcd"]["ok"] is True
    assert checks["mtu"]["ok"] is True and checks["conflicting routes"]["ok"] is True
    sh("sysctl", "-qw", "net.ipv4.ip_forward=0", ns=h1.name)
    bad = netagent(h1, "doctor", "--json", "--etcd-endpoints", lab.etcd.endpoint,
                   "--subnet-file", str(h1.subnet_file), "--state-dir", str(h1.state_dir),
                   "--iface", "eth0")
    assert bad.returncode == 1
    checks = {c["name"]: c for c in json.loads(bad.stdout)["checks"]}
    assert checks["ip_forward"]["ok"] is False
    assert "sysctl -w net.ipv4.ip_forward=1" in checks["ip_forward"]["fix"]
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=h1.name)
    for h in (h1, h2):
        assert lab.stop_agent(h) == 0
