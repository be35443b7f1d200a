"""Operator commands (calicoctl-like): status, leases, config get/set, doctor, migrate-v2.

Human tables by default, ``--json`` for scripts. Each command returns an exit code and prints
its result to stdout, problems to stderr. Heavy imports (the etcd client/grpc, pyroute2) stay inside the
functions that need them so ``--help`` is fast.

Where the facts come from: `status` reads the agent's own ``<state-dir>/status.json`` (the
daemon's single writer puts it there) and asks etcd for the live lease; `leases` and `config`
ask etcd; `doctor` reads the local kernel (procfs, netlink dumps, iptables-save) read-only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

#: flags the etcd-talking commands accept (same names, env vars and defaults as `run`)
ETCD_FLAGS = ("etcd-endpoints", "etcd-prefix", "etcd-cafile", "etcd-certfile", "etcd-keyfile",
              "etcd-username", "etcd-password")
#: backend -> encapsulation overhead in bytes (flannel-compat.md §11.6, §13)
OVERHEAD = {"vxlan": 50, "udp": 28, "host-gw": 0, "alloc": 0}


def add_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """A subset of `run`'s flags, with `run`'s env-var fallbacks (via load_settings)."""
    from netagent.settings import FLAGS

    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with agent settings")
    for f in FLAGS:
        if f.name not in names:
            continue
        if f.kind is list:
            parser.add_argument(f"--{f.name}", action="append", default=None, help=f.help)
        elif f.kind is bool:
            parser.add_argument(f"--{f.name}", nargs="?", const="true", default=None,
                                metavar="BOOL", help=f.help)
        else:
            parser.add_argument(f"--{f.name}", default=None, help=f"{f.help} (default {f.default!r})")


def settings(args: argparse.Namespace) -> Any:
    from netagent.settings import load_settings, read_config_file

    return load_settings(args, os.environ, read_config_file(getattr(args, "config", None)))


def registry(args: argparse.Namespace) -> Any:
    from netagent.daemon import etcd_settings
    from netagent.registry import Registry

    return Registry(etcd_settings(settings(args)))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, calicoctl style, no borders."""
    text = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in text)


