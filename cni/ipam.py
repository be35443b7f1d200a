"""Built-in host-local style IPAM: one file per reserved address, guarded by one lock.

The on-disk layout is host-local's (``<dataDir>/<ip>`` holding ``<containerID>\\r\\n<ifname>``,
``last_reserved_ip.<range set>``, ``lock``), so an operator's tooling and muscle memory carry
over, and a node switched from flannel keeps its reservations readable. Dual stack is
host-local's two range sets: one reservation per (container, ifname) per family, IPv6 files
named by the canonical address text (``2001:cafe:42::2``), ``last_reserved_ip.0`` for the first
family of subnet.env and ``last_reserved_ip.1`` for the second. Every mutation happens under an
exclusive lock (``lockf``) on ``<dataDir>/lock``: it is released by the kernel when a process dies, so a
killed plugin can never wedge the store, and it serialises any number of concurrent plugin
processes (the runtime runs ADDs for different containers in parallel).
"""

from __future__ import annotations

import errno
import os

from netagent.cni.errors import (
    ADDRESS_UNAVAILABLE,
    INVALID_CONFIG,
    IO_FAILURE,
    POOL_EXHAUSTED,
    CniError,
)
from netagent.cni.fast import format_ip, ip6_to_int, ip_to_int, ip_version, netmask_any, parse_ip_any

LAST_RESERVED = "last_reserved_ip.0"  # range set 0; range set N uses ".N"
LOCK = "lock"
SEP = "\r\n"


def _address_file_name(name: str) -> bool:
    """True for a file holding a reservation: an address in canonical text, nothing else."""
    try:
        if ip_version(name) == 6:
            return format_ip(6, ip6_to_int(name)) == name
        ip_to_int(name)
    except ValueError:
        return False
    return True


class Pool:
    """One family's range: the subnet, its gateway (never handed out), an optional request."""

    __slots__ = ("version", "subnet", "plen", "gateway", "requested", "range_id")

    def __init__(self, version: int, subnet: int, plen: int, gateway: int, requested: str = "",
                 range_id: int = 0) -> None:
        self.version, self.subnet, self.plen, self.gateway = version, subnet, plen, gateway
        self.requested, self.range_id = requested, range_id


class Reservation:
    __slots__ = ("ip", "container_id", "ifname")

    def __init__(self, ip: str, container_id: str, ifname: str) -> None:
        self.ip, self.container_id, self.ifname = ip, container_id, ifname

    @property
    def version(self) -> int:
        return ip_version(self.ip)

    def __repr__(self) -> str:
        return f"Reservation({self.ip}, {self.container_id!r}, {self.ifname!r})"


