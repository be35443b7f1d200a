"""What a live network-config change must do, decided by a pure function.

`plan_config_change(old, new, lease, host)` looks at the two configs, the lease we hold and the
host's public addresses and returns a `ConfigChange`: which steps the daemon runs, in the order
DESIGN.md "Live reconfiguration" gives. The daemon only executes the plan (backends, etcd,
kernel), so every case is unit-tested here without a kernel or etcd, as `plan_lease` is for
leasing. Ground floor: imports only config and lease.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Address, IPv6Network

from netagent.config import NetworkConfig
from netagent.lease import Lease


@dataclass(frozen=True)
class ConfigChange:
    """The steps of one live switch from `old` to `new` (each flag says whether it runs)."""

    #: nothing to do (the configs are equal)
    unchanged: bool
    #: the new backend reuses the old one's device (same type; vxlan: same VNI): the old
    #: instance lets go of it before the new one prepares (a udp socket must be freed)
    same_device: bool
    #: a network of a family that stays changed, or every family of the old config is gone:
    #: the old backend removes its entries *before* the new one prepares (the new ownership
    #: rules would not recognise them)
    network_changed: bool
    #: families (4, 6) turned off while the other stays: an old-backend instance knowing that
    #: family alone removes its entries, after the new backend prepared
    dropped_families: tuple[int, ...]
    #: our subnets all fit the new config: the lease value is rewritten in place; otherwise a
    #: new key is leased (renumbering or a family switch) and the old one released after
    keeps_lease: bool
    #: the host's public addresses must be found again (IPv6 turned on with no public IPv6
    #: known, or IPv4 turned on or off)
    refresh_host: bool
    #: subnets of the held lease that still fit, kept as the next lease's hints
    kept_subnet: IPv4Network | None
    kept_subnet6: IPv6Network | None

    @property
    def release_old_first(self) -> bool:
        """The old instance shuts down before the new one prepares (it holds the device, or
        the network changed and it has already removed its entries)."""
        return self.same_device or self.network_changed

    @property
    def teardown_old_first(self) -> bool:
        return self.network_changed

    @property
    def teardown_old_after_prepare(self) -> bool:
        """Another backend or device: the old one's entries go right after the new one's
        `prepare()` succeeded and just before its full sync (both may want the same route
        keys, so tearing down after the new sync would delete the new routes)."""
        return not self.same_device and not self.network_changed

    @property
    def drop_families(self) -> tuple[int, ...]:
        """Families whose entries go on their own: only when the device stays (another
        backend's teardown, or a network change, removes every family anyway)."""
        if self.network_changed or not self.same_device:
            return ()
        return self.dropped_families

    @property
    def steps(self) -> tuple[str, ...]:
        """The plan in execution order, for logs and tests."""
        if self.unchanged:
            return ()
        out: list[str] = []
        if self.release_old_first:
            out.append("shutdown old")
        if self.teardown_old_first:
            out.append("teardown old")
        if self.refresh_host:
            out.append("find host addresses")
        out.append("prepare new")
        if self.teardown_old_after_prepare:
            out += ["teardown old", "shutdown old"]
        out += [f"remove IPv{f} entries" for f in self.drop_families]
        out.append("rewrite lease value" if self.keeps_lease else "lease new key")
        out += ["activate", "full sync", "iptables", "subnet.env"]
        return tuple(out)


def plan_config_change(old: NetworkConfig, new: NetworkConfig, lease: Lease,
                       host_public_ipv6: IPv6Address | None) -> ConfigChange:
    """The steps to switch from `old` to `new` while holding `lease`; `host_public_ipv6` is
    the host's public IPv6 address as found at start (None when none was looked for)."""
    same_device = old.backend.type == new.backend.type and (
        new.backend.type != "vxlan" or old.backend.vni == new.backend.vni)
    families = ((4, old.network, new.network), (6, old.ipv6_network, new.ipv6_network))
    dropped = tuple(f for f, was, now in families if was is not None and now is None)
    network_changed = any(was is not None and now is not None and was != now
                          for _, was, now in families) or all(
        now is None for _, was, now in families if was is not None)
    keeps_lease = new.contains_subnet(lease.subnet) and new.contains_ipv6_subnet(
        lease.ipv6_subnet)
    refresh_host = ((new.enable_ipv6 and host_public_ipv6 is None)
                    or new.enable_ipv4 != old.enable_ipv4)
    kept = lease.subnet if lease.subnet is not None and new.contains_subnet(lease.subnet) \
        else None
    kept6 = lease.ipv6_subnet if lease.ipv6_subnet is not None and new.contains_ipv6_subnet(
        lease.ipv6_subnet) else None
    return ConfigChange(unchanged=old == new, same_device=same_device,
                        network_changed=network_changed, dropped_families=dropped,
                        keeps_lease=keeps_lease, refresh_host=refresh_host,
                        kept_subnet=kept, kept_subnet6=kept6)


def relabel_notice(lease: Lease, new: NetworkConfig) -> tuple[bool, str]:
    """What a lease key change means for the pods: (renumbering, message). Renumbering (a
    subnet outside the new network) breaks them; a family turned on reaches only pods attached
    from now on; one turned off stops working."""
    lost4 = lease.subnet is not None and new.enable_ipv4 and not new.contains_subnet(
        lease.subnet)
    lost6 = lease.ipv6_subnet is not None and new.enable_ipv6 and \
        not new.contains_ipv6_subnet(lease.ipv6_subnet)
    nets = " + ".join(str(n) for n in (new.network, new.ipv6_network) if n)
    if lost4 or lost6:
        return True, (f"RENUMBERING: our subnet {lease.label} is outside the new network "
                      f"{nets}; leasing a new subnet. Pods on this host must be re-attached.")
    notes = []
    if lease.subnet is not None and not new.enable_ipv4:
        notes.append(f"IPv4 is off: pods' IPv4 addresses in {lease.subnet} stop working")
    if lease.ipv6_subnet is not None and not new.enable_ipv6:
        notes.append(f"IPv6 is off: pods' IPv6 addresses in {lease.ipv6_subnet} stop working")
    if lease.subnet is None and new.enable_ipv4:
        notes.append("IPv4 is on: re-attach pods to give them an IPv4 address")
    if lease.ipv6_subnet is None and new.enable_ipv6:
        notes.append("IPv6 is on: re-attach pods to give them an IPv6 address")
    return False, (f"address families changed ({nets}); our lease key changes, subnets that "
                   f"still fit are kept. {'; '.join(notes)}")
