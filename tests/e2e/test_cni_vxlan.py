"""Two namespace hosts running the real netagent daemon (vxlan), pods wired by our CNI plugin.

The plugin reads each host's subnet.env written by its agent; a pod on host 1 reaches a pod on
host 2 across the vxlan overlay, and a podman container on host 1 (a real runtime) does too.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support.cni import (
    cni_path,
    import_busybox,
    need_podman,
    plugin_fixture,
    podman_conflist,
    podman_env,
    run_plugin,
)
from support.harness import Host, Lab, add_netns, del_netns, read_env_file, sh, wait_for

plugin_exe = plugin_fixture()
pytestmark = [pytest.mark.privileged, pytest.mark.slow]

PREFIX = "/coreos.com/network"


def _status_peers(host: Host) -> int:
    try:
        return int(json.loads((host.state_dir / "status.json").read_text()).get("peers", -1))
    except (OSError, ValueError):
        return -1


def _conf(host: Host, tmp: Path) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "navx", "type": "netagent",
            "subnetFile": str(host.subnet_file), "dataDir": str(tmp / host.name / "ipam"),
            "bridge": "cni0", "hairpinMode": True, "ipMasq": False, "subnetFileWait": 0}


def _start_two_hosts(lab: Lab) -> list[Host]:
    assert lab.etcd is not None
    lab.etcd.put(f"{PREFIX}/config", json.dumps(
        {"Network": "10.43.0.0/16", "Backend": {"Type": "vxlan"}}))
    hosts = [lab.add_host() for _ in range(2)]
    for h in hosts:
        lab.start_agent(h)
    for h in hosts:
        wait_for(lambda h=h: h.subnet_file.exists() or h.agent.poll() is not None,  # type: ignore[union-attr]
                 timeout=60, what=f"{h.name} subnet.env")
        assert h.subnet_file.exists(), lab.log(h)
        wait_for(lambda h=h: _status_peers(h) == 1, timeout=30, what=f"{h.name} sees its peer")
    return hosts


def test_pods_on_two_vxlan_hosts_reach_each_other(lab: Lab, plugin_exe: str,
                                                  tmp_path: Path) -> None:
    hosts = _start_two_hosts(lab)
    pods: list[str] = []
    ips: list[str] = []
    try:
        for h in hosts:
            pod = f"{h.name}-cp"
            add_netns(pod)
            pods.append(pod)
            res = run_plugin(plugin_exe, "ADD", _conf(h, tmp_path), host_ns=h.name, cid="vx1",
                             netns=f"/run/netns/{pod}", path=cni_path(plugin_exe)).ok()
            env = read_env_file(h.subnet_file)
            ip = res["ips"][0]["address"]
            assert ip.rsplit(".", 1)[0] == env["FLANNEL_SUBNET"].rsplit(".", 1)[0]
            assert f"mtu {env['FLANNEL_MTU']}" in sh("ip", "link", "show", "eth0", ns=pod).stdout
            ips.append(ip.split("/")[0])
        for src, dst in ((0, 1), (1, 0)):
            wait_for(lambda s=src, d=dst: sh("ping", "-c1", "-W1", ips[d], ns=pods[s],
                                             check=False).returncode == 0,
                     timeout=20, interval=0.2, what=f"pod {ips[src]} → {ips[dst]}")

        # a real runtime on host 1 reaches the pod on host 2
        need_podman()
        env = podman_env(tmp_path, str(Path(plugin_exe).parent))
        podman_conflist(tmp_path, "navxpm", _conf(hosts[0], tmp_path))
        image = import_busybox(tmp_path, env)
        try:
            proc = subprocess.run(
                ["nsenter", f"--net=/run/netns/{hosts[0].name}", "podman", "run", "--rm",
                 "--network", "navxpm", image, "/bin/sh", "-c",
                 f"for i in 1 2 3 4 5; do ping -c1 -W1 {ips[1]} >/dev/null && echo REACHED "
                 "&& break; done"],
                env=env, capture_output=True, text=True, timeout=180, check=False)
            assert proc.returncode == 0 and "REACHED" in proc.stdout, proc.stderr
        finally:
            subprocess.run(["podman", "rmi", "-f", image], env=env, capture_output=True,
                           timeout=60, check=False)

        for h, pod in zip(hosts, pods, strict=True):
            call = run_plugin(plugin_exe, "DEL", _conf(h, tmp_path), host_ns=h.name, cid="vx1",
                              netns=f"/run/netns/{pod}", path=cni_path(plugin_exe))
            assert call.rc == 0, call
            assert not any((tmp_path / h.name / "ipam").glob("10.*"))
    finally:
        for pod in pods:
            del_netns(pod)