def emit(args: argparse.Namespace, doc: Any, human: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(human)


def err(msg: str) -> None:
    print(f"netagent: {msg}", file=sys.stderr)


def _age(ts: float | None) -> str:
    if not ts:
        return "never"
    return f"{max(0.0, time.time() - ts):.0f} s ago"


# --------------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    """This host: the agent's status.json plus the live lease from etcd."""
    from netagent.registry import RegistryError

    s = settings(args)
    path = Path(s.state_dir) / "status.json"
    try:
        st: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        err(f"cannot read {path} ({exc}); is `netagent run --state-dir {s.state_dir}` running?")
        return 1
    doc: dict[str, Any] = {
        "phase": st.get("phase"), "ready": st.get("ready"), "backend": st.get("backend"),
        "subnet": st.get("subnet"), "public_ip": st.get("public_ip"), "mtu": st.get("mtu"),
        "last_reconcile": st.get("last_reconcile") or None, "reconciles": st.get("reconciles"),
        "drift_repairs": st.get("drift_repairs"), "kernel_entries": st.get("kernel_entries", {}),
        "masquerade": st.get("masquerade", "off"),
        "backend_health": st.get("backend_health", {}),
        "peers": [dict(subnet=k, **v) for k, v in sorted(st.get("peer_list", {}).items())],
        "lease": {"key": st.get("lease_key"), "in_etcd": None, "lease_id": None, "ttl": None,
                  "reserved": None, "public_ip": None},
        "etcd": "ok",
    }
    key = st.get("lease_key")
    try:
        with registry(args) as reg:
            kv = reg.get(key) if key else None
            lease = doc["lease"]
            lease["in_etcd"] = kv is not None
            if kv is not None:
                lease["lease_id"] = format(kv.lease_id, "016x") if kv.lease_id else None
                lease["reserved"] = kv.lease_id == 0
                lease["ttl"] = reg.lease_ttl(kv.lease_id) if kv.lease_id else None
                try:
                    value = json.loads(kv.value)
                    pub = value.get("PublicIP")
                    # an IPv6-only host advertises PublicIP 0.0.0.0 and is known by PublicIPv6
                    lease["public_ip"] = value.get("PublicIPv6") if pub == "0.0.0.0" else pub
                except (ValueError, AttributeError):
                    pass
    except RegistryError as exc:
        doc["etcd"] = str(exc)
    lease = doc["lease"]
    expiry = ("reservation (no expiry)" if lease["reserved"] else
              f"{lease['ttl']} s" if lease["ttl"] is not None else "unknown")
    lines = [
        table(["FIELD", "VALUE"], [
            ["phase", doc["phase"]], ["ready", doc["ready"]], ["backend", doc["backend"]],
            ["subnet", doc["subnet"]], ["public ip", doc["public_ip"]], ["mtu", doc["mtu"]],
            ["lease key", key], ["lease in etcd", lease["in_etcd"]],
            ["lease id", lease["lease_id"]], ["lease expires in", expiry],
            ["last reconcile", _age(doc["last_reconcile"])],
            ["reconciles", doc["reconciles"]], ["drift repairs", doc["drift_repairs"]],
            ["kernel entries", ", ".join(f"{k} {v}" for k, v in sorted(doc["kernel_entries"].items()))
             or "none"],
            ["masquerade", doc["masquerade"]], ["etcd", doc["etcd"]],
            *backend_health_rows(doc["backend_health"]),
        ]),
        *bgp_session_lines(doc["backend_health"]),
        "",
        table(["PEER SUBNET", "PUBLIC IP", "BACKEND", "REACHABLE", "RTT MS"],
              [[p["subnet"], p["public_ip"], p["backend"],
                reach_label(p), p["rtt_ms"]]
               for p in doc["peers"]]),
    ]
    emit(args, doc, "\n".join(lines))
    return 0 if doc["ready"] else 1


def bgp_session_lines(health: dict[str, Any]) -> list[str]:
    """The bgp backend's sessions (from BIRD's `show protocols all`) as their own table."""
    sessions = health.get("sessions")
    if not isinstance(sessions, list) or not sessions:
        return []
    return ["", table(["BGP PEER", "SESSION", "STATE", "ROUTES RECEIVED", "SINCE", "LAST ERROR"],
                      [[s.get("peer"), s.get("name"), s.get("state"), s.get("routes_received"),
                        s.get("since"), s.get("last_error") or ""]
                       for s in sessions if isinstance(s, dict)])]


def backend_health_rows(health: dict[str, Any]) -> list[list[Any]]:
    """Status rows for the backend's own machinery: "backend health" (ok, or what is wrong),
    then one row per scalar info field; list fields (e.g. BGP sessions) get their own table."""
    if not health:
        return []
    rows: list[list[Any]] = [["backend health", "ok" if health.get("ok") else
                              f"NOT OK: {health.get('detail', '')}"]]
    for key, value in health.items():
        if key not in ("ok", "detail") and not isinstance(value, (list, dict)):
            rows.append([key.replace("_", " "), value])
    return rows


def reach_label(peer: dict[str, Any]) -> str:
    """The REACHABLE column: yes / NO / unprobed, or per family when a dual-stack peer answers
    over one family only (its overall "reachable" is true then, which would hide the other)."""
    r4, r6 = peer.get("reachable_v4"), peer.get("reachable_v6")
    if r4 is not None and r6 is not None and r4 != r6:
        return "IPv4 only (IPv6 NO)" if r4 else "IPv6 only (IPv4 NO)"
    return {True: "yes", False: "NO", None: "unprobed"}[peer.get("reachable")]


# --------------------------------------------------------------------------- leases


def lease_rows(items: Sequence[Any], prefix: str, ttls: dict[int, int]) -> list[dict[str, Any]]:
    """One dict per subnets/ key: decoded fields, TTL, reservation flag or the decode error."""
    from netagent.lease import LeaseError, decode_lease

    rows = []
    for kv in items:
        name = kv.key[len(prefix):]
        row: dict[str, Any] = {"key": kv.key, "subnet": None, "public_ip": None, "backend": None,
                               "lease_id": format(kv.lease_id, "016x") if kv.lease_id else None,
                               "ttl": ttls.get(kv.lease_id) if kv.lease_id else None,
                               "reserved": kv.lease_id == 0, "error": None}
        try:
            lease = decode_lease(name, kv.value, kv.lease_id, kv.mod_revision)
            row.update(subnet=lease.label, public_ip=str(lease.attrs.host_ip),
                       backend=lease.attrs.backend_type or "udp")
        except LeaseError as exc:
            row["error"] = str(exc)
        rows.append(row)
    return rows


def cmd_leases(args: argparse.Namespace) -> int:
    from netagent.registry import RegistryError

    try:
        with registry(args) as reg:
            prefix = reg.key("subnets/")
            items, revision = reg.list_prefix(prefix)
            ttls = reg.lease_ttls([kv.lease_id for kv in items])
    except RegistryError as exc:
        err(str(exc))
        return 1
    rows = lease_rows(items, prefix, ttls)
    human = table(
        ["SUBNET", "PUBLIC IP", "BACKEND", "LEASE", "TTL", "NOTE"],
        [[r["subnet"] or r["key"], r["public_ip"], r["backend"], r["lease_id"] or "reserved",
          "-" if r["reserved"] else f"{r['ttl']} s",
          f"MALFORMED: {r['error']}" if r["error"] else ""]
         for r in rows])
    emit(args, {"revision": revision, "leases": rows},
         human + f"\n\n{len(rows)} leases ({sum(r['reserved'] for r in rows)} reserved)")
    return 0


# --------------------------------------------------------------------------- config


def _summary(cfg: Any) -> str:
    return (f"network {cfg.network}, /{cfg.subnet_len} subnets {cfg.subnet_min} - "
            f"{cfg.subnet_max} ({len(cfg.candidate_subnets())} leasable), backend "
            f"{cfg.backend.type}" + (" (default)" if cfg.backend_defaulted else ""))


def cmd_config_get(args: argparse.Namespace) -> int:
    from netagent.config import ConfigError, parse_network_config
    from netagent.daemon import missing_config_message
    from netagent.registry import RegistryError

    try:
        with registry(args) as reg:
            kv = reg.get(reg.key("config"))
            if kv is None:
                err(missing_config_message(reg))
                return 1
    except RegistryError as exc:
        err(str(exc))
        return 1
    raw = kv.value.decode(errors="replace")
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True) if doc is not None else raw)
    else:
        print(raw.rstrip())
    try:
        print(f"# {_summary(parse_network_config(raw))}", file=sys.stderr)
    except ConfigError as exc:
        err(f"the stored config is invalid: {exc}")
        return 1
    return 0


