"""Running BIRD for the bgp backend: start it as a child, or adopt one that already runs.

BIRD is started in its own session (``start_new_session``) with its output in a file, so it
outlives the agent: an agent that is SIGKILLed or restarted leaves BIRD, its sessions and its
kernel routes untouched, and the next agent finds it on the same control socket (derived from
the state dir) and *adopts* it with ``birdc configure`` — no session drops, no route is
withdrawn. Only a switch away from bgp (``teardown``) stops it.

A BIRD the agent did not start (``Backend.BIRDSocket``) is never started or stopped here; the
agent only writes its file and asks that BIRD to load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from netagent.backends.bgp.birdc import BirdError, birdc, configure
from netagent.files import FileError, write_atomic

log = logging.getLogger("netagent.bgp")

#: sun_path is 108 bytes including the NUL
_MAX_SOCKET = 107


def default_socket(state_dir: Path) -> str:
    """``<state-dir>/bird.ctl``, or, when that path is too long for a unix socket, a name
    under /run/netagent derived from the state dir (the same on every restart)."""
    path = str(state_dir.absolute() / "bird.ctl")
    if len(path.encode()) <= _MAX_SOCKET:
        return path
    digest = hashlib.sha1(str(state_dir.absolute()).encode()).hexdigest()[:16]
    return f"/run/netagent/bird-{digest}.ctl"


def check_file(path: Path, timeout: float = 10.0) -> None:
    """``bird -p -c FILE``: parse only. BirdError carries BIRD's message (file:line:col)."""
    try:
        proc = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise BirdError("bird is not installed (apt-get install bird2)") from None
    except subprocess.TimeoutExpired:
        raise BirdError(f"bird -p -c {path}: no answer in {timeout:g} s") from None
    if proc.returncode != 0:
        raise BirdError((proc.stderr or proc.stdout).strip() or f"bird -p exit {proc.returncode}")


class BirdSupervisor:
    """The files and the process of one BIRD (ours, or an external one on `socket`)."""

    def __init__(self, state_dir: Path, socket: str = "") -> None:
        self.dir = state_dir
        self.external = bool(socket)
        self.socket = socket or default_socket(state_dir)
        self.conf = state_dir / "bird.conf"
        self.candidate = state_dir / "bird.conf.candidate"
        self.pidfile = state_dir / "bird.pid"
        self.logfile = state_dir / "bird.log"
        self._child: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ files

    def write_checked(self, text: str) -> None:
        """Write `text` as a candidate, check it with ``bird -p``, and only then make it
        bird.conf. A file BIRD refuses leaves bird.conf (the one in force) as it was."""
        try:
            write_atomic(self.candidate, text, mode=0o600)
            check_file(self.candidate)
            write_atomic(self.conf, text, mode=0o600)  # passwords: not world-readable
        except FileError as exc:
            raise BirdError(str(exc)) from None

    # ------------------------------------------------------------------ process

    def answering(self) -> bool:
        try:
            birdc(self.socket, "show", "status", timeout=2.0)
            return True
        except BirdError:
            return False

    def pid(self) -> int | None:
        """The pid of *our* BIRD: the child, or the pidfile's process when its command line
        names our config file (a reused pid of someone else's process is never ours)."""
        if self._child is not None and self._child.poll() is None:
            return self._child.pid
        try:
            pid = int(self.pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        if Path(cmdline[0].decode(errors="replace")).name == "bird" and \
                str(self.conf).encode() in cmdline:
            return pid
        return None

    def reap(self) -> None:
        """Collect a child BIRD that exited (no zombie), logging how it ended."""
        if self._child is not None and self._child.poll() is not None:
            log.error("BIRD (pid %d) exited with %s; see %s", self._child.pid,
                      self._child.returncode, self.logfile)
            self._child = None

    def start(self, recovery: bool, wait: float = 10.0) -> None:
        """Start BIRD on bird.conf and wait until its control socket answers. `recovery`
        (``-R``): a BIRD that died left routes in the kernel; keep them until the sessions
        are back (graceful restart) instead of flushing them at start."""
        if self.external:
            raise BirdError(f"no BIRD answers on {self.socket} (Backend.BIRDSocket: netagent "
                            "does not start that one)")
        if shutil.which("bird") is None:
            raise BirdError("bird is not installed (apt-get install bird2)")
        Path(self.socket).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)  # a dead BIRD's socket (nothing answered on it)
        cmd = ["bird", "-c", str(self.conf), "-s", self.socket, "-P", str(self.pidfile), "-f"]
        if recovery:
            cmd.append("-R")
        with open(self.logfile, "ab") as out:
            self._child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self._child.poll() is not None:
                rc, self._child = self._child.returncode, None
                raise BirdError(f"bird exited at start ({rc}): {self.log_tail()}")
            if self.answering():
                log.info("started BIRD (pid %d%s), control socket %s", self._child.pid,
                         ", graceful-restart recovery" if recovery else "", self.socket)
                return
            time.sleep(0.1)
        raise BirdError(f"bird started but its control socket {self.socket} did not answer in "
                        f"{wait:g} s")

    def reload(self) -> str:
        return configure(self.socket, str(self.conf))

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop our BIRD (SIGTERM: a clean BGP shutdown, peers withdraw our subnet at once;
        BIRD removes its kernel routes). Never an external BIRD. True when one was stopped."""
        if self.external:
            return False
        pid = self.pid()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._alive(pid):
            time.sleep(0.05)
        if self._alive(pid):
            log.warning("BIRD (pid %d) did not stop in %g s; killing it", pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._child.wait(5)
            self._child = None
        return True

    def _alive(self, pid: int) -> bool:
        if self._child is not None and self._child.pid == pid:
            return self._child.poll() is None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # an adopted BIRD is not our child: it is gone once it is a zombie of someone else
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except (OSError, IndexError):
            return False

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.logfile.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"
