"""Backends, registered in one explicit table (no registration at import time).

Values are "module:Class" so that importing this package imports no backend (and no pyroute2).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from netagent.backends.base import Backend

BACKENDS: dict[str, str] = {
    "alloc": "netagent.backends.alloc:AllocBackend",
    "vxlan": "netagent.backends.vxlan:VxlanBackend",
    "host-gw": "netagent.backends.hostgw:HostGwBackend",
    "udp": "netagent.backends.udp:UdpBackend",
    "wireguard": "netagent.backends.wireguard.backend:WireguardBackend",
    "bgp": "netagent.backends.bgp.backend:BgpBackend",
}


def backend_class(type_name: str) -> type[Backend]:
    """The class for a config's Backend.Type; KeyError names what is available."""
    try:
        target = BACKENDS[type_name]
    except KeyError:
        raise KeyError(
            f"backend {type_name!r} is not implemented by netagent "
            f"(available: {', '.join(sorted(BACKENDS))})"
        ) from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]