def _read_valid_config(path: str, failure: str) -> tuple[str, Any] | None:
    """Read FILE or - (stdin), parse it and check the agent can run it (the daemon's
    `check_runnable`); None (after saying why) when unreadable, invalid or not runnable."""
    from netagent.config import ConfigError, parse_network_config

    try:
        raw = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        err(f"{path}: {exc.strerror or exc}")
        return None
    try:
        cfg = parse_network_config(raw)
    except ConfigError as exc:
        err(f"{failure}: {exc}")
        return None
    from netagent.backends import check_runnable

    why = check_runnable(cfg)  # the agent's own check: it would refuse this config too
    if why:
        err(f"{failure}: netagent cannot run it: {why}")
        return None
    return raw, cfg


def cmd_config_validate(args: argparse.Namespace) -> int:
    checked = _read_valid_config(args.file, "invalid network config")
    if checked is None:
        return 1
    print(f"valid: {_summary(checked[1])}")
    return 0


def cmd_config_set(args: argparse.Namespace) -> int:
    """Validate first; a bad config writes nothing (plain `etcdctl put` keeps working too)."""
    from netagent.registry import RegistryError

    checked = _read_valid_config(args.file, "invalid network config, nothing written")
    if checked is None:
        return 1
    raw, cfg = checked
    try:
        with registry(args) as reg:
            key = reg.key("config")
            reg.put(key, raw.strip())
    except RegistryError as exc:
        if exc.kind == "permission":
            s = settings(args)
            who = f"etcd user {s.etcd_username!r}" if s.etcd_username else "this etcd user"
            err(f"{who} may not write {key}: writing the config needs readwrite on "
                f"{s.etcd_prefix.rstrip('/')}/ (the agents' role); a read-only user can run "
                f"status, leases and config get. Nothing written ({exc})")
        else:
            err(str(exc))
        return 1
    print(f"wrote {key}: {_summary(cfg)}")
    return 0


# --------------------------------------------------------------------------- migrate-v2


