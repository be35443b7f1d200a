"""A real runtime (podman 4.3.1, CNI backend, cni.md §11.2) runs a container on a netagent network.

podman runs inside the test host namespace, so the bridge and veths it makes through our plugin
live there; its config, storage and network dirs are in the test's temp dir.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support.cni import (
    cni_host,
    import_busybox,
    need_podman,
    plugin_fixture,
    podman_conflist,
    podman_env,
)
from support.harness import need_root

plugin_exe = plugin_fixture()
pytestmark = [pytest.mark.privileged, pytest.mark.slow]

def test_podman_container_gets_address_from_host_subnet(plugin_exe: str, tmp_path: Path) -> None:
    need_root()
    need_podman()
    env = podman_env(tmp_path, str(Path(plugin_exe).parent))
    with cni_host(tmp_path, "pm") as host:
        podman_conflist(tmp_path, host.name, host.conf())
        image = import_busybox(tmp_path, env)
        try:
            proc = subprocess.run(
                # nsenter, not `ip netns exec`: the latter remounts /sys and hides the cgroup
                # mounts runc needs; only the network namespace must be the test host's
                ["nsenter", f"--net=/run/netns/{host.ns}", "podman", "run", "--rm", "--network", host.name,
                 image, "/bin/sh", "-c", "ip -4 -o addr show eth0; ip route; "
                 f"ping -c1 -W2 {host.gateway} >/dev/null && echo GW-OK"],
                env=env, capture_output=True, text=True, timeout=180, check=False)
            assert proc.returncode == 0, proc.stderr
            words = proc.stdout.split()
            addr = words[words.index("inet") + 1]
            assert addr.startswith(f"{host.prefix}.") and addr.endswith("/24"), proc.stdout
            assert f"default via {host.gateway} dev eth0" in proc.stdout
            assert "GW-OK" in proc.stdout
            # podman --rm ran DEL: nothing left on the host
            assert host.reservations() == {}
            assert host.host_veths() == []
        finally:
            subprocess.run(["podman", "rmi", "-f", image], env=env, capture_output=True,
                           timeout=60, check=False)
