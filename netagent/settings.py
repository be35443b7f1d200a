"""Agent settings: flannel's flags, from the command line, `NETAGENT_*`/`FLANNELD_*`, or YAML.

Precedence: command-line flag > `NETAGENT_<FLAG>` > `FLANNELD_<FLAG>` > `--config FILE.yaml` >
default. Flags take one dash or two (``-iface=eth1`` as flanneld's Go flags do). Empty
environment values are ignored (as flannel does). Pure apart from reading the environment
mapping and the YAML file it is handed.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Flag:
    name: str  # command-line name without dashes
    default: Any
    help: str
    kind: type = str  # str, int, bool, list (repeatable / comma-separated)


FLAGS: tuple[Flag, ...] = (
    Flag("etcd-endpoints", ["http://127.0.0.1:4001", "http://127.0.0.1:2379"],
         "comma-separated etcd URLs; several give failover", list),
    Flag("etcd-prefix", "/coreos.com/network", "etcd key prefix of the network"),
    Flag("etcd-cafile", "", "CA bundle to verify etcd (TLS even without a client cert)"),
    Flag("etcd-certfile", "", "TLS client certificate for etcd"),
    Flag("etcd-keyfile", "", "TLS client key for etcd"),
    Flag("etcd-username", "", "etcd user (only over TLS)"),
    Flag("etcd-password", "", "etcd password (only over TLS)"),
    Flag("iface", [], "interface name or IP to use (repeatable, tried in order)", list),
    Flag("iface-regex", [], "regex on interface IPs, then names (repeatable)", list),
    Flag("public-ip", "", "IPv4 address peers use to reach this host"),
    Flag("public-ipv6", "", "IPv6 address peers use to reach this host (dual stack)"),
    Flag("subnet-file", "/run/flannel/subnet.env", "where to write subnet.env"),
    Flag("subnet-lease-renew-margin", 60,
         "minutes before expiry by which the lease must be renewed (1-1439)", int),
    Flag("subnet-lease-ttl", 86400, "etcd lease TTL in seconds (flannel: fixed 86400)", int),
    Flag("iface-can-reach", "",
         "use the interface (and source address) that `ip route get` picks for this IP"),
    Flag("ip-masq", False, "install masquerade rules for traffic leaving the overlay", bool),
    Flag("ip-masq-fully-random-disable", False, "masquerade without --random-fully", bool),
    Flag("iptables-forward-rules", True,
         "FORWARD ACCEPT rules for the overlay network (needed when the FORWARD policy is DROP, "
         "as Docker sets it)", bool),
    Flag("ip-blackhole-route", False,
         "a blackhole route for this host's subnet(s), so traffic to an address no pod holds "
         "is dropped instead of leaving by the default route (flannel v0.27.1+)", bool),
    Flag("iptables-resync", 5, "seconds between checks of the iptables rules", int),
    Flag("healthz-ip", "0.0.0.0", "address of the health server"),
    Flag("healthz-port", 0, "port of the health server (0 = off)", int),
    Flag("metrics-port", 0, "port of the Prometheus metrics server (0 = off)", int),
    Flag("state-dir", "/var/lib/netagent", "where netagent keeps its own state (VTEP MAC, status)"),
    Flag("repair-interval", 10.0,
         "seconds between full kernel compares (drift repair); when not set and kernel change "
         "notifications work, the full compare is a safety net run every 60 s", float),
    Flag("log-level", "info", "debug, info, warning or error"),
    Flag("v", 0, "flannel's log verbosity: 1 or more logs at debug level", int),
)

_BY_DEST = {f.name.replace("-", "_"): f for f in FLAGS}


@dataclass(frozen=True)
class AgentSettings:
    etcd_endpoints: tuple[str, ...]
    etcd_prefix: str
    etcd_cafile: str
    etcd_certfile: str
    etcd_keyfile: str
    etcd_username: str
    etcd_password: str
    iface: tuple[str, ...]
    iface_regex: tuple[str, ...]
    iface_can_reach: str
    public_ip: str
    public_ipv6: str
    subnet_file: str
    subnet_lease_renew_margin: int
    subnet_lease_ttl: int
    ip_masq: bool
    ip_masq_fully_random_disable: bool
    iptables_forward_rules: bool
    ip_blackhole_route: bool
    iptables_resync: int
    healthz_ip: str
    healthz_port: int
    metrics_port: int
    state_dir: str
    repair_interval: float
    log_level: str
    v: int
    # whether --repair-interval came from a flag, the environment or the config file (not the
    # default): an operator's interval is kept as is, the default one may be stretched
    repair_interval_set: bool = False

    @property
    def effective_log_level(self) -> str:
        """--log-level, lowered to debug by flannel's -v N (N ≥ 1)."""
        return "debug" if self.v > 0 else self.log_level

    @property
    def iptables(self) -> bool:
        """Whether any iptables rules of ours are wanted at all (without, iptables is never
        run, so a host without it works)."""
        return self.ip_masq or self.iptables_forward_rules


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add every flag with default None, so we can tell 'not given' from a value."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of these flags")
    for f in FLAGS:
        opt = f"--{f.name}"
        if f.kind is bool:
            parser.add_argument(opt, nargs="?", const="true", default=None, metavar="BOOL",
                                help=f"{f.help} (default {str(f.default).lower()})")
        elif f.kind is list:
            parser.add_argument(opt, action="append", default=None, help=f.help)
        else:
            parser.add_argument(opt, default=None, help=f"{f.help} (default {f.default!r})")


