"""Start-up-cheap stand-ins for stdlib modules whose import cost is paid on every pod.

A runtime executes the plugin once per container and verb, so every import is start-up time.
Measured on the 2-vCPU dev host (``python3 -I -S``, mean of 40 runs, see bench/README.md):
bare interpreter 7.4 ms; ``import json`` +8.6 ms (it drags in ``re``, ``enum``, ``functools``);
the ``_json`` C scanner/encoder used here +0.6 ms; ``import ctypes`` +3.2 ms, the ``_ctypes``
shim below +2 ms; ``import ipaddress`` +4.3 ms; ``import subprocess`` +12 ms (only imported on
the rare paths that exec something: ipMasq and IPAM delegation). Each C extension built as a
shared library (``_json``, ``_struct``, ``_socket``, ``_ctypes`` here) costs ~0.3 ms to load,
so ``fcntl`` and ``_sha1`` are avoided as well.

Everything falls back to the regular stdlib module when the private C module is missing (another
Python implementation), so correctness never depends on the shortcut.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # ``import typing`` alone costs 10 ms at start-up
if TYPE_CHECKING:
    from typing import Any

try:
    import _json

    class _ScanContext:
        """The attributes ``_json.make_scanner`` reads; mirrors ``json.JSONDecoder`` defaults."""

        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        memo: dict[str, Any] = {}

        @staticmethod
        def parse_constant(name: str) -> Any:
            raise ValueError(f"invalid constant {name}")

    _scan = _json.make_scanner(_ScanContext)  # type: ignore[arg-type]

    def _no_default(obj: object) -> Any:
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    _encode = _json.make_encoder(
        None, _no_default, _json.encode_basestring_ascii, None, ":", ",", False, False, False
    )
    _WS = " \t\n\r"

    def loads(text: str) -> Any:
        """Parse one JSON document; ValueError (with position) on anything else."""
        n = len(text)
        i = 0
        while i < n and text[i] in _WS:
            i += 1
        try:
            obj, end = _scan(text, i)
        except (StopIteration, SystemError):
            # The C scanner reports syntax errors through ``json.decoder.JSONDecodeError`` and
            # fails with SystemError when that module is not loaded: let the stdlib parser
            # produce the real message (the slow import is paid on this error path only).
            import json

            json.loads(text)
            raise ValueError("invalid JSON") from None  # pragma: no cover
        while end < n and text[end] in _WS:
            end += 1
        if end != n:
            raise ValueError(f"extra data at char {end}")
        return obj

    def dumps(obj: Any) -> str:
        """Compact JSON, ASCII only, NaN rejected (CNI peers are Go's encoding/json)."""
        return "".join(_encode(obj, 0))

except ImportError:  # pragma: no cover - non-CPython
    import json as _stdjson

    def loads(text: str) -> Any:
        return _stdjson.loads(text)

    def dumps(obj: Any) -> str:
        return _stdjson.dumps(obj, separators=(",", ":"), allow_nan=False)


CLONE_NEWNET = 0x40000000


def _make_setns() -> Any:
    """``os.setns`` exists from Python 3.12; before that call libc's setns(2) directly."""
    if hasattr(os, "setns"):
        return os.setns
    try:
        import _ctypes

        class _CInt(_ctypes._SimpleCData):  # type: ignore[name-defined,misc]
            _type_ = "i"

        class _CFunc(_ctypes.CFuncPtr):  # type: ignore[name-defined,misc]
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = _CInt

        class _Libc:
            _handle = _ctypes.dlopen(None)  # type: ignore[arg-type]

        func: Any = _CFunc(("setns", _Libc()))  # type: ignore[arg-type]
        get_errno = _ctypes.get_errno
    except (ImportError, AttributeError):  # pragma: no cover
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.setns
        get_errno = ctypes.get_errno

    def setns(fd: int, nstype: int = 0) -> None:
        if func(fd, nstype) != 0:
            err = get_errno()
            raise OSError(err, os.strerror(err))

    return setns


_setns_impl: Any = None


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move this (single-threaded) process into the namespace open at ``fd``."""
    global _setns_impl
    if _setns_impl is None:
        _setns_impl = _make_setns()
    _setns_impl(fd, nstype)


_FNV128_OFFSET = 0x6C62272E07BB014262B821756295C58D
_FNV128_PRIME = 0x0000000001000000000000000000013B


def digest(text: str) -> str:
    """32 hex chars of FNV-1a/128 of ``text``: only for naming (host veths, chains).

    Pure Python on purpose: ``_sha1``/``hashlib`` are shared libraries here, and each dlopen on
    the start-up path costs ~0.3 ms; the inputs are a few dozen bytes.
    """
    h = _FNV128_OFFSET
    for byte in text.encode():
        h = ((h ^ byte) * _FNV128_PRIME) & ((1 << 128) - 1)
    return f"{h:032x}"


# --------------------------------------------------------------------------- address helpers
# ``ipaddress`` costs 4 ms to import; the plugin needs little more than integer arithmetic.
# IPv4 is parsed by hand (no import at all); IPv6 goes through ``_socket.inet_pton``/``inet_ntop``
# (RFC 4291 parsing and RFC 5952 text, the form ``ip``, Go and host-local print), imported on
# first use so the VERSION path does not load the ``_socket`` shared library.


def ip_to_int(ip: str) -> int:
    """Dotted quad to int; ValueError on anything that is not exactly four octets."""
    parts = ip.split(".")
    if len(parts) != 4:
        raise ValueError(f"not an IPv4 address: {ip!r}")
    value = 0
    for p in parts:
        if not p.isdigit() or len(p) > 3 or int(p) > 255:
            raise ValueError(f"not an IPv4 address: {ip!r}")
        value = value * 256 + int(p)
    return value


def int_to_ip(value: int) -> str:
    return f"{value >> 24 & 255}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}"


AF_INET6 = 10


def ip6_to_int(ip: str) -> int:
    """IPv6 text to a 128-bit int; ValueError on anything else (zone ids included)."""
    import _socket

    try:
        return int.from_bytes(_socket.inet_pton(AF_INET6, ip), "big")
    except (OSError, TypeError):
        raise ValueError(f"not an IPv6 address: {ip!r}") from None


def int_to_ip6(value: int) -> str:
    """128-bit int to canonical (RFC 5952) IPv6 text, so file names and results match."""
    import _socket

    return str(_socket.inet_ntop(AF_INET6, value.to_bytes(16, "big")))


def ip_version(ip: str) -> int:
    """4 or 6 by the text's shape alone (an address is validated by the parser after this)."""
    return 6 if ":" in ip else 4


def parse_ip_any(ip: str) -> tuple[int, int]:
    """(version, address int) of an IPv4 or IPv6 address."""
    ip = ip.strip()
    if ip_version(ip) == 6:
        return 6, ip6_to_int(ip)
    return 4, ip_to_int(ip)


def format_ip(version: int, value: int) -> str:
    return int_to_ip6(value) if version == 6 else int_to_ip(value)


def parse_cidr_any(cidr: str) -> tuple[int, int, int]:
    """``addr/n`` of either family → (version, address int, prefix length); host bits kept."""
    addr, sep, plen = cidr.strip().partition("/")
    version = ip_version(addr)
    bits = 128 if version == 6 else 32
    if not sep or not plen.isdigit() or not 0 <= int(plen) <= bits:
        raise ValueError(f"not an IPv{version} CIDR: {cidr!r}")
    version, value = parse_ip_any(addr)
    return version, value, int(plen)


def netmask_any(version: int, plen: int) -> int:
    bits = 128 if version == 6 else 32
    full = (1 << bits) - 1
    return (full << (bits - plen)) & full if plen else 0


def normalize_cidr(cidr: str) -> str:
    """Canonical text of ``addr/n`` (host bits kept), for comparing what others wrote."""
    version, value, plen = parse_cidr_any(cidr)
    return f"{format_ip(version, value)}/{plen}"
