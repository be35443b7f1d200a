"""Running ``wireguard-go``: start, adopt after our own restart, notice death, stop by PID.

The process *is* the device's data path (its TUN device vanishes with it), so it runs in its
own session: a ``kill -9`` of the agent, or its restart, leaves it forwarding. Its PID is kept
in the state dir so the next agent run adopts it (and a teardown can stop exactly it, never a
process found by name).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: wireguard-go's socket directory (compiled in; tests give each host a private one by a mount)
SOCKET_DIR = Path("/var/run/wireguard")
START_TIMEOUT = 5.0


def socket_path(name: str, sock_dir: Path = SOCKET_DIR) -> Path:
    return sock_dir / f"{name}.sock"


def socket_alive(path: Path, timeout: float = 1.0) -> bool:
    """A live UAPI socket accepts a connection; a dead process leaves the file refusing one."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _pid_alive(pid: int, name: str) -> bool:
    """The PID is a live (not zombie) wireguard-go for ``name`` (PIDs get reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[0] if ")" in stat else "?"
    return state not in ("Z", "X") and any(b"wireguard-go" in c for c in cmd[:1]) \
        and name.encode() in cmd


class WireguardGo:
    """One wireguard-go process for device ``name``."""

    def __init__(self, name: str, state_dir: Path, *, binary: str = "wireguard-go",
                 sock_dir: Path = SOCKET_DIR) -> None:
        self.name = name
        self.binary = binary
        self.sock = socket_path(name, sock_dir)
        self.pid_file = state_dir / f"{name}.wireguard-go.pid"
        self.log_file = state_dir / f"{name}.wireguard-go.log"
        self.child: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.restarts = 0
        #: why the process was last found dead ("" while it runs)
        self.death = ""
        #: adopted by its answering socket alone (no PID recorded): liveness is the socket's
        self.by_socket = False

    @staticmethod
    def available(binary: str = "wireguard-go") -> bool:
        return shutil.which(binary) is not None

    def alive(self) -> bool:
        """Cheap and non-blocking (health() calls it from the ops threads)."""
        if self.child is not None:
            code = self.child.poll()
            if code is not None:
                self.death = f"wireguard-go (PID {self.child.pid}) exited with status {code}"
                self.child = None
                return False
            return True
        if self.by_socket:
            if socket_alive(self.sock, 0.2):
                return True
            self.death = f"wireguard-go (PID unknown) no longer answers on {self.sock}"
            self.by_socket = False
            return False
        if self.pid and not _pid_alive(self.pid, self.name):
            self.death = f"wireguard-go (PID {self.pid}) is gone"
            self.pid = 0
        return self.pid != 0

    def adopt(self) -> bool:
        """After our own restart: the recorded PID still serves the socket → keep it."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid and _pid_alive(pid, self.name) and socket_alive(self.sock):
            self.pid, self.by_socket, self.death = pid, False, ""
            return True
        if socket_alive(self.sock):
            # alive but not recorded (started by hand, or the state dir was wiped): usable; its
            # PID is unknown, so a teardown deletes the device instead of signalling it
            self.pid, self.by_socket, self.death = 0, True, ""
            log.warning("%s: adopting a wireguard-go whose PID is not recorded (%s answers)",
                        self.name, self.sock)
            return True
        return False

    def start(self) -> None:
        """Start ``wireguard-go -f NAME`` in its own session; wait for its UAPI socket."""
        self.sock.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()  # a dead process's socket; wireguard-go would refuse to start
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            self.child = subprocess.Popen(
                [self.binary, "-f", self.name], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
                env=dict(os.environ, LOG_LEVEL=os.environ.get("NETAGENT_WG_LOG_LEVEL", "error")),
            )
        self.pid = self.child.pid
        self.by_socket = False
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(f"{self.pid}\n")
        tmp.replace(self.pid_file)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if socket_alive(self.sock, 0.2):
                self.death = ""
                return
            if self.child.poll() is not None:
                break
            time.sleep(0.02)
        tail = ""
        with contextlib.suppress(OSError):
            tail = self.log_file.read_text(errors="replace")[-400:].strip()
        self.stop()
        raise RuntimeError(f"wireguard-go {self.name} did not come up within {START_TIMEOUT} s"
                           + (f": {tail}" if tail else ""))

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to exactly our recorded PID."""
        pid = self.child.pid if self.child is not None else self.pid
        if pid and (self.child is not None or _pid_alive(pid, self.name)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                if self.child is not None:
                    if self.child.poll() is not None:
                        break
                elif not _pid_alive(pid, self.name):
                    break
                time.sleep(0.02)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if self.child is not None:
                    self.child.wait(3)
        self.child = None
        self.pid = 0
        self.by_socket = False
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