def _coerce(flag: Flag, value: Any, origin: str) -> Any:
    try:
        if flag.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on", "t"):
                return True
            if text in ("0", "false", "no", "off", "f"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if flag.kind is int:
            if isinstance(value, bool):
                raise ValueError(f"not a whole number: {value!r}")
            return int(value)
        if flag.kind is float:
            return float(value)
        if flag.kind is list:
            items = value if isinstance(value, list) else [value]
            out: list[str] = []
            for item in items:
                out += [p.strip() for p in str(item).split(",") if p.strip()]
            return tuple(out)
        return str(value)
    except ValueError as exc:
        raise SettingsError(f"{origin}: {exc}") from None


def load_settings(
    args: argparse.Namespace, environ: Mapping[str, str], config_text: str | None = None
) -> AgentSettings:
    """Merge the sources; raise SettingsError naming the source of a bad value."""
    file_values: dict[str, Any] = {}
    if config_text is not None:
        import yaml  # only with --config: PyYAML costs ~25 ms of every agent start-up

        try:
            doc = yaml.safe_load(config_text) or {}
        except yaml.YAMLError as exc:
            raise SettingsError(f"--config: not valid YAML: {exc}") from None
        if not isinstance(doc, dict):
            raise SettingsError("--config: the file must be a mapping of flag: value")
        for key, value in doc.items():
            dest = str(key).replace("-", "_").lower()
            if dest not in _BY_DEST:
                raise SettingsError(f"--config: unknown setting {key!r}")
            file_values[dest] = value
    values: dict[str, Any] = {}
    given: set[str] = set()
    for dest, flag in _BY_DEST.items():
        env_name = dest.upper()
        cli = getattr(args, dest, None)
        if cli is not None:
            values[dest] = _coerce(flag, cli, f"--{flag.name}")
        elif environ.get(f"NETAGENT_{env_name}"):
            values[dest] = _coerce(flag, environ[f"NETAGENT_{env_name}"], f"NETAGENT_{env_name}")
        elif environ.get(f"FLANNELD_{env_name}"):
            values[dest] = _coerce(flag, environ[f"FLANNELD_{env_name}"], f"FLANNELD_{env_name}")
        elif dest in file_values:
            values[dest] = _coerce(flag, file_values[dest], f"--config {flag.name}")
        else:
            values[dest] = _coerce(flag, flag.default, flag.name)
            continue
        given.add(dest)
    settings = AgentSettings(**values, repair_interval_set="repair_interval" in given)
    if not 1 <= settings.subnet_lease_renew_margin <= 1439:
        raise SettingsError(
            "Invalid subnet-lease-renew-margin option, out of acceptable range (1-1439 minutes)"
        )
    if settings.subnet_lease_ttl < 3:
        raise SettingsError("--subnet-lease-ttl must be at least 3 seconds")
    if settings.repair_interval <= 0:
        raise SettingsError("--repair-interval must be positive")
    if settings.iptables_resync <= 0:
        raise SettingsError("--iptables-resync must be a positive number of seconds")
    if settings.v < 0:
        raise SettingsError("-v must be 0 or more")
    return settings


def long_dash(argv: Sequence[str]) -> list[str]:
    """flanneld's Go flags take one dash as well as two (``-iface=eth1``, ``-ip-masq``):
    give argparse the two-dash form of every known flag written with one."""
    known = {f.name for f in FLAGS} | {"config", "version"}
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and \
                arg[1:].split("=", 1)[0] in known:
            arg = "-" + arg
        out.append(arg)
    return out


def read_config_file(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SettingsError(f"--config {path}: {exc.strerror or exc}") from None
