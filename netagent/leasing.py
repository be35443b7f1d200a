"""Acquire, keep and recover our subnet lease in etcd.

Differences from flannel (flannel-compat.md §5, §6): renewal is an etcd KeepAlive on the lease
attached to the key (no orphan leases, no cluster-wide PUT every 23 h); a reused key whose value
did not change is not written at all (a restart causes no watch event on peers); losing our key
re-creates the *same* subnet instead of exiting (flannel #904).
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from netagent.config import NetworkConfig
from netagent.files import FileError, read_lease_ids, write_lease_ids
from netagent.lease import (
    NO_PUBLIC_IP,
    Lease,
    LeaseAttrs,
    LeaseError,
    OutOfSubnets,
    decode_lease,
    encode_attrs,
    plan_lease,
    subnet_key,
    subnets_label,
)
from netagent.store import KeyValue, RegistryError, Store

log = logging.getLogger("netagent.lease")

MAX_ATTEMPTS = 10


class LeaseLost(RuntimeError):
    """Our subnet is now held by another host; we had to take a different one."""


@dataclass
class LeaseState:
    lease: Lease
    ttl: int
    renewals: int = 0
    renew_failures: int = 0
    reacquired: int = 0
    #: monotonic time of the last successful keepalive (or acquisition)
    last_renew: float = 0.0


class LeaseManager:
    def __init__(
        self,
        registry: Store,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        *,
        ttl: int,
        previous_subnet: IPv4Network | None = None,
        rng: random.Random | None = None,
        previous_subnet6: IPv6Network | None = None,
        lease_file: Path | None = None,
    ) -> None:
        self.registry = registry
        self.config = config
        self.attrs = attrs
        self.ttl = ttl
        self.previous_subnet = previous_subnet
        self.previous_subnet6 = previous_subnet6
        self.rng = rng or random.Random()
        self.state: LeaseState | None = None
        #: every etcd lease this host granted and has not seen revoked, the held one included;
        #: written to `lease_file` *before* each transaction that may attach a key to a new one,
        #: so a lease whose transaction failed, lost its answer or was cut by kill -9 is
        #: revoked once etcd answers (or by the next process): no orphan lease (issue 19 item 8)
        self.lease_file = lease_file
        self.granted: set[int] = set()
        #: leases found unused after we held ours but not yet revoked (etcd did not answer);
        #: the keepalive thread retries only these, never a lease a create is still using
        self.unused: set[int] = set()
        self._ids = threading.Lock()
        if lease_file is not None:
            try:
                self.granted = read_lease_ids(lease_file)
            except FileError as exc:
                log.warning("%s; etcd leases a crashed run granted may stay until their TTL", exc)
            if self.granted:
                log.info("etcd leases from an earlier run: %s (the unused ones are revoked once "
                         "we hold our lease)", ", ".join(f"{lid:016x}" for lid in sorted(self.granted)))
        #: key names (under subnets/) the last :meth:`acquire` deleted: a caller that lists
        #: before acquiring drops them from its listing (their delete events follow in the watch)
        self.dropped: list[str] = []
        #: name -> Lease as decoded from the ``listing`` given to the last :meth:`acquire`
        #: (empty without one): the caller builds its peer table from the same listing
        self.listed: dict[str, Lease] = {}

    @property
    def subnets_prefix(self) -> str:
        return self.registry.key("subnets/")

    def _key(self, subnet: IPv4Network | None, subnet6: IPv6Network | None = None) -> str:
        return self.subnets_prefix + subnet_key(subnet, subnet6)

    @property
    def public_ip(self) -> IPv4Address | IPv6Address | None:
        """The address our leases are found by: PublicIP, or PublicIPv6 when IPv6-only."""
        return self.attrs.host_ip

    def list_leases(self) -> tuple[dict[str, Lease], int]:
        items, revision = self.registry.list_prefix(self.subnets_prefix)
        return self.parse_leases(items), revision

    def parse_leases(self, items: list[KeyValue]) -> dict[str, Lease]:
        """name -> Lease for the keys under subnets/ in `items` (others, e.g. the config, are
        skipped; unreadable values are logged and skipped)."""
        leases: dict[str, Lease] = {}
        prefix = self.subnets_prefix
        for kv in items:
            if not kv.key.startswith(prefix):
                continue
            name = kv.key[len(prefix):]
            try:
                leases[name] = decode_lease(name, kv.value, kv.lease_id, kv.mod_revision)
            except LeaseError as exc:
                log.warning("ignoring subnets/%s: %s", name, exc)
        return leases

    def acquire(self, replacing: Lease | None = None,
                listing: list[KeyValue] | None = None) -> Lease:
        """Get a lease (reuse, previous subnet, or a free one). Raises OutOfSubnets.

        ``replacing`` is our current lease when a live config change needs another key (an
        address family turned on or off): its subnets count as free, so the previous-subnet
        hints can keep them, and its key is deleted only after the new one exists, so peers
        never see this host without a lease. Stale own keys likewise go after the new key is
        in place.

        ``listing`` is a listing the caller already holds (at one etcd revision; keys outside
        subnets/ are ignored): the first attempt plans from it instead of listing again, so at
        start-up one listing serves both the lease choice and the peer table (at 5,000 leases
        a listing costs ~0.3 s). A stale listing is safe: the create is create-if-absent, a
        lost race lists afresh, and a reused key is checked with a keepalive. The names this
        call deleted are in :attr:`dropped`."""
        value = encode_attrs(self.attrs)
        self.dropped = []
        self.listed = {}
        # Each lost create race means another host got a subnet, so retrying while subnets are
        # free always ends; flannel's fixed 10 tries can fail a host in a thundering herd.
        attempts = MAX_ATTEMPTS + self.config.candidate_count
        for attempt in range(1, attempts + 1):
            if attempt == 1 and listing is not None:
                self.listed = self.parse_leases(listing)
                existing = dict(self.listed)
            else:
                existing, _ = self.list_leases()
            if replacing is not None:
                existing.pop(replacing.key, None)
            assert self.public_ip is not None
            plan = plan_lease(self.config, existing, self.public_ip, self.previous_subnet,
                              rng=self.rng, previous_subnet6=self.previous_subnet6)
            key = self._key(plan.subnet, plan.ipv6_subnet)
            if plan.reuse is not None:
                lease = self._reuse(plan.reuse, key, value)
                if lease is not None:
                    log.info("%s", plan.reason)
                    self._drop_old(plan.delete, replacing)
                    self.revoke_unused()
                    return lease
                continue
            created, lease_id, holder = self._create_on_new_lease(key, value)
            lost = self._lost_subnet_race(key, plan.subnet, plan.ipv6_subnet) if created else ""
            if lost:
                log.warning("%s subnet %s was leased by another host at the same moment (its "
                            "key came first); letting our key %s go and choosing again", lost,
                            plan.ipv6_subnet if lost == "IPv6" else plan.subnet, key)
                self.registry.delete(key)
                self.revoke_unused()  # the etcd lease of the key we let go
                if lost == "IPv6":
                    self.previous_subnet6 = None
                else:
                    self.previous_subnet = None
                continue
            if created:
                log.info("%s; leased %s (etcd lease %016x, TTL %d s)", plan.reason,
                         subnets_label(plan.subnet, plan.ipv6_subnet), lease_id, self.ttl)
                lease = self._hold(Lease(plan.subnet, self.attrs, plan.ipv6_subnet, lease_id),
                                   self.ttl)
                self._drop_old(plan.delete, replacing)
                self.revoke_unused()
                return lease
            log.info("subnet %s was taken by another host meanwhile (attempt %d)",
                     subnets_label(plan.subnet, plan.ipv6_subnet), attempt)
            # a previous subnet that was just taken is no hint any more
            self.previous_subnet = self.previous_subnet6 = None
        raise RegistryError(f"max retries ({attempts}) reached trying to acquire a subnet")

    def _drop_old(self, stale: tuple[Lease, ...], replacing: Lease | None) -> None:
        """Delete our keys the new lease supersedes (after it exists)."""
        for old in stale:
            log.info("deleting our old lease %s: it no longer fits the network config", old.key)
            self.registry.delete(self.subnets_prefix + old.key)
            self.dropped.append(old.key)
        held = self.state.lease if self.state is not None else None
        if replacing is None or held is None or replacing.key == held.key:
            return
        log.info("deleting our previous lease key %s (now %s)", replacing.key, held.key)
        self.registry.delete(self.subnets_prefix + replacing.key)
        self.dropped.append(replacing.key)
        if replacing.lease_id and replacing.lease_id != held.lease_id:
            try:
                self.registry.revoke(replacing.lease_id)
            except RegistryError as exc:
                log.warning("revoking our old etcd lease failed (it will expire): %s", exc)

    def _reuse(self, old: Lease, key: str, value: str) -> Lease | None:
        """Take over our own existing key, rewriting it only when its value changed."""
        if old.reserved:
            if encode_attrs(old.attrs) != value:
                self.registry.put(key, value)  # stays a reservation: no lease attached
            return self._hold(replace(old, attrs=self.attrs), ttl=-1)
        ttl = self.registry.keepalive(old.lease_id)
        if ttl > 0:
            if encode_attrs(old.attrs) != value:
                self.registry.put(key, value, lease_id=old.lease_id)
            return self._hold(replace(old, attrs=self.attrs), ttl)
        # the etcd lease is gone (the key will vanish with it): create the key afresh
        self.registry.delete(key)
        created, lease_id, _ = self._create_on_new_lease(key, value)
        if not created:
            return None
        return self._hold(Lease(old.subnet, self.attrs, old.ipv6_subnet, lease_id), self.ttl)

    def _lost_subnet_race(self, key: str, subnet: IPv4Network | None,
                          subnet6: IPv6Network | None) -> str:
        """A dual-stack key names two subnets, so create-if-absent on it cannot see another
        host's key that holds one of them: two hosts turning IPv6 on at once can pick the same
        free IPv6 subnet, each beside its own IPv4 subnet, and both creates succeed. A listing
        right after the create settles it the same way on both hosts: the key etcd wrote first
        (lower revision) keeps the subnet. Returns the family we lost ("IPv4"/"IPv6"), or ""."""
        if subnet is None or subnet6 is None:
            return ""  # a single-family key is the subnet itself: create-if-absent decided
        leases, _ = self.list_leases()
        mine = leases.get(key[len(self.subnets_prefix):])
        if mine is None:
            return ""  # gone already (deleted or expired): the own-key handling takes over
        for other in leases.values():
            if (other.key == mine.key or self._is_ours(other)
                    or other.mod_revision >= mine.mod_revision):
                continue  # ourselves (old keys of either family included), or created after
            if other.ipv6_subnet == subnet6:
                return "IPv6"
            if other.subnet == subnet:
                return "IPv4"
        return ""

    def _is_ours(self, lease: Lease) -> bool:
        """A key of this host under any key form: by PublicIP, or by PublicIPv6 (an
        IPv6-only key of ours, "0.0.0.0-0&...", during a switch to dual stack)."""
        a, o = self.attrs, lease.attrs
        return ((a.public_ip != NO_PUBLIC_IP and o.public_ip == a.public_ip)
                or (a.public_ipv6 is not None and o.public_ipv6 == a.public_ipv6))

    def _create_on_new_lease(self, key: str, value: str) -> tuple[bool, int, KeyValue | None]:
        """Create `key` on a new etcd lease whose ID we pick and write down first.

        The order is the point: ID chosen (63 random bits) → recorded in memory and in
        `lease_file` → granted → transaction. Whatever fails or is lost after the record, the
        ID is known and `revoke_unused` ends it; a retried grant of the same ID is harmless."""
        lease_id = secrets.randbits(63) or 1
        self._remember(lease_id)
        self.registry.grant(self.ttl, lease_id)
        created, _, holder = self.registry.create(key, value, None, lease_id=lease_id)
        if not created and holder is not None and holder.lease_id == lease_id:
            created, holder = True, None  # the transaction landed; its answer was lost
        if not created:
            self.revoke_unused()
        return created, lease_id if created else 0, holder

    def _remember(self, lease_id: int) -> None:
        with self._ids:
            if lease_id in self.granted:
                return
            self.granted.add(lease_id)
            self._save()

    def _save(self) -> None:
        """Write `granted` (the caller holds `_ids`)."""
        if self.lease_file is None:
            return
        try:
            write_lease_ids(self.lease_file, self.granted)
        except FileError as exc:  # memory still has them: only a crash now could leak one
            log.warning("%s", exc)

    def revoke_unused(self) -> int:
        """Revoke every etcd lease we granted except the one we hold (call it only right after
        holding a lease); returns how many are left for `renew` to retry. Never raises."""
        held = self.state.lease.lease_id if self.state is not None else 0
        if held:  # adopted, or from before lease_file existed: ours to revoke when replaced
            self._remember(held)
        with self._ids:
            self.unused = self.granted - {held}
        return self._revoke(sorted(self.unused))

    def _revoke(self, lease_ids: list[int]) -> int:
        for lid in lease_ids:
            try:
                self.registry.revoke(lid)
            except RegistryError as exc:
                log.warning("revoking unused etcd lease %016x failed (will retry): %s", lid, exc)
                continue
            log.info("revoked unused etcd lease %016x", lid)
            with self._ids:
                self.granted.discard(lid)
                self.unused.discard(lid)
                self._save()
        return len(self.unused)

    def _hold(self, lease: Lease, ttl: int) -> Lease:
        prev = self.state
        self.state = LeaseState(lease, ttl, last_renew=time.monotonic())
        if prev is not None:
            self.state.renewals = prev.renewals
            self.state.renew_failures = prev.renew_failures
            self.state.reacquired = prev.reacquired
        self.previous_subnet = lease.subnet
        self.previous_subnet6 = lease.ipv6_subnet
        return lease

    @property
    def lease(self) -> Lease:
        assert self.state is not None, "no lease held"
        return self.state.lease

    @property
    def key(self) -> str:
        return self._key(self.lease.subnet, self.lease.ipv6_subnet)

    def update_attrs(self, attrs: LeaseAttrs) -> None:
        """New backend data for the lease we hold: rewrite the value on the same etcd lease."""
        self.attrs = attrs
        state = self.state
        if state is None or state.lease.attrs == attrs:
            return
        self.registry.put(self.key, encode_attrs(attrs), state.lease.lease_id)
        state.lease = replace(state.lease, attrs=attrs)

    def restore(self) -> None:
        """Our key was overwritten with something unreadable: write our value back on our own
        etcd lease (none for a reservation)."""
        if self.state is not None:
            self.registry.put(self.key, encode_attrs(self.attrs), self.state.lease.lease_id)

    def keepalive_interval(self) -> float:
        """Keepalives run often (a third of the TTL, at most every 5 min) so the TTL stays full."""
        return max(0.5, min(self.ttl / 3.0, 300.0))

    def renew(self) -> bool:
        """One keepalive. True = still held; False = the etcd lease is gone (re-acquire)."""
        state = self.state
        if state is None or state.lease.reserved:
            return True
        try:
            ttl = self.registry.keepalive(state.lease.lease_id)
        except RegistryError as exc:
            state.renew_failures += 1
            log.warning("lease keepalive failed (will retry): %s", exc)
            return True
        if ttl <= 0:
            log.warning("our etcd lease %016x has expired or was revoked", state.lease.lease_id)
            return False
        state.ttl = ttl
        state.renewals += 1
        state.last_renew = time.monotonic()
        if self.unused:  # etcd answers again: end what a failed revoke left behind
            self._revoke(sorted(self.unused))
        return True

    def seconds_left(self) -> float | None:
        state = self.state
        if state is None or state.lease.reserved:
            return None
        return max(0.0, state.ttl - (time.monotonic() - state.last_renew))

    def reacquire(self) -> Lease:
        """Our key vanished: re-create the same subnet key; renumber only if another host has it.

        Raises LeaseLost (after acquiring a new subnet) when renumbering was forced.
        """
        state = self.state
        assert state is not None
        old = state.lease
        key = self._key(old.subnet, old.ipv6_subnet)
        value = encode_attrs(self.attrs)
        lease_id = old.lease_id
        if lease_id:
            try:
                if self.registry.keepalive(lease_id) <= 0:
                    lease_id = 0
            except RegistryError:
                lease_id = 0
        if lease_id:
            # etcd lease alive, only the key was deleted: put it back on the same lease
            created, _, holder = self.registry.create(key, value, None, lease_id=lease_id)
            ttl = state.ttl
        else:
            created, lease_id, holder = self._create_on_new_lease(key, value)
            ttl = self.ttl
        if created:
            state.reacquired += 1
            log.warning("our lease key %s was gone; re-created it for the same subnet", key)
            self._hold(Lease(old.subnet, self.attrs, old.ipv6_subnet, lease_id), ttl)
            assert self.state is not None
            self.state.reacquired = state.reacquired
            self.revoke_unused()
            return self.lease
        if holder is not None:
            try:
                other = decode_lease(key[len(self.subnets_prefix):], holder.value)
                if other.attrs.host_ip == self.public_ip:
                    # ours after all (e.g. written back by an operator): adopt it
                    adopted = self._hold(
                        Lease(old.subnet, other.attrs, old.ipv6_subnet, holder.lease_id), state.ttl
                    )
                    self.revoke_unused()
                    return adopted
            except LeaseError:
                pass
        log.error("SUBNET LOST: %s is now held by another host; acquiring a new subnet. Pods on "
                  "this host must be re-attached.", old.label)
        self.previous_subnet = None
        self.previous_subnet6 = None
        self.acquire()
        raise LeaseLost(f"subnet {old.label} was taken by another host; now {self.lease.label}")


__all__ = ["LeaseManager", "LeaseLost", "OutOfSubnets", "LeaseState"]