def cmd_migrate_v2(args: argparse.Namespace) -> int:
    """Copy the v2-store config (seed era) into v3; never overwrite a different v3 config
    without --force."""
    from netagent.config import ConfigError, parse_network_config
    from netagent.registry import RegistryError

    try:
        with registry(args) as reg:
            key = reg.key("config")
            v2 = reg.find_v2_value(key)
            if v2 is None:
                err(f"no {key} in the etcd v2 store (is the server started with "
                    "--enable-v2=true, and was the config written with ETCDCTL_API=2?)")
                return 1
            try:
                cfg = parse_network_config(v2)
            except ConfigError as exc:
                err(f"the v2 config is invalid, nothing written: {exc}")
                return 1
            current = reg.get(key)
            if current is not None:
                same = _same_json(current.value.decode(errors="replace"), v2)
                if same:
                    print(f"{key} in v3 already equals the v2 config; nothing to do")
                    return 0
                if not args.force:
                    err(f"{key} in the v3 store holds a different config; not overwriting it "
                        "(use --force to replace it with the v2 one)")
                    return 1
            reg.put(key, v2.strip())
    except RegistryError as exc:
        err(str(exc))
        return 1
    print(f"copied {key} from the v2 store to v3: {_summary(cfg)}")
    return 0


def _same_json(a: str, b: str) -> bool:
    try:
        return bool(json.loads(a) == json.loads(b))
    except ValueError:
        return a.strip() == b.strip()


# --------------------------------------------------------------------------- doctor


@dataclass
class Check:
    name: str
    ok: bool | None  # None = could not check / not applicable
    detail: str
    fix: str = ""
    warn: bool = False  # works, but not what the user likely wants (shown as WARN, exit 0)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def check_ip_forward() -> Check:
    v = _read("/proc/sys/net/ipv4/ip_forward")
    if v is None:
        return Check("ip_forward", None, "cannot read /proc/sys/net/ipv4/ip_forward")
    if v == "1":
        return Check("ip_forward", True, "net.ipv4.ip_forward = 1")
    return Check("ip_forward", False, f"net.ipv4.ip_forward = {v}: this host will not forward "
                 "pod traffic", "sysctl -w net.ipv4.ip_forward=1 && echo net.ipv4.ip_forward=1 > "
                 "/etc/sysctl.d/90-netagent.conf")


def check_bird(backend: str | None, status: dict[str, Any], state_dir: Path) -> Check:
    """BIRD 2 installed (always reported) and, for the bgp backend, answering on the control
    socket the agent uses (from status.json, else the one derived from the state dir)."""
    import shutil
    import subprocess

    from netagent.backends.bgp.birdc import BirdError, birdc
    from netagent.backends.bgp.supervisor import default_socket

    install = "apt-get install bird2"
    if shutil.which("bird") is None or shutil.which("birdc") is None:
        if backend == "bgp":
            return Check("bird", False, "BIRD 2 (bird, birdc) is not installed; the bgp backend "
                         "needs it", install)
        return Check("bird", None, f"not installed (only the bgp backend needs it; backend "
                     f"{backend or '?'})")
    try:
        version = subprocess.run(["bird", "--version"], capture_output=True, text=True,
                                 timeout=5).stderr.strip() or "bird"
    except (OSError, subprocess.TimeoutExpired):
        version = "bird"
    if not version.startswith("BIRD version 2"):
        return Check("bird", False if backend == "bgp" else None,
                     f"{version}: the bgp backend needs BIRD 2", install)
    if backend != "bgp":
        return Check("bird", True, f"{version} installed (not used: backend {backend or '?'})")
    health = status.get("backend_health") or {}
    socket = str(health.get("bird_socket") or default_socket(state_dir))
    try:
        birdc(socket, "show", "status", timeout=3.0)
    except BirdError as exc:
        return Check("bird", False, f"{version}, but no BIRD answers on {socket}: {exc}",
                     f"see {state_dir}/bird.log and the agent's log; the agent starts BIRD "
                     "again on its next repair cycle")
    up = health.get("bgp_sessions_up", "?")
    return Check("bird", True, f"{version} running on {socket}; BGP sessions up: {up}")


def check_modules(backend: str | None, ip_masq: bool) -> Check:
    """Loaded or built-in modules show up under /sys/module."""
    want = {"vxlan": ["vxlan"], "udp": ["tun"]}.get(backend or "", [])
    if ip_masq:
        want.append("br_netfilter")
    if not want:
        return Check("kernel modules", True, f"none needed for backend {backend or '?'}")
    absent = [m for m in want if not Path(f"/sys/module/{m}").exists()]
    if not absent:
        return Check("kernel modules", True, "loaded: " + ", ".join(want))
    return Check("kernel modules", False, "not loaded: " + ", ".join(absent),
                 f"modprobe {' '.join(absent)} && printf '%s\\n' {' '.join(absent)} > "
                 "/etc/modules-load.d/netagent.conf")


