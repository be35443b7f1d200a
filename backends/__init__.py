"""Backends, registered in one explicit table (no registration at import time).

Values are "module:Class" so that importing this package imports no backend (and no pyroute2).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from netagent.backends.base import Backend
    from netagent.config import NetworkConfig

BACKENDS: dict[str, str] = {
    "alloc": "netagent.backends.alloc:AllocBackend",
    "vxlan": "netagent.backends.vxlan:VxlanBackend",
    "host-gw": "netagent.backends.hostgw:HostGwBackend",
    "udp": "netagent.backends.udp:UdpBackend",
    "wireguard": "netagent.backends.wireguard.backend:WireguardBackend",
    "bgp": "netagent.backends.bgp.backend:BgpBackend",
}


class UnknownBackend(KeyError):
    """The config names a backend type this build of netagent has no class for."""


def backend_class(type_name: str) -> type[Backend]:
    """The class for a config's Backend.Type; UnknownBackend names what is available."""
    try:
        target = BACKENDS[type_name]
    except KeyError:
        raise UnknownBackend(
            f"backend {type_name!r} is not implemented by netagent "
            f"(available: {', '.join(sorted(BACKENDS))})"
        ) from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def check_runnable(config: NetworkConfig) -> str:
    """Why this agent cannot run `config` (a backend type not in the table, or the backend's
    own `check_config`), or "" when it can. The one check behind start-up (wait and report),
    a live change (keep the running config) and `netagent config validate`."""
    try:
        cls = backend_class(config.backend.type)
    except UnknownBackend as exc:
        return f"Backend.Type: {exc.args[0]}"
    return cls.check_config(config)
