"""The wireguard backend (package): ``model`` (pure render, diff, text forms), ``client`` (UAPI
socket and ``wg``), ``wggo`` (wireguard-go supervision), ``keys`` (the key file), ``kernelio``
(every kernel call) and ``backend`` (the Backend that composes them)."""

from netagent.backends.wireguard.backend import WireguardBackend

__all__ = ["WireguardBackend"]