def check_mtu(s: Any, backend: str | None, env: dict[str, str]) -> Check:
    if not env.get("FLANNEL_MTU"):
        return Check("mtu", None, f"{s.subnet_file} not written yet")
    try:
        from netagent.iface import find_iface, find_iface6

        if env.get("FLANNEL_SUBNET") or not env.get("FLANNEL_IPV6_SUBNET"):
            iface, _, _ = find_iface(s.iface, s.iface_regex, s.public_ip,
                                     can_reach=s.iface_can_reach)
        else:  # an IPv6-only network: the underlay is found by its IPv6 side
            iface, _, _ = find_iface6(s.iface, s.iface_regex, s.public_ipv6,
                                      can_reach=s.iface_can_reach)
    except Exception as exc:  # noqa: BLE001 - any failure is a finding, not a crash
        return Check("mtu", False, f"cannot find the underlay interface: {exc}",
                     "pass --iface NAME (or make sure a default route exists)")
    overhead = OVERHEAD.get(backend or "", 0)
    mtu = int(env["FLANNEL_MTU"])
    limit = iface.mtu - overhead
    if mtu <= limit:
        return Check("mtu", True, f"FLANNEL_MTU {mtu} fits underlay {iface.name} MTU {iface.mtu} "
                     f"- {overhead} ({backend})")
    return Check("mtu", False, f"FLANNEL_MTU {mtu} > underlay {iface.name} MTU {iface.mtu} - "
                 f"{overhead} ({backend}): large packets will be dropped",
                 "restart netagent after fixing the underlay MTU (it derives FLANNEL_MTU from it), "
                 "then re-create pods so they pick up the new MTU")


def check_etcd(args: argparse.Namespace) -> tuple[Check, Any]:
    from netagent.config import ConfigError, parse_network_config
    from netagent.registry import RegistryError

    try:
        reg = registry(args)
    except RegistryError as exc:
        return Check("etcd", False, str(exc), "fix the --etcd-* flags"), None
    t0 = time.monotonic()
    try:
        kv = reg.get(reg.key("config"))
    except RegistryError as exc:
        return Check("etcd", False, f"{', '.join(reg.settings.endpoints)}: {exc}",
                     "check --etcd-endpoints, that etcd runs, and the TLS flags "
                     "(--etcd-cafile/--etcd-certfile/--etcd-keyfile)"), None
    finally:
        reg.close()
    ms = (time.monotonic() - t0) * 1000
    if kv is None:
        return Check("etcd", False, f"reachable ({ms:.0f} ms) but {reg.key('config')} is missing",
                     "netagent config set net.json (or etcdctl put); see `netagent migrate-v2` "
                     "for a config written with ETCDCTL_API=2"), None
    try:
        cfg = parse_network_config(kv.value)
    except ConfigError as exc:
        return Check("etcd", False, f"the network config is invalid: {exc}",
                     "netagent config set FIXED.json"), None
    return Check("etcd", True, f"reachable in {ms:.0f} ms, network {cfg.network}"), cfg


def check_routes(network: IPv4Network | None, own: IPv4Network | None,
                 backend: str | None = None) -> Check:
    """Routes into the overlay that netagent did not make (another agent, a manual route).
    With the bgp backend, BIRD's routes (proto bird, 12) are the backend's own."""
    if network is None:
        return Check("conflicting routes", None, "network unknown (etcd unreachable)")
    from netagent.kernel import RT_TABLE_MAIN, RTPROT_NETAGENT, NetlinkKernel

    kernel = NetlinkKernel()
    try:
        routes = kernel.dump_routes(RT_TABLE_MAIN)
    finally:
        kernel.close()
    ours = {RTPROT_NETAGENT, 12} if backend == "bgp" else {RTPROT_NETAGENT}
    bad = [r for r in routes if isinstance(r.dst, IPv4Network) and r.dst.subnet_of(network)
           and r.proto not in ours and not (own is not None and r.dst.subnet_of(own))]
    if not bad:
        return Check("conflicting routes", True, f"no foreign routes inside {network}")
    desc = "; ".join(f"{r.dst} via {r.gateway or '-'} proto {r.proto}" for r in bad[:5])
    return Check("conflicting routes", False, f"routes inside the overlay not made by netagent: "
                 f"{desc}", "delete them (ip route del DST) or stop the tool that adds them")


