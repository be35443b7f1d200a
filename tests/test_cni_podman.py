"""A real runtime (podman 4.3.1, CNI backend, cni.md §11.2) runs a container on a netagent network.

podman runs inside the test host namespace, so the bridge and veths it makes through our plugin
live there; its config, storage and network dirs are in the test's temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cni_helpers import REF_PLUGINS, cni_host, plugin_fixture
from harness import RUN_ID, need, need_root

plugin_exe = plugin_fixture()
pytestmark = [pytest.mark.privileged, pytest.mark.slow]

BUSYBOX_APPLETS = ["sh", "ip", "cat", "ls", "sleep", "ping", "echo"]


def _podman_env(tmp: Path, plugin_dir: str) -> dict[str, str]:
    lab = tmp / "podman"
    (lab / "net.d").mkdir(parents=True)
    (lab / "containers.conf").write_text(f"""
[containers]
netns = "private"
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[network]
network_backend = "cni"
cni_plugin_dirs = ["{plugin_dir}", "{REF_PLUGINS}"]
network_config_dir = "{lab / 'net.d'}"
default_network = "podman"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{lab / 'events.log'}"
runtime = "runc"
""")
    (lab / "storage.conf").write_text(f"""
[storage]
driver = "vfs"
graphroot = "{lab / 'storage'}"
runroot = "{lab / 'runroot'}"
""")
    return dict(os.environ, CONTAINERS_CONF=str(lab / "containers.conf"),
                CONTAINERS_STORAGE_CONF=str(lab / "storage.conf"))


def _import_busybox(tmp: Path, env: dict[str, str]) -> str:
    rootfs = tmp / "rootfs"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp"):
        (rootfs / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    tar = tmp / "bbox.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    image = f"localhost/nabbox{RUN_ID}:latest"
    subprocess.run(["podman", "import", str(tar), image], env=env, check=True,
                   capture_output=True, timeout=120)
    return image


def test_podman_container_gets_address_from_host_subnet(plugin_exe: str, tmp_path: Path) -> None:
    need_root()
    need(shutil.which("podman") is not None and shutil.which("runc") is not None,
         "needs podman and runc (apt-get install podman runc uidmap fuse-overlayfs busybox-static)")
    need(Path("/bin/busybox").exists(), "needs busybox-static")
    env = _podman_env(tmp_path, str(Path(plugin_exe).parent))
    with cni_host(tmp_path, "pm") as host:
        conflist = {
            "cniVersion": "1.0.0", "name": host.name,
            "plugins": [host.conf(),
                        {"type": "portmap", "capabilities": {"portMappings": True}}],
        }
        for p in conflist["plugins"]:  # type: ignore[attr-defined]
            p.pop("cniVersion", None)
            p.pop("name", None)
        net_d = tmp_path / "podman" / "net.d"
        (net_d / f"{host.name}.conflist").write_text(json.dumps(conflist))
        image = _import_busybox(tmp_path, env)
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
