"""A real dockerd per namespace host (Debian's docker.io, its containerd and runc), for
tests/e2e/test_docker.py and `make demo`.

Each dockerd runs in its host's network namespace and a private mount namespace of its own:
``nsenter --net`` (not ``ip netns exec``, which remounts /sys and so hides the cgroup
hierarchies dockerd needs: "Devices cgroup isn't mounted"), then a fresh sysfs (so
/sys/class/net shows the host's own devices) with the cgroup mounts moved back on top, and a
tmpfs on /run (two daemons sharing one /run break each other: containerd's state and shim
sockets live there) and one on /etc/docker (the machine's daemon.json is not read and its
key.json not written; the daemon's config file is an empty one of ours). The API socket and
data root are in a directory of the caller's; the
image is busybox-static imported locally (no registry is needed). Everything is named for the
run and stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from netagent.files import read_env_file
from support.harness import REPO, RUN_ID, Host, sh, wait_for

IMAGE = f"na{RUN_ID}-busybox:latest"

# run inside the new mount namespace: $1 a scratch dir, the rest the dockerd command line
MOUNTS = (
    'cg="$1/cgroup"; shift; mkdir -p "$cg"; '
    'mount --rbind /sys/fs/cgroup "$cg"; mount -t sysfs sysfs /sys; '
    'mount --move "$cg" /sys/fs/cgroup; mount -t tmpfs tmpfs /run; '
    'if [ -d /etc/docker ]; then mount -t tmpfs tmpfs /etc/docker; fi; exec "$@"'
)


def docker_unavailable() -> str | None:
    """Why Docker cannot run here (None when it can, as far as can be told without starting
    it): root, the daemon and client, and a static busybox for the image."""
    if os.geteuid() != 0:
        return "Docker needs root"
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        return "Docker is not installed (apt-get install docker.io)"
    if shutil.which("nsenter") is None or shutil.which("unshare") is None:
        return "nsenter/unshare are missing (apt-get install util-linux)"
    if not Path("/bin/busybox").exists() or sh("ldd", "/bin/busybox", check=False).returncode == 0:
        return "the container image needs a static busybox (apt-get install busybox-static)"
    return None


@dataclass
class Dockerd:
    """One dockerd for one namespace host, started by PID with the host's docker_opts."""

    host: Host
    root: Path
    opts: list[str]
    docker: str = field(default_factory=lambda: shutil.which("docker") or "docker")
    proc: subprocess.Popen[bytes] | None = None
    containers: list[str] = field(default_factory=list)

    @property
    def sock(self) -> Path:
        return self.root / "docker.sock"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "daemon.json").write_text("{}\n")
        cmd = ["nsenter", f"--net=/run/netns/{self.host.name}",
               "unshare", "--mount", "--propagation", "private",
               "sh", "-ec", MOUNTS, "sh", str(self.root),
               "dockerd", "--data-root", str(self.root / "data"), "--exec-root", "/run/docker",
               "--pidfile", "/run/docker.pid", "-H", f"unix://{self.sock}",
               "--config-file", str(self.root / "daemon.json"),
               "--storage-driver", "overlay2", *self.opts]
        log = open(self.root / "dockerd.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 40) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd on {self.host.name} exited: "
                                   f"{self.log()[-3000:]}")
            return self.cli("version", check=False).returncode == 0

        wait_for(up, timeout=timeout, interval=0.2, what=f"dockerd on {self.host.name}")

    def log(self) -> str:
        return (self.root / "dockerd.log").read_text(errors="replace")

    def cli(self, *args: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return sh(self.docker, "-H", f"unix://{self.sock}", *args, check=check, timeout=timeout)

    def import_image(self, tar: Path) -> None:
        self.cli("import", str(tar), IMAGE)

    def run_container(self, name: str) -> str:
        """A busybox container idling under docker-init (so it stops at once on SIGTERM)."""
        self.cli("run", "-d", "--init", "--name", name, IMAGE, "sleep", "3600")
        self.containers.append(name)
        return name

    def inspect(self, name: str, fmt: str) -> str:
        return self.cli("inspect", "-f", fmt, name).stdout.strip()

    def stop(self) -> None:
        """Containers first (by name), then the daemon by PID; a daemon that will not stop is
        killed, and so is any container process it left behind."""
        if self.proc is None:
            return
        pids = []
        if self.proc.poll() is None:
            for name in self.containers:
                proc = self.cli("inspect", "-f", "{{.State.Pid}}", name, check=False)
                if proc.returncode == 0 and proc.stdout.strip() not in ("", "0"):
                    pids.append(int(proc.stdout.strip()))
            if self.containers:
                self.cli("rm", "-f", *self.containers, check=False)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc = None
        # image layers: the overlay mounts went with the daemon's mount namespace
        shutil.rmtree(self.root / "data", ignore_errors=True)

    def restart(self) -> None:
        """Stop the daemon only (containers stop with it, as with `systemctl restart docker`)
        and start it again with the same options."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.start()
        self.wait_ready()


def busybox_tar(tmp: Path) -> Path:
    """A one-binary root file system: busybox-static and a link per applet."""
    rootfs = tmp / "busybox-rootfs"
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in sh("/bin/busybox", "--list").stdout.split():
        link = rootfs / "bin" / applet
        if applet != "busybox" and not link.is_symlink():
            link.symlink_to("busybox")
    tar = tmp / "busybox.tar"
    sh("tar", "-C", str(rootfs), "-cf", str(tar), ".")
    return tar


def docker_opts(host: Host) -> tuple[list[str], str]:
    """`netagent docker-opts` on the host, as netagent.service's ExecStartPost runs it: the
    dockerd arguments from DOCKER_OPTS, and what the command printed on stderr."""
    out = host.subnet_file.parent / "docker_opts.env"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = sh("ip", "netns", "exec", host.name, sys.executable, "-m", "netagent", "docker-opts",
              "-f", str(host.subnet_file), "-d", str(out), env=env)
    return shlex.split(read_env_file(out)["DOCKER_OPTS"]), proc.stderr
