"""100 concurrent ADDs into 100 namespaces, as a busy node's runtime issues them (root)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from support.cni import cni_env, cni_host, cni_path, plugin_fixture
from support.harness import need_root

plugin_exe = plugin_fixture()
pytestmark = [pytest.mark.privileged, pytest.mark.slow]

N = 100


def _run_all(exe: str, host_ns: str, command: str, confs: list[str], envs: list[dict[str, str]],
             timeout: float = 120) -> list[tuple[int, str]]:
    """Start every call at once, then collect; bounded by one overall deadline."""
    procs = [subprocess.Popen(["ip", "netns", "exec", host_ns, exe], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for env in envs]
    for p, conf in zip(procs, confs, strict=True):
        assert p.stdin is not None
        p.stdin.write(conf)
        p.stdin.close()
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 1))  # outputs fit in a pipe buffer
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.stdout is not None and p.stderr is not None
        stdout, stderr = p.stdout.read(), p.stderr.read()
        p.stdout.close()
        p.stderr.close()
        out.append((p.returncode, stdout or stderr))
    return out


def test_100_concurrent_adds_then_dels(plugin_exe: str, tmp_path: Path) -> None:
    need_root()
    with cni_host(tmp_path, "s") as host:
        pods = [host.pod(i) for i in range(N)]
        conf = json.dumps(host.conf())
        path = cni_path(plugin_exe)
        envs = [cni_env("ADD", cid=f"scale{i}", netns=pods[i], path=path) for i in range(N)]
        results = _run_all(plugin_exe, host.ns, "ADD", [conf] * N, envs)
        failed = [(i, r) for i, r in enumerate(results) if r[0] != 0]
        assert not failed, failed[:3]
        addrs = [json.loads(r[1])["ips"][0]["address"] for r in results]
        assert len(set(addrs)) == N
        assert all(a.startswith(f"{host.prefix}.") for a in addrs)
        assert len(host.reservations()) == N and len(host.host_veths()) == N

        envs = [cni_env("DEL", cid=f"scale{i}", netns=pods[i], path=path) for i in range(N)]
        results = _run_all(plugin_exe, host.ns, "DEL", [conf] * N, envs)
        assert all(rc == 0 for rc, _ in results), [r for r in results if r[0]][:3]
        assert host.reservations() == {}
        assert host.host_veths() == []
