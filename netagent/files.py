"""Files netagent writes: subnet.env and docker_opts.env (all file I/O lives here).

Writes are atomic (temp file in the same directory, fsync, rename), so a reader never sees a
half-written file and a failed write leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path


class FileError(OSError):
    """A file could not be written; the message says which and why."""


@dataclass(frozen=True)
class SubnetEnv:
    network: IPv4Network | None
    subnet: IPv4Network | None
    mtu: int
    ipmasq: bool
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Network | None = None


def render_subnet_env(env: SubnetEnv) -> str:
    """flannel's exact variable names and order; FLANNEL_SUBNET is network+1 with the prefix."""
    lines = []
    if env.network is not None and env.subnet is not None:
        lines.append(f"FLANNEL_NETWORK={env.network}")
        gw = IPv4Interface((int(env.subnet.network_address) + 1, env.subnet.prefixlen))
        lines.append(f"FLANNEL_SUBNET={gw}")
    if env.ipv6_network is not None and env.ipv6_subnet is not None:
        lines.append(f"FLANNEL_IPV6_NETWORK={env.ipv6_network}")
        gw6 = IPv6Interface((int(env.ipv6_subnet.network_address) + 1, env.ipv6_subnet.prefixlen))
        lines.append(f"FLANNEL_IPV6_SUBNET={gw6}")
    lines.append(f"FLANNEL_MTU={env.mtu}")
    lines.append(f"FLANNEL_IPMASQ={'true' if env.ipmasq else 'false'}")
    return "\n".join(lines) + "\n"


def parse_env_text(text: str) -> dict[str, str]:
    """NAME=value lines (shell-style quotes stripped); comments and blanks ignored."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def read_env_file(path: str | Path) -> dict[str, str]:
    return parse_env_text(Path(path).read_text())


def previous_subnets(path: str | Path) -> tuple[IPv4Network | None, IPv6Network | None]:
    """The subnets recorded in an existing subnet.env (for lease reuse); None when unusable.

    Like flanneld, a value with more than one comma-separated entry is not reused.
    """
    try:
        env = read_env_file(path)
    except (OSError, UnicodeDecodeError):
        return None, None

    def one(name: str, cls: type[IPv4Interface] | type[IPv6Interface]) -> object:
        raw = env.get(name, "")
        if not raw or "," in raw:
            return None
        try:
            return cls(raw).network
        except ValueError:
            return None

    return one("FLANNEL_SUBNET", IPv4Interface), one("FLANNEL_IPV6_SUBNET", IPv6Interface)  # type: ignore[return-value]


def write_atomic(path: str | Path, content: str, mode: int = 0o644, durable: bool = True) -> None:
    """Write `content` to `path` via temp file + fsync + rename; FileError says what failed.

    `durable=False` skips the fsync, for advisory files rewritten often (status.json): the
    rename still guarantees a reader sees the old or the new file, never a torn one.
    """
    target = Path(path)
    try:
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise FileError(exc.errno, f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(content)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FileError(exc.errno, f"cannot write {target}: {exc.strerror or exc}") from exc


def write_subnet_env(path: str | Path, env: SubnetEnv) -> None:
    write_atomic(path, render_subnet_env(env))


# --------------------------------------------------------------------------- run lock

#: in the state dir: the running agent's PID, under an exclusive flock held for its lifetime
RUN_LOCK = "netagent.pid"


def take_run_lock(state_dir: str | Path) -> int | None:
    """Take the agent's run lock: an open fd (keep it open while running; the kernel drops
    the lock when the process dies, even by SIGKILL, so a stale file never blocks), or None
    when another process holds it. A flock rather than a bare PID file: a PID can be reused,
    a lock cannot outlive its holder. FileError when the state dir cannot hold the file."""
    path = Path(state_dir) / RUN_LOCK
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise FileError(exc.errno, f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def run_lock_holder(state_dir: str | Path) -> int | None:
    """The PID of the agent running on ``state_dir`` (0 when its PID is unreadable), or None
    when none runs. Only probes the lock: it is released again at once."""
    path = Path(state_dir) / RUN_LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return int(os.pread(fd, 32, 0).split()[0])
            except (ValueError, IndexError):
                return 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- docker opts


class DockerOptsError(ValueError):
    pass


def render_docker_opts(
    env: Mapping[str, str],
    *,
    individual: bool = False,
    combined: bool = False,
    combined_key: str = "DOCKER_OPTS",
    omit_ipmasq: bool = False,
    existing_combined: str = "",
) -> str:
    """mk-docker-opts.sh's output for a subnet.env.

    Neither -i nor -c means both. The combined value is any existing value of the key plus a
    space, then every DOCKER_OPT_* value in alphabetical order, each preceded by a space (so it
    starts with one). An empty FLANNEL_IPMASQ gives no ip-masq option; any value other than
    true/false is an error, as in the script.
    """
    if not individual and not combined:
        individual = combined = True
    opts: dict[str, str] = {}
    if env.get("FLANNEL_SUBNET"):
        opts["DOCKER_OPT_BIP"] = f"--bip={env['FLANNEL_SUBNET']}"
    masq = env.get("FLANNEL_IPMASQ", "")
    if masq and not omit_ipmasq:
        if masq == "true":
            opts["DOCKER_OPT_IPMASQ"] = "--ip-masq=false"
        elif masq == "false":
            opts["DOCKER_OPT_IPMASQ"] = "--ip-masq=true"
        else:
            raise DockerOptsError(f"Invalid value of FLANNEL_IPMASQ: {masq}")
    if env.get("FLANNEL_MTU"):
        opts["DOCKER_OPT_MTU"] = f"--mtu={env['FLANNEL_MTU']}"
    lines = []
    if individual:
        lines += [f'{k}="{v}"' for k, v in sorted(opts.items())]
    if combined:
        prefix = f"{existing_combined} " if existing_combined else ""
        value = prefix + "".join(f" {opts[k]}" for k in sorted(opts))
        lines.append(f'{combined_key}="{value}"')
    return "\n".join(lines) + "\n"


def write_docker_opts(path: str | Path, content: str) -> None:
    write_atomic(path, content)


def read_lease_ids(path: str | Path) -> set[int]:
    """The etcd lease IDs in `path` (one hex ID a line, `#` comments); a missing file is empty.

    Bad lines are skipped (a torn file cannot happen: it is written with `write_atomic`)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise FileError(exc.errno, f"cannot read {path}: {exc.strerror or exc}") from exc
    ids: set[int] = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        try:
            lease_id = int(line, 16) if line else 0
        except ValueError:
            continue
        if 0 < lease_id < 1 << 63:
            ids.add(lease_id)
    return ids


def write_lease_ids(path: str | Path, lease_ids: set[int]) -> None:
    """Record the etcd leases this host granted and has not revoked (durably: it must survive
    a crash between a grant and its transaction)."""
    lines = ["# etcd leases granted by this host and not yet revoked (netagent; do not edit)"]
    lines += [f"{lid:016x}" for lid in sorted(lease_ids)]
    write_atomic(path, "\n".join(lines) + "\n", mode=0o600)
