"""Built-in host-local style IPAM: one file per reserved address, guarded by one lock.

The on-disk layout is host-local's (``<dataDir>/<ip>`` holding ``<containerID>\\r\\n<ifname>``,
``last_reserved_ip.0``, ``lock``), so an operator's tooling and muscle memory carry over, and a
node switched from flannel keeps its reservations readable. Every mutation happens under an
exclusive lock (``lockf``) on ``<dataDir>/lock``: it is released by the kernel when a process dies, so a
killed plugin can never wedge the store, and it serialises any number of concurrent plugin
processes (the runtime runs ADDs for different containers in parallel).
"""

from __future__ import annotations

import os

from cni.errors import (
    ADDRESS_UNAVAILABLE,
    INVALID_CONFIG,
    IO_FAILURE,
    POOL_EXHAUSTED,
    CniError,
)
from cni.fast import in_subnet, int_to_ip, ip_to_int, netmask

LAST_RESERVED = "last_reserved_ip.0"
LOCK = "lock"
SEP = "\r\n"


class Reservation:
    __slots__ = ("ip", "container_id", "ifname")

    def __init__(self, ip: str, container_id: str, ifname: str) -> None:
        self.ip, self.container_id, self.ifname = ip, container_id, ifname

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
            try:
                ip_to_int(name)
            except ValueError:
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

    def find(self, container_id: str, ifname: str) -> Reservation | None:
        for r in self.reservations():
            if r.container_id == container_id and r.ifname == ifname:
                return r
        return None

    # ------------------------------------------------------------------ writing

    def _write(self, ip: str, container_id: str, ifname: str) -> bool:
        """Create the address file; False when it already exists (someone holds the address)."""
        try:
            fd = os.open(os.path.join(self.dir, ip), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, f"{container_id}{SEP}{ifname}".encode())
        finally:
            os.close(fd)
        return True

    def reserve(self, container_id: str, ifname: str, subnet: int, plen: int, gateway: int,
                requested: str = "") -> tuple[str, bool]:
        """Reserve an address for (container, ifname): (ip, created).

        An existing reservation of the same attachment is returned as is (created=False), so a
        repeated ADD never holds two addresses and its rollback never frees the first one.
        """
        mine = self.find(container_id, ifname)
        if mine is not None:
            if requested and requested != mine.ip:
                raise CniError(ADDRESS_UNAVAILABLE,
                               f"{container_id}/{ifname} already holds {mine.ip}",
                               f"requested {requested}")
            return mine.ip, False
        mask = netmask(plen)
        first = (subnet & mask) + 1
        last = (subnet & mask | (~mask & 0xFFFFFFFF)) - 1  # broadcast excluded
        if requested:
            try:
                want = ip_to_int(requested)
            except ValueError:
                raise CniError(INVALID_CONFIG, f"requested IP {requested!r} is not an IPv4 "
                               "address") from None
            if not in_subnet(want, subnet, plen) or not first <= want <= last or want == gateway:
                raise CniError(ADDRESS_UNAVAILABLE,
                               f"requested IP {requested} is not usable in {int_to_ip(subnet)}"
                               f"/{plen}")
            if not self._write(requested, container_id, ifname):
                raise CniError(ADDRESS_UNAVAILABLE, f"requested IP {requested} is already "
                               "reserved by another container")
            return requested, True
        start = first
        try:
            with open(os.path.join(self.dir, LAST_RESERVED), encoding="utf-8") as f:
                last_ip = ip_to_int(f.read().strip())
            if first <= last_ip < last:
                start = last_ip + 1
        except (OSError, ValueError):
            pass
        taken = {r.ip for r in self.reservations()}
        size = last - first + 1
        for step in range(size):
            cand = first + (start - first + step) % size
            if cand == gateway:
                continue
            ip = int_to_ip(cand)
            if ip in taken:
                continue
            if self._write(ip, container_id, ifname):
                self._write_last(ip)
                return ip, True
        raise CniError(POOL_EXHAUSTED, f"no free address left in {int_to_ip(subnet)}/{plen}")

    def _write_last(self, ip: str) -> None:
        tmp = os.path.join(self.dir, f".{LAST_RESERVED}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(ip)
        os.replace(tmp, os.path.join(self.dir, LAST_RESERVED))

    def release_ip(self, ip: str) -> None:
        try:
            os.unlink(os.path.join(self.dir, ip))
        except FileNotFoundError:
            pass

    def release(self, container_id: str, ifname: str) -> list[Reservation]:
        """Free every address of (container, ifname); idempotent."""
        gone = [r for r in self.reservations()
                if r.container_id == container_id and r.ifname == ifname]
        for r in gone:
            self.release_ip(r.ip)
        return gone

    def gc(self, valid: set[tuple[str, str]]) -> list[Reservation]:
        """Free every reservation whose (container, ifname) is not in ``valid``."""
        stale = [r for r in self.reservations() if (r.container_id, r.ifname) not in valid]
        for r in stale:
            self.release_ip(r.ip)
        return stale
