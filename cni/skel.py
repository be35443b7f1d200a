"""The CNI protocol around a plugin's verbs (libcni's ``pkg/skel`` and result versions).

What every call goes through before and after the plugin's own work, and nothing of how
netagent attaches a pod: the ``CNI_*`` environment validated per verb, ``CNI_ARGS`` parsed, the
``cniVersion`` negotiated (VERSION answered here, without loading any verb), one deadline for
the whole call (SIGALRM → code 11, so a wedged lock or kernel call never hangs the runtime),
results shaped for the requested version, and every failure turned into a CNI error object on
stdout with a non-zero exit. Kept apart so the verbs can be read (and replaced) without the
protocol, and the protocol tested without a kernel.

Start-up cost rule (bench/README.md, CNI section): stdlib C modules only, as in the rest of
the plugin's per-call import set.
"""

from __future__ import annotations

import os
import sys

from netagent.cni.errors import (
    DECODE,
    INCOMPATIBLE_VERSION,
    INTERNAL,
    INVALID_ENV,
    TRY_AGAIN_LATER,
    CniError,
)
from netagent.cni.fast import dumps, loads

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Protocol

    class NetConf(Protocol):
        """What the skeleton needs of a plugin's parsed config: its answer version and deadline."""

        version: str
        timeout: float

    #: a verb: (config, env, seconds left) → the object to print, or None for no output
    Verb = Callable[[Any, "Env", float], "dict[str, Any] | None"]

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
LATEST = "1.1.0"
#: ``CNI_ARGS`` keys runtimes send (CNI conventions, Kubernetes' pod keys); others need
#: ``IgnoreUnknown``
KNOWN_ARGS = {"IP", "IgnoreUnknown", "K8S_POD_NAME", "K8S_POD_NAMESPACE",
              "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID"}
SIGALRM = 14


def log(msg: str) -> None:
    """Diagnostics go to stderr: libcni parses stdout as the result."""
    sys.stderr.write(f"netagent-cni: {msg}\n")


# --------------------------------------------------------------------------- input


def valid_container_id(cid: str) -> bool:
    """The spec's grammar for container IDs (also used for network names)."""
    if not cid or not cid[0].isascii() or not cid[0].isalnum():
        return False
    return all(c.isascii() and (c.isalnum() or c in "_.-") for c in cid)


def valid_ifname(name: str) -> str:
    """'' when usable as a Linux interface name, else why not."""
    if not name:
        return "interface name is empty"
    if len(name) > 15:
        return "interface name is too long"
    if name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        return "interface name contains an invalid character"
    return ""


def parse_cni_args(raw: str) -> dict[str, str]:
    """``K=V;K2=V2``; unknown keys are an error unless ``IgnoreUnknown`` is set (as in Go)."""
    out: dict[str, str] = {}
    for item in raw.split(";"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise CniError(INVALID_ENV, "CNI_ARGS: invalid item (want K=V)", item)
        out[key] = value
    ignore = out.get("IgnoreUnknown", "").lower() in ("1", "true")
    unknown = sorted(k for k in out if k not in KNOWN_ARGS)
    if unknown and not ignore:
        raise CniError(INVALID_ENV, f"CNI_ARGS: unknown args {unknown}", raw)
    return out


class Env:
    """The CNI_* variables of one call, validated for its verb."""

    def __init__(self, environ: dict[str, str] | os._Environ[str]) -> None:
        self.command = environ.get("CNI_COMMAND", "")
        self.container_id = environ.get("CNI_CONTAINERID", "")
        self.netns = environ.get("CNI_NETNS_OVERRIDE") or environ.get("CNI_NETNS", "")
        self.ifname = environ.get("CNI_IFNAME", "")
        self.args_raw = environ.get("CNI_ARGS", "")
        self.path = environ.get("CNI_PATH", "")
        self.args: dict[str, str] = {}

    def validate(self) -> None:
        """The spec's required variables per verb (code 4 naming them), then their grammar."""
        cmd = self.command
        if cmd not in ("ADD", "DEL", "CHECK"):
            return
        required = ["CNI_CONTAINERID", "CNI_IFNAME"]
        if cmd != "DEL":
            required.append("CNI_NETNS")
        values = {"CNI_CONTAINERID": self.container_id, "CNI_IFNAME": self.ifname,
                  "CNI_NETNS": self.netns}
        missing = [k for k in required if not values[k]]
        if missing:
            raise CniError(INVALID_ENV, f"required env variables [{', '.join(missing)}] missing")
        if not valid_container_id(self.container_id):
            raise CniError(INVALID_ENV, "invalid characters in containerID", self.container_id)
        why = valid_ifname(self.ifname)
        if why:
            raise CniError(INVALID_ENV, why, self.ifname)
        self.args = parse_cni_args(self.args_raw)


# --------------------------------------------------------------------------- versions


def check_version(raw: dict[str, Any]) -> str:
    """The config's ``cniVersion`` when we speak it (we answer in it), else code 1."""
    version = raw.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config is {dumps(version)}, plugin supports "
                       f"{dumps(SUPPORTED_VERSIONS)}")
    return str(version)


def _requested_version(stdin: str) -> str | None:
    """The ``cniVersion`` string of a JSON object on stdin, if there is one."""
    doc = loads(stdin)
    if isinstance(doc, dict) and isinstance(doc.get("cniVersion"), str):
        return str(doc["cniVersion"])
    return None


