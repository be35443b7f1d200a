"""Namespace hosts for the wireguard backend: a private /run/wireguard per host.

wireguard-go's UAPI socket lives in the file system (``/var/run/wireguard/NAME.sock``), not in
the network namespace, so namespace "hosts" on one machine would share it. :class:`WgLab`
starts each agent in a private mount namespace with a per-host directory bound on
``/run/wireguard`` (the same directory again after a restart, so a restarted agent finds its
wireguard-go); the test talks to each device through that directory's socket. The production
path is unchanged. Used by tests/e2e/test_wireguard.py and bench/wireguard.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from netagent.backends.wireguard.client import UapiClient
from support.harness import REPO, Host, Lab

DEV = "flannel-wg"
#: the mount point every host's private socket directory is bound on (wireguard-go's own)
WG_RUN = Path("/run/wireguard")


class WgLab(Lab):
    """A Lab whose agents each see a private /run/wireguard (see the module docstring)."""

    def wg_dir(self, host: Host) -> Path:
        d = self.tmp / host.name / "wgrun"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def start_agent(self, host: Host, *extra: str,
                    env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        WG_RUN.mkdir(mode=0o755, exist_ok=True)  # the mount point (wireguard-go makes it too)
        host.log_path = self.tmp / f"{host.name}.log"
        log = open(host.log_path, "ab")  # noqa: SIM115 - closed with the process
        script = 'mount --bind "$0" /run/wireguard && exec "$@"'
        full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
        host.agent = subprocess.Popen(
            ["ip", "netns", "exec", host.name, "unshare", "-m", "--propagation", "private",
             "sh", "-c", script, str(self.wg_dir(host)), *self.agent_cmd(host, *extra)],
            stdout=log, stderr=subprocess.STDOUT, env=full_env)
        return host.agent

    def device(self, host: Host, name: str = DEV) -> UapiClient:
        return UapiClient(self.wg_dir(host) / f"{name}.sock")

    def wg_pids(self) -> list[int]:
        pids = []
        for h in self.hosts:
            for f in h.state_dir.glob("*.wireguard-go.pid"):
                with contextlib.suppress(OSError, ValueError):
                    pids.append(int(f.read_text()))
        return pids

    def close(self) -> None:
        pids = self.wg_pids()
        super().close()
        for pid in pids:  # ours only: the PIDs our agents recorded, checked to be wireguard-go
            with contextlib.suppress(OSError):
                if b"wireguard-go" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