class Store:
    """Reservations of one network in ``data_dir``; use as a context manager to hold the lock."""

    def __init__(self, data_dir: str) -> None:
        self.dir = data_dir
        self._lock_fd = -1

    def __enter__(self) -> Store:
        try:
            os.makedirs(self.dir, mode=0o755, exist_ok=True)
            self._lock_fd = os.open(os.path.join(self.dir, LOCK),
                                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise CniError(IO_FAILURE, f"cannot open IPAM store {self.dir}: {e.strerror}") from None
        # Blocking: the plugin's own deadline (SIGALRM) bounds the wait. ``os.lockf`` (a POSIX
        # record lock, dropped by the kernel when the process dies) instead of ``fcntl.flock``
        # spares loading the ``fcntl`` shared library on every call.
        os.lockf(self._lock_fd, os.F_LOCK, 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing drops the lock
            self._lock_fd = -1

    # ------------------------------------------------------------------ reading

    def reservations(self) -> list[Reservation]:
        """Every address file in the directory (other files are ignored)."""
        out = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        for name in names:
            if not _address_file_name(name):
                continue
            try:
                # newline="": host-local separates with "\r\n", keep it intact
                with open(os.path.join(self.dir, name), encoding="utf-8", newline="") as f:
                    content = f.read()
            except OSError:
                continue
            cid, _, ifname = content.partition(SEP)
            out.append(Reservation(name, cid.strip(), ifname.strip()))
        return out

    def find(self, container_id: str, ifname: str, version: int | None = None
             ) -> Reservation | None:
        """The attachment's reservation (of ``version`` when given, else its first)."""
        for r in self.owned(container_id, ifname):
            if version is None or r.version == version:
                return r
        return None

    def owned(self, container_id: str, ifname: str) -> list[Reservation]:
        """Every reservation of (container, ifname): one per family once ADD has succeeded."""
        return [r for r in self.reservations()
                if r.container_id == container_id and r.ifname == ifname]

    # ------------------------------------------------------------------ writing

    def _write(self, ip: str, container_id: str, ifname: str) -> bool:
        """Create the address file; False when it already exists (someone holds the address)."""
        try:
            fd = os.open(os.path.join(self.dir, ip), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        data = f"{container_id}{SEP}{ifname}".encode()
        try:
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            finally:
                os.close(fd)
        except OSError as exc:
            # never leave a half-written reservation: an empty or cut file would hold the
            # address for nobody (and a full disk is exactly when writes come up short)
            self.release_ip(ip)
            raise CniError(IO_FAILURE, f"cannot write the IPAM reservation {ip} in {self.dir}: "
                           f"{exc.strerror or exc}", "nothing was reserved") from None
        return True

    def reserve(self, container_id: str, ifname: str, subnet: int, plen: int, gateway: int,
                requested: str = "", version: int = 4, range_id: int = 0) -> tuple[str, bool]:
        """Reserve one address of one family for (container, ifname): (ip, created).

        An existing reservation of the same attachment in this family is returned as is
        (created=False), so a repeated ADD never holds two addresses of a family and its
        rollback never frees the first one.
        """
        pool = Pool(version, subnet, plen, gateway, requested, range_id)
        return self._reserve(container_id, ifname, pool, self.reservations())

    def reserve_all(self, container_id: str, ifname: str, pools: list[Pool]
                    ) -> list[tuple[str, bool]]:
        """One address per pool (family), all or nothing: a failure frees what this call took.

        One directory listing serves every family, so dual stack costs one extra file write,
        not a second scan.
        """
        existing = self.reservations()
        out: list[tuple[str, bool]] = []
        try:
            for pool in pools:
                ip, created = self._reserve(container_id, ifname, pool, existing)
                out.append((ip, created))
                if created:
                    existing.append(Reservation(ip, container_id, ifname))
        except BaseException:
            for ip, created in out:
                if created:
                    self.release_ip(ip)
            raise
        return out

    def _reserve(self, container_id: str, ifname: str, pool: Pool,
                 existing: list[Reservation]) -> tuple[str, bool]:
        version, plen, gateway, requested = pool.version, pool.plen, pool.gateway, pool.requested
        want = -1
        if requested:
            try:
                req_version, want = parse_ip_any(requested)
            except ValueError:
                raise CniError(INVALID_CONFIG, f"requested IP {requested!r} is not an "
                               f"IPv{version} address") from None
            if req_version == version:
                requested = format_ip(version, want)  # canonical, as the file is named
        for r in existing:
            if r.container_id == container_id and r.ifname == ifname and r.version == version:
                if requested and requested != r.ip:
                    raise CniError(ADDRESS_UNAVAILABLE,
                                   f"{container_id}/{ifname} already holds {r.ip}",
                                   f"requested {requested}")
                return r.ip, False
        bits = 128 if version == 6 else 32
        mask = netmask_any(version, plen)
        net = pool.subnet & mask
        first = net + 1
        last = net | (~mask & ((1 << bits) - 1))
        if version == 4:
            last -= 1  # broadcast excluded (host-local keeps the last IPv6 address)
        subnet_text = f"{format_ip(version, net)}/{plen}"
        if requested:
            if ip_version(requested) != version or not first <= want <= last or want == gateway:
                raise CniError(ADDRESS_UNAVAILABLE,
                               f"requested IP {requested} is not usable in {subnet_text}")
            ip = format_ip(version, want)
            if not self._write(ip, container_id, ifname):
                raise CniError(ADDRESS_UNAVAILABLE, f"requested IP {requested} is already "
                               "reserved by another container")
            return ip, True
        last_file = f"last_reserved_ip.{pool.range_id}"
        start = first
        try:
            with open(os.path.join(self.dir, last_file), encoding="utf-8") as f:
                last_version, last_ip = parse_ip_any(f.read().strip())
            if last_version == version and first <= last_ip < last:
                start = last_ip + 1
        except (OSError, ValueError):
            pass
        taken = {r.ip for r in existing}
        size = last - first + 1
        step = 0
        while step < size:  # a /64 has 2**64 candidates: walk, never materialise
            cand = first + (start - first + step) % size
            step += 1
            if cand == gateway:
                continue
            ip = format_ip(version, cand)
            if ip in taken:
                continue
            if self._write(ip, container_id, ifname):
                self._write_last(ip, last_file)
                return ip, True
        raise CniError(POOL_EXHAUSTED, f"no free address left in {subnet_text}")

    def _write_last(self, ip: str, name: str = LAST_RESERVED) -> None:
        """Remember where the next search starts. Only a hint (host-local's too): when it
        cannot be written the reservation stands, and no temporary file is left."""
        tmp = os.path.join(self.dir, f".{name}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(ip)
            os.replace(tmp, os.path.join(self.dir, name))
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def release_ip(self, ip: str) -> None:
        try:
            os.unlink(os.path.join(self.dir, ip))
        except FileNotFoundError:
            pass

    def release(self, container_id: str, ifname: str) -> list[Reservation]:
        """Free every address of (container, ifname), both families; idempotent."""
        gone = self.owned(container_id, ifname)
        for r in gone:
            self.release_ip(r.ip)
        return gone

    def gc(self, valid: set[tuple[str, str]]) -> list[Reservation]:
        """Free every reservation whose (container, ifname) is not in ``valid``."""
        stale = [r for r in self.reservations() if (r.container_id, r.ifname) not in valid]
        for r in stale:
            self.release_ip(r.ip)
        return stale