def version_reply(stdin: str) -> dict[str, Any]:
    """VERSION: the request's version echoed (LATEST without one) and every version we speak."""
    version = LATEST
    if stdin.strip():
        try:
            asked = _requested_version(stdin)
        except ValueError as e:
            raise CniError(DECODE, f"error decoding version request: {e}") from None
        if asked is not None:
            version = asked
    return {"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}


def error_version(stdin: str) -> str:
    """The version an error is reported in: the config's when it names one."""
    try:
        asked = _requested_version(stdin)
    except ValueError:
        return LATEST
    return LATEST if asked is None else asked


def render_result(version: str, prev: dict[str, Any] | None, interfaces: list[dict[str, Any]],
                  ips: list[dict[str, Any]], routes: list[dict[str, Any]],
                  dns: dict[str, Any] | None) -> dict[str, Any]:
    """A result of the requested version; our entries appended to a chained ``prevResult``."""
    prev = prev or {}
    base_ifaces = [dict(i) for i in prev.get("interfaces") or []]
    offset = len(base_ifaces)
    old = version in ("0.3.0", "0.3.1", "0.4.0")
    out_ifaces = base_ifaces
    for iface in interfaces:
        item = {k: v for k, v in iface.items() if k != "mtu" or version == "1.1.0"}
        out_ifaces.append(item)
    out_ips = []
    for ip in prev.get("ips") or []:
        ip = dict(ip)
        if old:
            ip.setdefault("version", "6" if ":" in ip.get("address", "") else "4")
        else:
            ip.pop("version", None)
        out_ips.append(ip)
    for ip in ips:
        item = dict(ip)
        if "interface" in item:
            item["interface"] = item["interface"] + offset
        if old:
            item["version"] = "6" if ":" in str(item.get("address", "")) else "4"
        out_ips.append(item)
    result: dict[str, Any] = {"cniVersion": version, "interfaces": out_ifaces, "ips": out_ips}
    all_routes = [dict(r) for r in prev.get("routes") or []] + routes
    if all_routes:
        result["routes"] = all_routes
    result["dns"] = dns if dns is not None else (prev.get("dns") or {})
    return result


# --------------------------------------------------------------------------- deadline


class _Deadline(BaseException):
    """Raised from SIGALRM; a BaseException so no ``except Exception`` swallows it."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _Deadline()


def _signals() -> Any:
    """``_signal``, the C module under ``signal`` (which would import ``enum``)."""
    try:
        import _signal as sig
    except ImportError:  # pragma: no cover
        import signal as sig  # type: ignore[no-redef]
    return sig


def arm_deadline(seconds: float) -> None:
    sig = _signals()
    sig.signal(SIGALRM, _on_alarm)
    sig.setitimer(0, seconds)  # ITIMER_REAL


def disarm_deadline() -> None:
    """Stop the clock: a rollback must run to its end even past the deadline."""
    _signals().setitimer(0, 0)


def _remaining(start: float, total: float) -> float:
    import time

    return max(total - (time.monotonic() - start), 0.5)


# --------------------------------------------------------------------------- one call


def run(environ: dict[str, str] | os._Environ[str], stdin: str,
        parse_config: Callable[[dict[str, Any]], NetConf],
        load_verb: Callable[[str], Verb | None]) -> dict[str, Any] | None:
    """One plugin call: returns the object to print (None for no output) or raises CniError.

    ``load_verb`` is asked only for a verb other than VERSION (so VERSION loads no verb
    code); ``parse_config`` turns the decoded stdin into the plugin's config after the
    environment was validated.
    """
    import time

    env = Env(environ)
    if not env.command:
        raise CniError(INVALID_ENV, "required env variables [CNI_COMMAND] missing")
    if env.command == "VERSION":
        return version_reply(stdin)
    verb = load_verb(env.command)
    if verb is None:
        raise CniError(INVALID_ENV, f"unknown CNI_COMMAND: {env.command}")
    try:
        raw = loads(stdin)
    except ValueError as e:
        raise CniError(DECODE, f"error decoding network config: {e}") from None
    if not isinstance(raw, dict):
        raise CniError(DECODE, "network config must be a JSON object")
    env.validate()
    cfg = parse_config(raw)
    start = time.monotonic()
    arm_deadline(cfg.timeout)
    try:
        return verb(cfg, env, _remaining(start, cfg.timeout))
    except _Deadline:
        raise CniError(TRY_AGAIN_LATER, f"{env.command} did not finish within "
                       f"{cfg.timeout:g} s", "deadline") from None
    finally:
        disarm_deadline()


def main(call: Callable[[os._Environ[str], str], dict[str, Any] | None]) -> int:
    """Console entry point around ``call(environ, stdin)``: never lets a traceback reach
    stdout, always CNI-shaped."""
    stdin = ""
    try:
        if os.environ.get("CNI_COMMAND") != "VERSION" or not sys.stdin.isatty():
            stdin = sys.stdin.buffer.read().decode("utf-8", errors="replace") \
                if sys.stdin is not None else ""
        out = call(os.environ, stdin)
    except CniError as e:
        sys.stdout.write(dumps(e.to_json(error_version(stdin))))
        sys.stdout.flush()
        return 1
    except BaseException as e:  # noqa: BLE001 - the runtime must get JSON, whatever happened
        import traceback

        traceback.print_exc(file=sys.stderr)
        err = CniError(INTERNAL, f"internal error: {type(e).__name__}: {e}")
        sys.stdout.write(dumps(err.to_json(error_version(stdin))))
        sys.stdout.flush()
        return 1
    if out is not None:
        sys.stdout.write(dumps(out))
        sys.stdout.flush()
    return 0