def _iptables(*args: str) -> str | None:
    try:
        proc = subprocess.run(["iptables", *args], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def check_forward_policy(forward_rules: bool) -> Check:
    out = _iptables("-S", "FORWARD")
    if out is None:
        return Check("FORWARD policy", None, "cannot run iptables -S FORWARD",
                     "apt-get install iptables")
    policy = out.splitlines()[0].split()[-1] if out else "?"
    has_ours = "-j FLANNEL-FWD" in out
    if policy == "ACCEPT" or has_ours:
        why = "policy ACCEPT" if policy == "ACCEPT" else f"policy {policy}, FLANNEL-FWD accepts overlay"
        return Check("FORWARD policy", True, why)
    return Check("FORWARD policy", False, f"policy {policy} and no FLANNEL-FWD rules: pod traffic "
                 "between hosts is dropped (Docker sets DROP)",
                 "run netagent with --iptables-forward-rules (the default; installs FLANNEL-FWD), "
                 "or iptables -P FORWARD ACCEPT"
                 + ("" if not forward_rules else " (forward rules are on: is the agent running?)"))


def check_iptables_backend() -> Check:
    out = _iptables("--version")
    if out is None:
        return Check("iptables backend", False, "iptables not found", "apt-get install iptables")
    if "nf_tables" in out:
        legacy = None
        try:
            proc = subprocess.run(["iptables-legacy-save"], capture_output=True, text=True,
                                  timeout=10, check=False)
            legacy = proc.stdout if proc.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            pass
        if legacy and any(line.startswith("-A ") for line in legacy.splitlines()):
            return Check("iptables backend", False, f"{out.strip()}, but iptables-legacy also "
                         "holds rules: two rule sets are active and may contradict each other",
                         "migrate the legacy rules (iptables-legacy-save | iptables-nft-restore) "
                         "and flush them with iptables-legacy -F")
        return Check("iptables backend", True, out.strip())
    return Check("iptables backend", True, out.strip() + " (legacy; works, nft is Debian's default)")


#: what Docker does to overlay traffic when the agent does not masquerade (flannel's split of
#: the job: `--ip-masq` on the agent gives Docker `--ip-masq=false`, mk-docker-opts.sh)
DOCKER_MASQ_WARNING = (
    "the agent runs without --ip-masq, so docker_opts gives Docker --ip-masq=true (flannel's "
    "behaviour) and Docker masquerades traffic between containers on different hosts: a "
    "container sees the peer host's overlay address, not the sending container's")
DOCKER_MASQ_FIX = ("run the agent with --ip-masq (NETAGENT_OPTS=--ip-masq in /etc/default/netagent),"
                   " then restart netagent and docker: docker_opts then says --ip-masq=false and "
                   "the agent masquerades only traffic leaving the overlay")


def docker_masq_warning(env: dict[str, str]) -> str | None:
    """The warning `docker-opts` and `doctor` give when Docker will masquerade overlay traffic:
    a subnet.env whose FLANNEL_IPMASQ is not "true" (absent or false both leave Docker at its
    default, --ip-masq=true)."""
    if not env.get("FLANNEL_SUBNET") or env.get("FLANNEL_IPMASQ") == "true":
        return None
    return f"{DOCKER_MASQ_WARNING}. Fix: {DOCKER_MASQ_FIX}"


def check_docker_masq(env: dict[str, str], agent_ip_masq: bool, dockerd: str | None) -> Check:
    if dockerd is None:
        return Check("docker masquerade", None, "Docker is not installed")
    if not env.get("FLANNEL_SUBNET"):
        return Check("docker masquerade", None, "subnet.env not written yet")
    if agent_ip_masq or env.get("FLANNEL_IPMASQ") == "true":
        return Check("docker masquerade", True, "the agent masquerades (--ip-masq): Docker gets "
                     "--ip-masq=false, containers keep their addresses across hosts")
    return Check("docker masquerade", None, DOCKER_MASQ_WARNING, DOCKER_MASQ_FIX, warn=True)


def _find_dockerd() -> str | None:
    """dockerd is in /usr/sbin on Debian, /usr/bin with docker-ce; a non-root PATH may lack both."""
    found = shutil.which("dockerd")
    if found:
        return found
    return next((p for p in ("/usr/sbin/dockerd", "/usr/bin/dockerd") if os.access(p, os.X_OK)),
                None)


def cmd_doctor(args: argparse.Namespace) -> int:
    from netagent.files import read_env_file

    s = settings(args)
    env: dict[str, str] = {}
    if Path(s.subnet_file).is_file():
        env = read_env_file(s.subnet_file)
    st: dict[str, Any] = {}
    try:
        st = json.loads((Path(s.state_dir) / "status.json").read_text())
    except (OSError, ValueError):
        pass
    etcd_check, cfg = check_etcd(args)
    backend = st.get("backend") or (cfg.backend.type if cfg is not None else None)
    network = cfg.network if cfg is not None else (
        IPv4Network(env["FLANNEL_NETWORK"]) if env.get("FLANNEL_NETWORK") else None)
    own = IPv4Interface(env["FLANNEL_SUBNET"]).network if env.get("FLANNEL_SUBNET") else None
    ip_masq = s.ip_masq or env.get("FLANNEL_IPMASQ") == "true"
    checks = [check_ip_forward(), check_modules(backend, ip_masq), check_mtu(s, backend, env),
              check_bird(backend, st, Path(s.state_dir)),
              etcd_check, check_routes(network, own, backend), check_forward_policy(s.iptables_forward_rules),
              check_iptables_backend(), check_docker_masq(env, ip_masq, _find_dockerd())]
    failed = [c for c in checks if c.ok is False]
    mark = {True: "ok", False: "FAIL", None: "skip"}
    human = table(["CHECK", "RESULT", "DETAIL"],
                  [[c.name, "WARN" if c.warn else mark[c.ok], c.detail] for c in checks])
    to_fix = [c for c in checks if c.ok is False or c.warn]
    if to_fix:
        human += "\n\nhow to fix:\n" + "\n".join(f"  {c.name}: {c.fix}" for c in to_fix)
    emit(args, {"ok": not failed, "checks": [asdict(c) for c in checks]}, human)
    return 1 if failed else 0


# --------------------------------------------------------------------------- cleanup


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove what netagent made on this host (see netagent/cleanup.py); refuses while an
    agent runs on the state dir; a second run finds nothing to do."""
    from netagent.cleanup import CleanupError, Step, apply_steps, lease_steps, plan_cleanup, survey
    from netagent.files import run_lock_holder, take_run_lock
    from netagent.kernel import NetlinkKernel
    from netagent.registry import RegistryError
    from netagent.settings import SettingsError

    try:
        s = settings(args)
    except SettingsError as exc:
        err(f"{exc}; nothing removed")
        return 1
    state = Path(s.state_dir)
    lock: int | None = None
    holder = run_lock_holder(state)
    if holder is None and not args.dry_run and state.is_dir():
        lock = take_run_lock(state)
        if lock is None:
            holder = run_lock_holder(state) or 0
    if holder is not None:
        err(f"a netagent agent is running (PID {holder or 'unknown'}, {state / 'netagent.pid'} "
            "is locked); stop it first: it would put everything back. Nothing removed.")
        return 1
    kernel = NetlinkKernel()
    reg: Any = None
    try:
        steps, kept = plan_cleanup(survey(kernel, state, args.cni_bridge))
        if args.release_lease:
            try:
                reg = registry(args)
                steps += lease_steps(reg, s)
            except (CleanupError, RegistryError) as exc:
                err(f"--release-lease: {exc}")
                return 1
            if Path(s.subnet_file).exists():
                steps.append(Step("file", f"{s.subnet_file} (names the released subnet)",
                                  s.subnet_file))
        for note in kept:
            print(f"kept: {note}")
        if not steps:
            print("nothing to do: nothing of netagent's is left on this host")
            return 0
        if args.dry_run:
            for step in steps:
                print(f"would remove: {step.desc}")
            return 0
        failed = dict((id(st), why) for st, why in apply_steps(steps, kernel, state, reg))
        for step in steps:
            if id(step) in failed:
                err(f"could not remove {step.desc}: {failed[id(step)]}")
            else:
                print(f"removed: {step.desc}")
        return 1 if failed else 0
    finally:
        kernel.close()
        if reg is not None:
            reg.close()
        if lock is not None:
            os.close(lock)
