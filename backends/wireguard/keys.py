"""The private key file: where it is, taking it over from flannel, creating it.

flannel keeps its key in ``/run/flannel/wgkey`` (``WIREGUARD_KEY_FILE`` overrides), on tmpfs,
so its public key changes on every reboot and every peer then sees a new lease value. netagent
keeps the key in its state dir (``<state-dir>/wgkey``), which survives reboots. A host taken
over from flannel reads flannel's file first when it exists, so peers keep the key they know.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from netagent.backends.wireguard.model import generate_private_key, parse_key
from netagent.files import FileError, write_atomic

log = logging.getLogger(__name__)

#: flannel's key file (read first, to take a host over from flannel)
FLANNEL_KEY_FILE = Path("/run/flannel/wgkey")
KEY_FILE_ENV = "WIREGUARD_KEY_FILE"
STATE_KEY_NAME = "wgkey"


class KeyFileError(RuntimeError):
    """The key file exists but cannot be read or is not a key: never overwritten by us."""


@dataclass(frozen=True)
class KeySource:
    """The key, the file it is kept in, and how it was found (for the start-up log line)."""

    private_key: str
    path: Path
    how: str  # "read", "created", "taken over from /run/flannel/wgkey"


def _read_key(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeyFileError(f"cannot read WireGuard key file {path}: {exc}") from None
    try:
        return parse_key(text.strip())
    except ValueError as exc:
        raise KeyFileError(f"WireGuard key file {path} does not hold a key ({exc}); fix or "
                           "remove it (a new key is then generated)") from None


def _write_key(path: Path, key: str) -> None:
    try:
        write_atomic(path, key + "\n", mode=0o400)
    except FileError as exc:
        raise KeyFileError(f"cannot write WireGuard key file {path}: {exc}") from None


def load_private_key(state_dir: Path, env: Mapping[str, str] | None = None,
                     flannel_file: Path = FLANNEL_KEY_FILE) -> KeySource:
    """``WIREGUARD_KEY_FILE`` when set (read, or created there: flannel's behaviour); else
    flannel's ``/run/flannel/wgkey`` when it exists (copied into the state dir: a take-over),
    else ``<state-dir>/wgkey`` (read, or created). A file that exists but is not a key is an
    error: overwriting it would silently change the host's identity."""
    env = os.environ if env is None else env
    override = env.get(KEY_FILE_ENV, "")
    if override:
        path = Path(override)
        if path.exists():
            return KeySource(_read_key(path), path, "read")
        key = generate_private_key()
        _write_key(path, key)
        return KeySource(key, path, "created")
    path = state_dir / STATE_KEY_NAME
    if flannel_file.exists():
        key = _read_key(flannel_file)
        mine = _read_key(path) if path.exists() else ""
        if mine != key:
            if mine:
                log.warning("%s differs from flannel's %s: using flannel's (the key its lease "
                            "carries)", path, flannel_file)
            _write_key(path, key)
            return KeySource(key, path, f"taken over from {flannel_file}")
        return KeySource(key, path, "read")
    if path.exists():
        return KeySource(_read_key(path), path, "read")
    key = generate_private_key()
    _write_key(path, key)
    return KeySource(key, path, "created")
