"""etcd security and endpoints against real servers: TLS client certs, CA-only TLS, a wrong CA,
user/password over TLS (and its refusal over plaintext), token expiry, and failover when the
serving member of a 3-member cluster is killed while an agent runs."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.harness import Etcd, Lab, need_etcd, read_env_file, sh, wait_for
from test_ops_agent import HTTP_PORT, http_get, metrics, one

from netagent.registry import EtcdSettings, Registry, RegistryConfigError, RegistryError

pytestmark = pytest.mark.privileged

PREFIX = "/coreos.com/network"


def make_pki(d: Path, ips: tuple[str, ...] = ("127.0.0.1",)) -> Path:
    """Throw-away CA, server cert (SAN = `ips`), client cert CN=flannel-agent, and a wrong CA."""
    d.mkdir(parents=True, exist_ok=True)
    san = ",".join(f"IP:{ip}" for ip in ips) + ",DNS:localhost"
    (d / "s.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    (d / "c.ext").write_text("extendedKeyUsage=clientAuth\n")
    steps = [
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=test-ca",
        "req -x509 -newkey rsa:2048 -nodes -keyout wrong.key -out wrong-ca.crt -days 2 "
        "-subj /CN=wrong-ca",
        "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=etcd-server",
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt "
        "-days 2 -extfile s.ext",
        "req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=flannel-agent",
        "x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt "
        "-days 2 -extfile c.ext",
    ]
    for step in steps:
        subprocess.run(["openssl", *step.split()], cwd=d, check=True, capture_output=True)
    return d


@dataclass
class TlsEtcd(Etcd):
    """An https member; etcdctl (health check, set-up) uses the client cert and root user."""

    pki: Path = Path()
    client_cert_auth: bool = True
    user: str = ""

    def __post_init__(self) -> None:
        self.scheme = "https"
        p = self.pki
        # etcd: --trusted-ca-file alone already enforces client certificates
        auth = ["--trusted-ca-file", str(p / "ca.crt"), "--client-cert-auth"]
        self.extra = (*self.extra, "--cert-file", str(p / "server.crt"), "--key-file",
                      str(p / "server.key"), *(auth if self.client_cert_auth else []))

    def ctl(self, *args: str, check: bool = True, api: int = 3,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        p = self.pki
        cmd = ["etcdctl", "--endpoints", self.endpoint, "--dial-timeout", "3s",
               "--cacert", str(p / "ca.crt"), "--cert", str(p / "client.crt"),
               "--key", str(p / "client.key")]
        if self.user:
            cmd += ["--user", self.user]
        return sh(*cmd, *args, check=check, ns=self.ns, input=input,
                  env=dict(os.environ, ETCDCTL_API="3"))


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_etcd(pki: Path) -> Iterator[TlsEtcd]:
    need_etcd()
    server = TlsEtcd(pki=pki).start()
    try:
        yield server
    finally:
        server.cleanup()


def reg(server: Etcd, **kw: str) -> Registry:
    return Registry(EtcdSettings(endpoints=(server.endpoint,), timeout=3, **kw))


def test_client_cert_works_and_tls_failures_say_why(tls_etcd: TlsEtcd, pki: Path) -> None:
    good = reg(tls_etcd, cafile=str(pki / "ca.crt"), certfile=str(pki / "client.crt"),
               keyfile=str(pki / "client.key"))
    good.put("/t/k", "v")
    kv = good.get("/t/k")
    assert kv is not None and kv.value == b"v"
    good.close()

    wrong = reg(tls_etcd, cafile=str(pki / "wrong-ca.crt"), certfile=str(pki / "client.crt"),
                keyfile=str(pki / "client.key"))
    with pytest.raises(RegistryError) as exc:
        wrong.get("/t/k")
    assert exc.value.kind == "tls"
    assert "not signed by the CA in --etcd-cafile" in str(exc.value)
    wrong.close()

    no_cert = reg(tls_etcd, cafile=str(pki / "ca.crt"))
    with pytest.raises(RegistryError) as exc:
        no_cert.get("/t/k")
    assert exc.value.kind == "tls" and "client certificate" in str(exc.value)
    no_cert.close()

    with pytest.raises(RegistryConfigError, match="refusing to send the etcd user name"):
        Registry(EtcdSettings(endpoints=("http://127.0.0.1:1",), username="a", password="b"))


def test_ca_only_tls_with_user_password_and_token_expiry(pki: Path) -> None:
    need_etcd()
    server = TlsEtcd(pki=pki, client_cert_auth=False, extra=("--auth-token-ttl", "3")).start()
    try:
        for cmd in (["user", "add", "root:rootpw"], ["user", "add", "agent:agentpw"],
                    ["role", "add", "netagent"],
                    ["role", "grant-permission", "netagent", "--prefix=true", "readwrite",
                     f"{PREFIX}/"],
                    ["user", "grant-role", "agent", "netagent"], ["auth", "enable"]):
            server.ctl(*cmd)
        server.user = "root:rootpw"
        ca = str(pki / "ca.crt")
        r = reg(server, cafile=ca, username="agent", password="agentpw")
        r.put(f"{PREFIX}/config", "{}")
        with pytest.raises(RegistryError) as exc:
            r.put("/elsewhere", "x")
        assert exc.value.kind == "permission"
        time.sleep(4)  # idle longer than --auth-token-ttl: the token expired; re-auth once
        assert r.get(f"{PREFIX}/config") is not None
        assert r.stats.errors.get("auth", 0) >= 1
        r.close()
        bad = reg(server, cafile=ca, username="agent", password="nope")
        with pytest.raises(RegistryError) as exc:
            bad.get(f"{PREFIX}/config")
        assert exc.value.kind == "auth", str(exc.value)
        bad.close()
    finally:
        server.cleanup()


def test_agent_with_client_certs_works_and_wrong_ca_fails_clearly(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    try:
        p = make_pki(tmp_path / "pki", (lab.etcd_ip, "127.0.0.1"))
        lab.etcd = TlsEtcd(host=lab.etcd_ip, ns=lab.ul, pki=p).start()
        lab.etcd.put(f"{PREFIX}/config", '{"Network":"10.14.0.0/16","Backend":{"Type":"alloc"}}')
        good, bad = lab.add_host(), lab.add_host()
        lab.start_agent(good, "--etcd-cafile", str(p / "ca.crt"), "--etcd-certfile",
                        str(p / "client.crt"), "--etcd-keyfile", str(p / "client.key"))
        lab.start_agent(bad, "--etcd-cafile", str(p / "wrong-ca.crt"), "--etcd-certfile",
                        str(p / "client.crt"), "--etcd-keyfile", str(p / "client.key"))
        wait_for(good.subnet_file.exists, 30, what="subnet.env over TLS")
        subnet = read_env_file(good.subnet_file)["FLANNEL_SUBNET"]
        leases = lab.etcd.get_prefix(f"{PREFIX}/subnets/")
        assert [json.loads(v)["PublicIP"] for v in leases.values()] == [good.ip]
        assert subnet.startswith("10.14.")
        wait_for(lambda: "not signed by the CA in --etcd-cafile" in lab.log(bad), 20,
                 what="a clear wrong-CA message")
        assert not bad.subnet_file.exists()
        assert lab.stop_agent(good) == 0
    finally:
        lab.close()


def test_agent_keeps_running_when_the_serving_member_is_killed(lab: Lab) -> None:
    cluster = lab.start_cluster(3)
    cluster.ctl("put", f"{PREFIX}/config", '{"Network":"10.15.0.0/16","Backend":{"Type":"alloc"}}')
    h = lab.add_host()
    assert lab.etcd is not None
    lab.etcd = cluster.members[0]  # agent_cmd's --etcd-endpoints is overridden below
    lab.start_agent(h, "--etcd-endpoints", cluster.endpoints, "--subnet-lease-ttl", "6",
                    "--metrics-port", str(HTTP_PORT), "--healthz-ip", "127.0.0.1")
    wait_for(lambda: http_get(h, "/readyz")[0] == 200, 30, what="ready")
    before = metrics(h)
    renewals = one(before, "netagent_lease_renewals_total")
    # the agent talks to the first endpoint; kill that member outright
    cluster.members[0].kill()
    # if it was the leader, the two left elect a new one first: writes time out until then
    wait_for(lambda: cluster.ctl("put", f"{PREFIX}/subnets/10.15.99.0-24",
                                 '{"PublicIP":"192.0.2.9"}', check=False).returncode == 0, 20,
             interval=0.5, what="a write through the remaining members")

    def recovered() -> bool:
        m = metrics(h)
        return (one(m, "netagent_peers") == 1.0
                and one(m, "netagent_lease_renewals_total") >= renewals + 2)

    wait_for(recovered, 30, interval=0.5, what="watch and keepalives via the other members")
    m = metrics(h)
    assert one(m, "netagent_etcd_endpoint_failovers_total") >= 1
    assert one(m, "netagent_lease_expiry_seconds") > 0
    assert http_get(h, "/readyz")[0] == 200
    assert h.agent is not None and h.agent.poll() is None
    # our lease is still in the cluster, on a live etcd lease
    keys = cluster.ctl("get", "--prefix", f"{PREFIX}/subnets/", "--keys-only").stdout.split()
    assert len(keys) == 2
    assert lab.stop_agent(h) == 0
