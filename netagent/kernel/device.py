"""Addressing an overlay device we own: one step shared by every backend with a device."""

from __future__ import annotations

import logging

from netagent.kernel.entries import IPInterface, IPNetwork, Kernel, LinkInfo

log = logging.getLogger("netagent.kernel")


def address_device(kernel: Kernel, link: LinkInfo, want: IPInterface,
                   network: IPNetwork | None) -> int:
    """Make ``link`` hold ``want`` (our subnet's network address as /32 or /128: no connected
    route) and no other address of its family from ``network`` (a stale subnet after a
    renumbering), and be up. Addresses outside the network, or of the other family, are not
    ours and stay. Returns the kernel writes made (0 when all was in place)."""
    writes = 0
    for addr in link.addrs:
        if (addr != want and addr.version == want.version and network is not None
                and addr.ip in network):
            log.info("removing stale address %s from %s", addr, link.name)
            kernel.del_addr(link.index, addr)
            writes += 1
    if want not in link.addrs:
        kernel.add_addr(link.index, want)
        writes += 1
    if not link.up:
        kernel.set_link(link.index, up=True)
        writes += 1
    return writes
