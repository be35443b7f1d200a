"""Least privilege in etcd: the agent runs with a role that grants only the network prefix,
operators read with a read-only role, and everything outside the prefix stays out of reach.

The roles are the ones README.md ("Least privilege in etcd") tells operators to create.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.harness import REPO, Lab, read_env_file, wait_for
from test_tls_etcd import TlsEtcd, make_pki

pytestmark = pytest.mark.privileged

PREFIX = "/coreos.com/network"
CONFIG = '{"Network":"10.17.0.0/16","SubnetLen":24,"Backend":{"Type":"alloc"}}'


def grant_roles(etcd: TlsEtcd) -> None:
    """README's commands: an agent role (readwrite on the prefix), a viewer role (read only)."""
    for cmd in (["user", "add", "root:rootpw"],
                ["role", "add", "netagent"],
                ["role", "grant-permission", "netagent", "--prefix=true", "readwrite", f"{PREFIX}/"],
                ["role", "add", "netagent-viewer"],
                ["role", "grant-permission", "netagent-viewer", "--prefix=true", "read",
                 f"{PREFIX}/"],
                ["user", "add", "agent:agentpw"], ["user", "grant-role", "agent", "netagent"],
                ["user", "add", "viewer:viewerpw"],
                ["user", "grant-role", "viewer", "netagent-viewer"],
                ["put", "/secret/db-password", "hunter2"],
                ["auth", "enable"]):
        etcd.ctl(*cmd)
    etcd.user = "root:rootpw"


def netagent(lab: Lab, etcd: TlsEtcd, ca: Path, user: str, *args: str,
             stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    name, password = user.split(":")
    cmd = [sys.executable, "-m", "netagent", *args, "--etcd-endpoints", etcd.endpoint,
           "--etcd-cafile", str(ca), "--etcd-username", name, "--etcd-password", password]
    return subprocess.run(["ip", "netns", "exec", lab.ul, *cmd], capture_output=True, text=True,
                          timeout=60, input=stdin, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_agent_runs_on_the_prefix_alone_and_viewers_cannot_write(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    try:
        pki = make_pki(tmp_path / "pki", (lab.etcd_ip, "127.0.0.1"))
        etcd = TlsEtcd(host=lab.etcd_ip, ns=lab.ul, pki=pki, client_cert_auth=False).start()
        lab.etcd = etcd
        ca = pki / "ca.crt"
        grant_roles(etcd)
        etcd.put(f"{PREFIX}/config", CONFIG)

        # the agent, with the prefix-only role, leases, renews and becomes ready
        host = lab.add_host()
        lab.start_agent(host, "--etcd-cafile", str(ca), "--etcd-username", "agent",
                        "--etcd-password", "agentpw", "--subnet-lease-ttl", "6")
        wait_for(host.subnet_file.exists, 30, what="subnet.env with the prefix-only role")
        assert read_env_file(host.subnet_file)["FLANNEL_SUBNET"].startswith("10.17.")
        leases = etcd.get_prefix(f"{PREFIX}/subnets/")
        assert [json.loads(v)["PublicIP"] for v in leases.values()] == [host.ip]
        # keepalives work with the role: the key outlives its 6 s TTL
        time.sleep(8)
        assert etcd.get_prefix(f"{PREFIX}/subnets/") == leases, "lease expired under the role"
        assert host.agent is not None and host.agent.poll() is None
        assert "denied" not in lab.log(host), lab.log(host)[-2000:]

        # the agent's user sees nothing outside the prefix
        agent_ctl = ["etcdctl", "--endpoints", etcd.endpoint, "--dial-timeout", "3s",
                     "--cacert", str(ca), "--user", "agent:agentpw"]
        outside = subprocess.run(["ip", "netns", "exec", lab.ul, *agent_ctl, "get",
                                  "/secret/db-password"], capture_output=True, text=True,
                                 env=dict(os.environ, ETCDCTL_API="3"), timeout=20)
        assert outside.returncode != 0 and "permission denied" in outside.stderr.lower()
        assert "hunter2" not in outside.stdout

        # the viewer reads: leases and config get work ...
        got = netagent(lab, etcd, ca, "viewer:viewerpw", "config", "get")
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["Network"] == "10.17.0.0/16"
        listed = netagent(lab, etcd, ca, "viewer:viewerpw", "leases", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [row["public_ip"] for row in json.loads(listed.stdout)["leases"]] == [host.ip]
        # ... but cannot write the config: a clear message, and nothing changed
        new = CONFIG.replace("10.17.0.0/16", "10.18.0.0/16")
        refused = netagent(lab, etcd, ca, "viewer:viewerpw", "config", "set", "-", stdin=new)
        assert refused.returncode == 1
        assert "etcd user 'viewer' may not write" in refused.stderr, refused.stderr
        assert f"readwrite on {PREFIX}/" in refused.stderr, refused.stderr
        assert etcd.get(f"{PREFIX}/config") == CONFIG
        # and the viewer sees nothing outside the prefix either
        viewer_ctl = [*agent_ctl[:-1], "viewer:viewerpw"]
        outside = subprocess.run(["ip", "netns", "exec", lab.ul, *viewer_ctl, "get",
                                  "/secret/db-password"], capture_output=True, text=True,
                                 env=dict(os.environ, ETCDCTL_API="3"), timeout=20)
        assert outside.returncode != 0 and "hunter2" not in outside.stdout

        assert lab.stop_agent(host) == 0
    finally:
        lab.close()
