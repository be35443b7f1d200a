"""Reading and writing a WireGuard device: the UAPI socket (wireguard-go) or ``wg`` (kernel).

Both take the same :class:`~netagent.backends.wireguard.model.WgChange` and return the same
:class:`~netagent.backends.wireguard.model.WgState`, so the backend has one reconcile path for
both implementations. ``sets`` counts writes: a sync with nothing to change writes nothing,
and tests assert it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Protocol

from netagent.backends.wireguard.model import (
    UapiError,
    WgChange,
    WgState,
    parse_uapi_get,
    parse_wg_dump,
    uapi_set_text,
    wg_set_argv,
)

#: the longest answer we read (a get with 5,000 peers is ~1.5 MB)
MAX_ANSWER = 64 << 20
TIMEOUT = 10.0


class WgClient(Protocol):
    sets: int

    def get(self) -> WgState: ...
    def set(self, change: WgChange) -> None: ...


class UapiClient:
    """The cross-platform userspace API (``/var/run/wireguard/NAME.sock``)."""

    def __init__(self, path: Path, timeout: float = TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.sets = 0

    def _talk(self, request: str) -> str:
        deadline = time.monotonic() + self.timeout
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(str(self.path))
            s.sendall(request.encode())
            buf = bytearray()
            while not buf.endswith(b"\n\n"):
                if time.monotonic() > deadline:
                    raise UapiError(f"{self.path}: no complete answer within {self.timeout} s")
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_ANSWER:
                    raise UapiError(f"{self.path}: answer larger than {MAX_ANSWER} bytes")
        except OSError as exc:
            raise UapiError(f"{self.path}: {exc}") from None
        finally:
            s.close()
        text = buf.decode(errors="replace")
        if "errno=" not in text:
            raise UapiError(f"{self.path}: answer without errno: {text[-200:]!r}")
        return text

    def get(self) -> WgState:
        return parse_uapi_get(self._talk("get=1\n\n"))

    def set(self, change: WgChange) -> None:
        if change.empty:
            return
        self.sets += 1
        answer = self._talk(uapi_set_text(change)).strip()
        if answer != "errno=0":
            raise UapiError(f"set on {self.path} failed: {answer}")


class WgToolClient:
    """``wg show NAME dump`` / ``wg set NAME ...``: generic netlink to a kernel device (and UAPI
    to a wireguard-go one: ``wg`` speaks both, which is how this path is tested where there is
    no kernel module). Keys travel in files: the private key file, a 0600 PSK file."""

    def __init__(self, name: str, key_file: Path, psk: str, psk_file: Path,
                 timeout: float = TIMEOUT) -> None:
        self.name = name
        self.key_file = key_file
        self.psk = psk
        self.psk_file = psk_file
        self.timeout = timeout
        self.sets = 0

    def _run(self, argv: list[str]) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UapiError(f"{' '.join(argv[:3])}: {exc}") from None
        if proc.returncode != 0:
            raise UapiError(f"{' '.join(argv[:3])}: {proc.stderr.strip() or proc.returncode}")
        return proc.stdout

    def get(self) -> WgState:
        return parse_wg_dump(self._run(["wg", "show", self.name, "dump"]))

    def set(self, change: WgChange) -> None:
        if change.empty:
            return
        if self.psk:
            self._write_psk()
        self.sets += 1
        self._run(wg_set_argv(self.name, change, private_key_file=str(self.key_file),
                              psk_file=str(self.psk_file)))

    def _write_psk(self) -> None:
        tmp = self.psk_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.psk + "\n")
        tmp.replace(self.psk_file)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.psk_file.unlink()
