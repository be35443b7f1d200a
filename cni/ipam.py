"""Built-in host-local style IPAM, the pure half: which address an attachment gets.

host-local's split (its ``allocator`` over a ``store`` interface): :class:`Allocator` holds
the reservation logic (an attachment keeps its reservation, a requested address is checked
against the range, otherwise the range is walked round robin from the last address handed
out, the gateway and taken addresses skipped, all families or none) and asks its store for
five primitives only: list the reservations, create one if the address is free, remove one,
read and write the last reserved address of a range set. The disk store
(:class:`netagent.cni.ipamdisk.Store`) provides them with files and a lock; a test provides
them with a dict, so every rule here is unit-tested without a disk.
"""

from __future__ import annotations

from netagent.cni.errors import ADDRESS_UNAVAILABLE, INVALID_CONFIG, POOL_EXHAUSTED, CniError
from netagent.cni.fast import format_ip, ip_version, netmask_any, parse_ip_any

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator


class Pool:
    """One family's range: the subnet, its gateway (never handed out), an optional request."""

    __slots__ = ("version", "subnet", "plen", "gateway", "requested", "range_id")

    def __init__(self, version: int, subnet: int, plen: int, gateway: int, requested: str = "",
                 range_id: int = 0) -> None:
        self.version, self.subnet, self.plen, self.gateway = version, subnet, plen, gateway
        self.requested, self.range_id = requested, range_id

    def bounds(self) -> tuple[int, int]:
        """First and last address that may be handed out: the network address never, the
        IPv4 broadcast address never (host-local keeps the last IPv6 address)."""
        bits = 128 if self.version == 6 else 32
        mask = netmask_any(self.version, self.plen)
        net = self.subnet & mask
        last = net | (~mask & ((1 << bits) - 1))
        return net + 1, last - 1 if self.version == 4 else last

    def text(self) -> str:
        """The range as ``network/plen`` for error messages."""
        return f"{format_ip(self.version, self.subnet & netmask_any(self.version, self.plen))}" \
               f"/{self.plen}"

    def walk(self, last_reserved: int) -> Iterator[int]:
        """Every address of the range once, gateway skipped, starting after `last_reserved`
        when it lies in the range (host-local's round robin), else at the first. A /64 has
        2**64 candidates: walked, never materialised."""
        first, last = self.bounds()
        start = last_reserved + 1 if first <= last_reserved < last else first
        size = last - first + 1
        for step in range(size):
            cand = first + (start - first + step) % size
            if cand != self.gateway:
                yield cand


class Reservation:
    """One reserved address and the attachment (container, ifname) holding it."""

    __slots__ = ("ip", "container_id", "ifname")

    def __init__(self, ip: str, container_id: str, ifname: str) -> None:
        self.ip, self.container_id, self.ifname = ip, container_id, ifname

    @property
    def version(self) -> int:
        return ip_version(self.ip)

    def __repr__(self) -> str:
        return f"Reservation({self.ip}, {self.container_id!r}, {self.ifname!r})"


class Allocator:
    """The reservation rules of one network over a store's primitives (a subclass provides
    them; every call is made with the store's lock held, if it has one)."""

    # ------------------------------------------------------------------ store primitives

    def reservations(self) -> list[Reservation]:
        """Every reservation of the network."""
        raise NotImplementedError

    def create(self, ip: str, container_id: str, ifname: str) -> bool:
        """Record the reservation; False when the address is already held."""
        raise NotImplementedError

    def release_ip(self, ip: str) -> None:
        """Forget the reservation of `ip`, if there is one."""
        raise NotImplementedError

    def last_reserved(self, range_id: int) -> str:
        """The address last handed out in range set `range_id` ('' when none or unreadable)."""
        raise NotImplementedError

    def set_last_reserved(self, range_id: int, ip: str) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ reading

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

        One listing serves every family, so dual stack costs one extra reservation, not a
        second scan.
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
        version, gateway, requested = pool.version, pool.gateway, pool.requested
        want = -1
        if requested:
            try:
                req_version, want = parse_ip_any(requested)
            except ValueError:
                raise CniError(INVALID_CONFIG, f"requested IP {requested!r} is not an "
                               f"IPv{version} address") from None
            if req_version == version:
                requested = format_ip(version, want)  # canonical, as reservations are named
        for r in existing:
            if r.container_id == container_id and r.ifname == ifname and r.version == version:
                if requested and requested != r.ip:
                    raise CniError(ADDRESS_UNAVAILABLE,
                                   f"{container_id}/{ifname} already holds {r.ip}",
                                   f"requested {requested}")
                return r.ip, False
        first, last = pool.bounds()
        if requested:
            if ip_version(requested) != version or not first <= want <= last or want == gateway:
                raise CniError(ADDRESS_UNAVAILABLE,
                               f"requested IP {requested} is not usable in {pool.text()}")
            ip = format_ip(version, want)
            if not self.create(ip, container_id, ifname):
                raise CniError(ADDRESS_UNAVAILABLE, f"requested IP {requested} is already "
                               "reserved by another container")
            return ip, True
        last_ip = -1
        try:
            last_version, last_ip = parse_ip_any(self.last_reserved(pool.range_id))
            if last_version != version:
                last_ip = -1
        except ValueError:
            pass
        taken = {r.ip for r in existing}
        for cand in pool.walk(last_ip):
            ip = format_ip(version, cand)
            if ip in taken:
                continue
            if self.create(ip, container_id, ifname):
                self.set_last_reserved(pool.range_id, ip)
                return ip, True
        raise CniError(POOL_EXHAUSTED, f"no free address left in {pool.text()}")

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
