"""Built-in host-local style IPAM, the disk half: one file per reserved address, one lock.

The on-disk layout is host-local's (``<dataDir>/<ip>`` holding ``<containerID>\\r\\n<ifname>``,
``last_reserved_ip.<range set>``, ``lock``), so an operator's tooling and muscle memory carry
over, and a node switched from flannel keeps its reservations readable. Dual stack is
host-local's two range sets: one reservation per (container, ifname) per family, IPv6 files
named by the canonical address text (``2001:cafe:42::2``), ``last_reserved_ip.0`` for the first
family of subnet.env and ``last_reserved_ip.1`` for the second. Every mutation happens under an
exclusive lock (``lockf``) on ``<dataDir>/lock``: it is released by the kernel when a process
dies, so a killed plugin can never wedge the store, and it serialises any number of concurrent
plugin processes (the runtime runs ADDs for different containers in parallel). Which address to
take is :class:`netagent.cni.ipam.Allocator`'s decision; this module only keeps the files.
"""

from __future__ import annotations

import errno
import os

from netagent.cni.errors import IO_FAILURE, CniError
from netagent.cni.fast import format_ip, ip6_to_int, ip_to_int, ip_version
from netagent.cni.ipam import Allocator, Reservation

LAST_RESERVED = "last_reserved_ip."  # + range set: ".0", ".1"
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


class Store(Allocator):
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

    def create(self, ip: str, container_id: str, ifname: str) -> bool:
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

    def release_ip(self, ip: str) -> None:
        try:
            os.unlink(os.path.join(self.dir, ip))
        except FileNotFoundError:
            pass

    def last_reserved(self, range_id: int) -> str:
        try:
            with open(os.path.join(self.dir, f"{LAST_RESERVED}{range_id}"), encoding="utf-8") as f:
                return f.read().strip()
        except (OSError, ValueError):  # unreadable or not text: start from the range's first
            return ""

    def set_last_reserved(self, range_id: int, ip: str) -> None:
        """Remember where the next search starts, atomically (temp file + rename: a reader
        never sees half an address). Only a hint (host-local's too): when it cannot be
        written the reservation stands, and no temporary file is left."""
        name = f"{LAST_RESERVED}{range_id}"
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
