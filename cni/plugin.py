"""The ``netagent`` CNI plugin: bridge (or routed) veth + built-in host-local IPAM from ``subnet.env``.

Run once per container and verb by the runtime (env + stdin in, JSON on stdout). Design rules,
each measured (bench/README.md, CNI section):

- start-up path is stdlib C modules only (no ``json``/``typing``/``dataclasses``/``ipaddress``/
  ``subprocess``/pyroute2): `cni.fast` and `cni.link`; the daemon package is never imported;
- one deadline for the whole call (SIGALRM → code 11), so a wedged lock or kernel call never
  hangs the runtime;
- every failure is a CNI error object on stdout with a non-zero exit, and a failed ADD undoes
  what it did (veth, reservation, masquerade) before answering;
- DEL needs nothing but the container ID and ifname: the host veth name and the masquerade
  chain are derived from them, so DEL works without the netns, prevResult or subnet.env;
- every address family in subnet.env (IPv4, IPv6 or both) gets a bridge gateway, one pod
  address, routes and an entry in ``ips[]``; IPAM reserves both families or neither;
- ``"mode": "routed"`` attaches a pod without the bridge (one bridge and two bridge passes fewer
  per packet: 4-6 % more pod-to-pod throughput in bench/README.md): the pod's address is a
  /32 (/128), its gateway (the same address as in bridge mode) sits on no device and is
  reached through a permanent neighbour entry for the host veth's MAC; the host routes the pod
  by a /32 (/128) on the host veth marked :data:`POD_ROUTE_PROTO`, which the agent never
  sweeps (its sweep only deletes its own proto). Everything sits on the veth pair, so
  deleting the host veth undoes it all, except where bridge-mode pods share the host: there
  the host answers ARP/NDP on the bridge for routed pods (:func:`_proxy_on_bridge`), and DEL
  sweeps the IPv6 proxy entries whose pod is gone.
"""

from __future__ import annotations

import os
import sys

from netagent.cni.errors import (
    ADDRESS_UNAVAILABLE,
    CHECK_FAILED,
    DECODE,
    INCOMPATIBLE_VERSION,
    INTERFACE_EXISTS,
    INTERNAL,
    INVALID_CONFIG,
    INVALID_ENV,
    NOT_AVAILABLE,
    TRY_AGAIN_LATER,
    CniError,
)
from netagent.cni.fast import (
    digest,
    dumps,
    format_ip,
    ip_version,
    loads,
    netmask_any,
    normalize_cidr,
    parse_cidr_any,
    parse_ip_any,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from netagent.cni.link import Link, Netlink
    from netagent.cni.subnet import SubnetEnv

    #: what an attach step gives the result: interfaces, ips, routes
    Attachment = tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
LATEST = "1.1.0"
DEFAULT_BRIDGE = "cni0"
MODES = ("bridge", "routed")
#: route protocol of a routed pod's host route: not the agent's 111 (RTPROT_NETAGENT), so the
#: agent's sweep of its own routes never touches these even when they fall outside its current
#: subnet; named by no iproute2 rt_protos entry (``echo "112 netagent-pod" >
#: /etc/iproute2/rt_protos.d/netagent-pod.conf`` names it for ``ip route``)
POD_ROUTE_PROTO = 112
DEFAULT_DATA_DIR = "/var/lib/cni/networks"
DEFAULT_TIMEOUT = 20.0
DEFAULT_SUBNET_WAIT = 3.0
KNOWN_ARGS = {"IP", "IgnoreUnknown", "K8S_POD_NAME", "K8S_POD_NAMESPACE",
              "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID"}
SIGALRM = 14


def _log(msg: str) -> None:
    """Diagnostics go to stderr: libcni parses stdout as the result."""
    sys.stderr.write(f"netagent-cni: {msg}\n")


# --------------------------------------------------------------------------- input


def _valid_container_id(cid: str) -> bool:
    if not cid or not cid[0].isascii() or not cid[0].isalnum():
        return False
    return all(c.isascii() and (c.isalnum() or c in "_.-") for c in cid)


def _valid_ifname(name: str) -> str:
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
        if not _valid_container_id(self.container_id):
            raise CniError(INVALID_ENV, "invalid characters in containerID", self.container_id)
        why = _valid_ifname(self.ifname)
        if why:
            raise CniError(INVALID_ENV, why, self.ifname)
        self.args = parse_cni_args(self.args_raw)


def _bool(conf: dict[str, Any], key: str, default: bool | None) -> bool | None:
    value = conf.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise CniError(INVALID_CONFIG, f"{key} must be a boolean", repr(value))
    return value


def _str(conf: dict[str, Any], key: str, default: str) -> str:
    value = conf.get(key, default)
    if not isinstance(value, str) or not value:
        raise CniError(INVALID_CONFIG, f"{key} must be a non-empty string", repr(value))
    return value


class Config:
    """The network config on stdin, checked once so the verbs can trust it."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        version = raw.get("cniVersion")
        if version not in SUPPORTED_VERSIONS:
            raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                           f"config is {dumps(version)}, plugin supports "
                           f"{dumps(SUPPORTED_VERSIONS)}")
        self.version: str = version
        name = raw.get("name")
        if not isinstance(name, str) or not _valid_container_id(name):
            raise CniError(INVALID_CONFIG, "name must be alphanumerics plus '_', '.', '-'",
                           repr(name))
        self.name = name
        mode = raw.get("mode", "bridge")
        if mode not in MODES:
            raise CniError(INVALID_CONFIG, 'mode must be "bridge" or "routed"', repr(mode))
        self.mode: str = mode
        self.bridge = _str(raw, "bridge", DEFAULT_BRIDGE)
        why = _valid_ifname(self.bridge)
        if why:
            raise CniError(INVALID_CONFIG, f"bridge: {why}", self.bridge)
        self.subnet_file = _str(raw, "subnetFile", "/run/flannel/subnet.env")
        self.data_dir = _str(raw, "dataDir", f"{DEFAULT_DATA_DIR}/{name}")
        self.is_default_gateway = bool(_bool(raw, "isDefaultGateway", True))
        self.hairpin = bool(_bool(raw, "hairpinMode", False))
        self.ip_masq = _bool(raw, "ipMasq", None)  # None: the inverse of FLANNEL_IPMASQ
        mtu = raw.get("mtu")
        if mtu is not None and (not isinstance(mtu, int) or isinstance(mtu, bool)
                                or not 68 <= mtu <= 65535):
            raise CniError(INVALID_CONFIG, "mtu must be an integer in 68..65535", repr(mtu))
        self.mtu: int | None = mtu
        self.timeout = float(raw.get("timeout", DEFAULT_TIMEOUT) or DEFAULT_TIMEOUT)
        self.subnet_wait = float(raw.get("subnetFileWait", DEFAULT_SUBNET_WAIT))
        ipam = raw.get("ipam")
        if ipam is None:
            ipam = {}
        if not isinstance(ipam, dict):
            raise CniError(INVALID_CONFIG, "ipam must be an object")
        ipam_type = ipam.get("type", "")
        if not isinstance(ipam_type, str):
            raise CniError(INVALID_CONFIG, "ipam.type must be a string")
        self.ipam_type = ipam_type
        dns = raw.get("dns")
        self.dns: dict[str, Any] | None = dns if isinstance(dns, dict) and dns else None
        prev = raw.get("prevResult")
        if prev is not None and not isinstance(prev, dict):
            raise CniError(INVALID_CONFIG, "prevResult must be an object")
        self.prev: dict[str, Any] | None = prev
        rc = raw.get("runtimeConfig")
        self.runtime_config: dict[str, Any] = rc if isinstance(rc, dict) else {}

    def masq_enabled(self, sub: SubnetEnv | None) -> bool:
        """Explicit ipMasq wins; else do what the daemon does not (flannel's rule)."""
        if self.ip_masq is not None:
            return self.ip_masq
        return sub is None or not sub.ipmasq

    def requested_ips(self, env: Env) -> dict[int, str]:
        """Static addresses asked for, per family (4/6): CNI_ARGS ``IP=`` (comma-separated, as
        host-local takes it), then ``args.cni.ips``, then ``runtimeConfig.ips``; the first
        of each family wins. Malformed text is a config error, not silently skipped."""
        candidates: list[str] = []
        if env.args.get("IP"):
            candidates += env.args["IP"].split(",")
        args = self.raw.get("args")
        if isinstance(args, dict) and isinstance(args.get("cni"), dict):
            candidates += [str(x) for x in args["cni"].get("ips") or []]
        candidates += [str(x) for x in self.runtime_config.get("ips") or []]
        out: dict[int, str] = {}
        for cand in candidates:
            ip = cand.strip().partition("/")[0]
            if not ip:
                continue
            try:
                version, value = parse_ip_any(ip)
            except ValueError:
                raise CniError(INVALID_CONFIG, f"requested IP {ip!r} is not an IP address",
                               cand) from None
            out.setdefault(version, format_ip(version, value))
        return out


def host_veth_name(container_id: str, ifname: str) -> str:
    """Deterministic host-side name (13 chars) so DEL/GC find it with nothing but the IDs."""
    return "na" + digest(f"{container_id}/{ifname}")[:11]


# --------------------------------------------------------------------------- results


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


# --------------------------------------------------------------------------- IPAM


class IpamLease:
    """What IPAM gave one attachment in one family: address, prefix, gateway, routes, and
    whether this call created it (only then does a failed ADD give it back)."""

    def __init__(self, ip: str, plen: int, gateway: str, routes: list[dict[str, Any]],
                 created: bool, dns: dict[str, Any] | None = None) -> None:
        self.ip, self.plen, self.gateway, self.routes = ip, plen, gateway, routes
        self.created = created
        self.dns = dns

    @property
    def version(self) -> int:
        return ip_version(self.ip)


def _find_plugin(name: str, path: str) -> str:
    if not path:
        raise CniError(INVALID_ENV, "required env variables [CNI_PATH] missing",
                       f"needed to find the IPAM plugin {name!r}")
    if "/" in name:
        raise CniError(INVALID_CONFIG, "ipam.type must be a plugin name, not a path", name)
    for d in path.split(":"):
        cand = os.path.join(d, name)
        if d and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise CniError(INVALID_CONFIG, f"failed to find plugin {name!r} in path [{path}]")


def exec_delegate(cfg: Config, env: Env, command: str, stdin: dict[str, Any],
                  timeout: float) -> dict[str, Any] | None:
    """Run the IPAM plugin named by ipam.type with our env and the whole config (spec §IPAM)."""
    import subprocess

    exe = _find_plugin(cfg.ipam_type, env.path)
    child_env = dict(os.environ, CNI_COMMAND=command)
    try:
        proc = subprocess.run([exe], input=dumps(stdin).encode(), stdout=subprocess.PIPE,
                              env=child_env, timeout=max(timeout, 1.0), check=False)
    except subprocess.TimeoutExpired:
        raise CniError(TRY_AGAIN_LATER, f"IPAM plugin {cfg.ipam_type} timed out") from None
    out = proc.stdout.decode(errors="replace").strip()
    parsed: Any = None
    if out:
        try:
            parsed = loads(out)
        except ValueError:
            parsed = None
    if proc.returncode != 0:
        if isinstance(parsed, dict) and "code" in parsed:
            raise CniError(int(parsed.get("code") or INTERNAL),
                           f"{cfg.ipam_type}: {parsed.get('msg', '')}",
                           str(parsed.get("details", "")))
        raise CniError(INTERNAL, f"IPAM plugin {cfg.ipam_type} failed (exit {proc.returncode})",
                       out[:500])
    if command == "ADD":
        if not isinstance(parsed, dict):
            raise CniError(DECODE, f"IPAM plugin {cfg.ipam_type} returned no result", out[:500])
        return parsed
    return None


def _delegate_config(cfg: Config, sub: SubnetEnv | None) -> dict[str, Any]:
    """The whole config for the delegate; host-local gets our subnet(s) if it names none:
    one range set per family, IPv4 first, like flannel's dual-stack delegate config."""
    conf = dict(cfg.raw)
    ipam = dict(conf.get("ipam") or {})
    if (sub is not None and ipam.get("type") == "host-local" and "subnet" not in ipam
            and "ranges" not in ipam):
        ipam["ranges"] = [[{"subnet": f.subnet_cidr, "gateway": f.gateway_ip}]
                          for f in sub.families]
    conf["ipam"] = ipam
    return conf


def ipam_add(cfg: Config, env: Env, sub: SubnetEnv, timeout: float) -> list[IpamLease]:
    """One lease per family of subnet.env (IPv4 first); all of them or none."""
    requested = cfg.requested_ips(env)
    for version, ip in requested.items():
        if sub.family(version) is None:
            raise CniError(ADDRESS_UNAVAILABLE, f"requested IP {ip} is IPv{version}, but "
                           f"{cfg.subnet_file} has no IPv{version} subnet")
    if not cfg.ipam_type:
        from netagent.cni.ipam import Pool, Store

        fams = sub.families
        pools = [Pool(f.version, f.subnet, f.plen, f.gateway, requested.get(f.version, ""), i)
                 for i, f in enumerate(fams)]
        with Store(cfg.data_dir) as store:
            got = store.reserve_all(env.container_id, env.ifname, pools)
        return [IpamLease(ip, f.plen, f.gateway_ip, [], created)
                for f, (ip, created) in zip(fams, got, strict=True)]
    conf = _delegate_config(cfg, sub)
    conf.pop("prevResult", None)
    res = exec_delegate(cfg, env, "ADD", conf, timeout) or {}
    dns = res.get("dns") if isinstance(res.get("dns"), dict) and res.get("dns") else None
    leases: dict[int, IpamLease] = {}
    for entry in res.get("ips") or []:
        try:
            version, ip_int, plen = parse_cidr_any(str(entry.get("address", "")))
        except ValueError:
            continue
        fam = sub.family(version)
        if version in leases or fam is None:
            continue  # one address per family, and only families the overlay carries
        routes = [r for r in res.get("routes") or []
                  if ip_version(str(r.get("dst", ""))) == version]
        leases[version] = IpamLease(format_ip(version, ip_int), plen,
                                    str(entry.get("gateway") or fam.gateway_ip), routes, True,
                                    dns)
    missing = [f.version for f in sub.families if f.version not in leases]
    if missing:
        # the delegate reserved something we cannot use: give it back before failing
        _ipam_del_quiet(cfg, env, sub, timeout)
        raise CniError(INVALID_CONFIG, f"IPAM plugin {cfg.ipam_type} returned no "
                       + " and no ".join(f"IPv{v}" for v in missing) + " address")
    return [leases[f.version] for f in sub.families]


def ipam_del(cfg: Config, env: Env, sub: SubnetEnv | None, timeout: float) -> None:
    if not cfg.ipam_type:
        from netagent.cni.ipam import Store

        with Store(cfg.data_dir) as store:
            store.release(env.container_id, env.ifname)
        return
    exec_delegate(cfg, env, "DEL", _delegate_config(cfg, sub), timeout)


def _ipam_del_quiet(cfg: Config, env: Env, sub: SubnetEnv | None, timeout: float) -> None:
    try:
        ipam_del(cfg, env, sub, timeout)
    except Exception as e:  # noqa: BLE001 - rollback is best effort, the first error wins
        _log(f"rollback: IPAM release failed: {e}")


# --------------------------------------------------------------------------- kernel


class Namespaces:
    """Netlink sockets for the host namespace and (optionally) the container's.

    The process enters the container namespace only long enough to open a socket there; the
    socket stays bound to that namespace, so every later call is a plain send/recv.
    """

    def __init__(self, netns_path: str) -> None:
        from netagent.cni.fast import setns
        from netagent.cni.link import Netlink

        self.host: Netlink = Netlink()
        self.cont: Netlink | None = None
        self.netns_fd = -1
        if not netns_path:
            return
        try:
            self.netns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise CniError(INVALID_ENV, f"failed to open netns {netns_path!r}: {e.strerror}",
                           "CNI_NETNS") from None
        host_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                setns(self.netns_fd)
            except OSError as e:
                raise CniError(INVALID_ENV, f"{netns_path!r} is not a network namespace: "
                               f"{e.strerror}", "CNI_NETNS") from None
            try:
                self.cont = Netlink()
            finally:
                setns(host_fd)
        finally:
            os.close(host_fd)

    def close(self) -> None:
        self.host.close()
        if self.cont is not None:
            self.cont.close()
        if self.netns_fd >= 0:
            os.close(self.netns_fd)


def _write_sysctl(path: str, value: str) -> bool:
    """Set a /proc/sys knob of the current (host) namespace if it differs; False on failure.

    Read first: most calls find the value already set, and a read is cheaper than a write
    that the kernel turns into a notifier chain.
    """
    try:
        with open(path) as f:
            if f.read().strip() == value:
                return True
        with open(path, "w") as f:
            f.write(value)
        return True
    except OSError as e:
        _log(f"cannot set {path} to {value}: {e}")
        return False


def _bridge_mac(sub: SubnetEnv) -> str:
    """0a:58 + four bytes naming the gateway: locally administered, stable across re-creation.

    The IPv4 gateway's bytes, as before; an IPv6-only network hashes its gateway instead
    (every host's is ``…::1``, so its low bytes would name nothing).
    """
    if sub.v4 is not None:
        low = f"{sub.v4.gateway:08x}"
    else:
        low = digest(sub.primary.gateway_ip)[:8]
    return "0a:58:" + ":".join(low[i:i + 2] for i in range(0, 8, 2))


def _ensure_bridge(nl: Netlink, name: str, sub: SubnetEnv, mtu: int) -> Any:
    """Create (or adopt) the bridge with one gateway address per family; safe when ADDs race."""
    import errno

    from netagent.cni.link import NetlinkError

    br = nl.link(name)
    created = False
    if br is None:
        created = True
        try:
            nl.add_bridge(name, _bridge_mac(sub))
        except NetlinkError as e:
            if e.errno != errno.EEXIST:
                raise
        br = nl.link(name)
        if br is None:
            raise CniError(INTERNAL, f"bridge {name} vanished after creation")
    if br.kind != "bridge":
        raise CniError(INVALID_CONFIG, f"{name} exists and is not a bridge (kind {br.kind!r})")
    have = set(nl.addrs(br.index))
    for fam in sub.families:
        if (fam.gateway_ip, fam.plen) in have:
            continue
        if fam.version == 6:
            # the gateway must answer at once: no DAD on the bridge (its link-local address
            # included), and IPv6 must be on for it (EACCES when disable_ipv6=1)
            conf = f"/proc/sys/net/ipv6/conf/{name}"
            _write_sysctl(f"{conf}/accept_dad", "0")
            _write_sysctl(f"{conf}/disable_ipv6", "0")
        try:
            nl.add_addr(br.index, fam.gateway_ip, fam.plen, nodad=True)
        except NetlinkError as e:
            if e.errno != errno.EEXIST:
                raise
    if created or br.mtu != mtu or not br.up:
        # setting the MTU after creation pins it (the kernel otherwise follows its ports and
        # falls back to 1500 when the last one leaves)
        nl.set_link(br.index, up=True, mtu=mtu)
    if created:
        # routed pods attached before the bridge existed: their ADD found no bridge to answer
        # ARP/NDP on (a routed ADD adds its host route before it looks, so one of the two
        # always sees the other)
        routed = _routed_pod_ips(nl, sub)
        if routed:
            _proxy_on_bridge(nl, br, routed, [])
    return br


def _enable_forwarding(sub: SubnetEnv) -> None:
    """The bridge is the pods' gateway, so the host must forward each family it carries
    (bridge's isGateway does the same). IPv6 forwarding on ``all`` also makes the host stop
    accepting router advertisements on interfaces with accept_ra=1; hosts configured by SLAAC
    need accept_ra=2 on their uplink, as with the reference bridge plugin."""
    if sub.v4 is not None:
        _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
    if sub.v6 is not None:
        _write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")


def _container_routes(cfg: Config, sub: SubnetEnv, leases: list[IpamLease]
                      ) -> list[dict[str, Any]]:
    """Per family: the delegate's routes, else a default route (or, when the pod's default
    route belongs to another interface, one to the overlay network) via the bridge."""
    out: list[dict[str, Any]] = []
    for lease in leases:
        if lease.routes:
            out += [{"dst": str(r["dst"]), "gw": str(r.get("gw") or lease.gateway)}
                    for r in lease.routes if r.get("dst")]
            continue
        fam = sub.family(lease.version)
        assert fam is not None
        dst = fam.default_dst if cfg.is_default_gateway else fam.network_cidr
        out.append({"dst": dst, "gw": lease.gateway})
    return out


# --------------------------------------------------------------------------- verbs


def cmd_add(cfg: Config, env: Env, deadline_left: float) -> dict[str, Any]:
    from netagent.cni.link import NetlinkError
    from netagent.cni.subnet import read_subnet_env

    sub = read_subnet_env(cfg.subnet_file, cfg.subnet_wait)
    mtu = cfg.mtu or sub.mtu
    ns = Namespaces(env.netns)
    assert ns.cont is not None
    undo: list[tuple[str, Any]] = []
    try:
        if ns.cont.link(env.ifname) is not None:
            raise CniError(INTERFACE_EXISTS,
                           f"container interface {env.ifname} already exists in {env.netns}")
        leases = ipam_add(cfg, env, sub, deadline_left)
        created = [lease.ip for lease in leases if lease.created]
        if created:
            # only what this call reserved: an older reservation of the attachment stays
            undo.append(("ipam", created))
        attach = _attach_routed if cfg.mode == "routed" else _attach_bridged
        interfaces, ips, routes = attach(cfg, env, sub, ns, leases, mtu, undo)
        v4 = next((lease for lease in leases if lease.version == 4), None)
        if cfg.masq_enabled(sub) and v4 is not None and sub.v4 is not None:
            # IPv4 only for now: pods keep their IPv6 source address. ip6tables would work the
            # same way (chain per pod, ``! -d ff00::/8``), but DEL finds the jump by listing
            # POSTROUTING, which would double its iptables execs for every pod.
            from netagent.cni import masq

            undo.append(("masq", None))
            masq.add(cfg.name, env.container_id, env.ifname, v4.ip, sub.v4.network_cidr)
        return render_result(cfg.version, cfg.prev, interfaces, ips, routes,
                             cfg.dns or leases[0].dns)
    except BaseException as exc:
        _disarm_deadline()
        _rollback(undo, cfg, env, sub, ns)
        if isinstance(exc, NetlinkError):
            raise CniError(INTERNAL, f"netlink: {exc.strerror}", str(exc)) from None
        raise
    finally:
        ns.close()


def _add_veth(ns: Namespaces, env: Env, mtu: int, undo: list[tuple[str, Any]]
              ) -> tuple[Link, Link]:
    """The pod's veth pair, (host end, container end); a host end left by an earlier
    attachment of the same IDs is replaced."""
    import errno

    from netagent.cni.link import NetlinkError

    assert ns.cont is not None
    hname = host_veth_name(env.container_id, env.ifname)
    if ns.host.del_link_by_name(hname):
        _log(f"removed stale host veth {hname} of an earlier attachment")
    try:
        ns.host.add_veth(hname, env.ifname, ns.netns_fd, mtu)
    except NetlinkError as e:
        if e.errno == errno.EEXIST:
            raise CniError(INTERFACE_EXISTS, f"container interface {env.ifname} already "
                           f"exists in {env.netns}") from None
        raise
    undo.append(("veth", hname))
    hv = ns.host.link(hname)
    if hv is None:
        raise CniError(INTERNAL, f"host veth {hname} vanished after creation")
    cv = ns.cont.link(env.ifname)
    if cv is None:
        raise CniError(INTERNAL, f"container veth {env.ifname} vanished after creation")
    return hv, cv


def _add_pod_addrs(cont: Netlink, env: Env, cv: Link, leases: list[IpamLease],
                   host_prefix: bool) -> None:
    """One address per lease on the pod interface: with the subnet's prefix length, or as a
    single host (/32, /128) with ``host_prefix``."""
    import errno

    from netagent.cni.link import NetlinkError

    for lease in leases:
        plen = _host_plen(lease.version) if host_prefix else lease.plen
        try:
            # IPv6 without DAD: usable the moment ADD returns (the reference bridge
            # waits ~1 s for DAD to settle instead)
            cont.add_addr(cv.index, lease.ip, plen, nodad=True)
        except NetlinkError as e:
            if e.errno == errno.EACCES and lease.version == 6:
                raise CniError(INTERNAL, f"cannot add {lease.ip}/{plen} to "
                               f"{env.ifname}: IPv6 is disabled in {env.netns} "
                               "(net.ipv6.conf.*.disable_ipv6=1)") from None
            raise


def _add_pod_routes(cont: Netlink, cv: Link, routes: list[dict[str, Any]]) -> None:
    import errno

    from netagent.cni.link import NetlinkError

    for r in routes:
        dst_version, dst_int, dst_plen = parse_cidr_any(r["dst"])
        try:
            cont.add_route(format_ip(dst_version, dst_int), dst_plen, r["gw"], cv.index)
        except NetlinkError as e:
            if e.errno != errno.EEXIST:
                raise


def _host_plen(version: int) -> int:
    return 128 if version == 6 else 32


def _attach_bridged(cfg: Config, env: Env, sub: SubnetEnv, ns: Namespaces,
                    leases: list[IpamLease], mtu: int, undo: list[tuple[str, Any]]
                    ) -> Attachment:
    """Bridge mode: the host end is a port of the bridge, which holds each family's gateway."""
    assert ns.cont is not None
    br = _ensure_bridge(ns.host, cfg.bridge, sub, mtu)
    _enable_forwarding(sub)
    hv, cv = _add_veth(ns, env, mtu, undo)
    ns.host.set_link(hv.index, master=br.index, up=True)
    if cfg.hairpin:
        ns.host.set_hairpin(hv.index, True)
    _add_pod_addrs(ns.cont, env, cv, leases, host_prefix=False)
    ns.cont.set_link(cv.index, up=True)
    routes = _container_routes(cfg, sub, leases)
    _add_pod_routes(ns.cont, cv, routes)
    br = ns.host.link(cfg.bridge) or br
    interfaces = [
        {"name": br.name, "mac": br.mac},
        {"name": hv.name, "mac": hv.mac},
        {"name": cv.name, "mac": cv.mac, "sandbox": env.netns, "mtu": mtu},
    ]
    ips = [{"address": f"{lease.ip}/{lease.plen}", "gateway": lease.gateway,
            "interface": 2} for lease in leases]
    return interfaces, ips, routes


def _attach_routed(cfg: Config, env: Env, sub: SubnetEnv, ns: Namespaces,
                   leases: list[IpamLease], mtu: int, undo: list[tuple[str, Any]]
                   ) -> Attachment:
    """Routed mode: no bridge, everything on the veth pair (so deleting it undoes it all).

    Pod: its address as a single host, a link route to the gateway (held by no host device)
    and a permanent neighbour gateway → host end's MAC, then the usual routes via the
    gateway. Host: a link route to the pod on the host end (:data:`POD_ROUTE_PROTO`) and a
    permanent neighbour pod → pod MAC. Neither side ever sends ARP or NDP.
    """
    import errno

    from netagent.cni.link import RT_SCOPE_LINK, NetlinkError

    assert ns.cont is not None
    _enable_forwarding(sub)
    hv, cv = _add_veth(ns, env, mtu, undo)
    if sub.v6 is not None:
        # the host end receives the pod's IPv6 packets: IPv6 must be on there (a host may
        # default new links to disable_ipv6=1)
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{hv.name}/disable_ipv6", "0")
    ns.host.set_link(hv.index, up=True)
    _add_pod_addrs(ns.cont, env, cv, leases, host_prefix=True)
    ns.cont.set_link(cv.index, up=True)
    for lease in leases:
        # the gateway first: a route via it needs it on-link
        ns.cont.add_route(lease.gateway, _host_plen(lease.version), "", cv.index,
                          scope=RT_SCOPE_LINK)
        ns.cont.add_neigh(cv.index, lease.gateway, hv.mac)
    routes = _container_routes(cfg, sub, leases)
    _add_pod_routes(ns.cont, cv, routes)
    for lease in leases:
        plen = _host_plen(lease.version)
        try:
            ns.host.add_route(lease.ip, plen, "", hv.index, scope=RT_SCOPE_LINK,
                              proto=POD_ROUTE_PROTO)
        except NetlinkError as e:
            if e.errno != errno.EEXIST:
                raise
            raise CniError(ADDRESS_UNAVAILABLE, f"the host already has a route to "
                           f"{lease.ip}/{plen}: in use outside this plugin's IPAM") from None
        ns.host.add_neigh(hv.index, lease.ip, cv.mac, protocol=POD_ROUTE_PROTO)
    br = ns.host.link(cfg.bridge)
    if br is not None and br.kind == "bridge":
        _proxy_on_bridge(ns.host, br, [lease.ip for lease in leases], undo)
    interfaces: list[dict[str, Any]] = [
        {"name": hv.name, "mac": hv.mac},
        {"name": cv.name, "mac": cv.mac, "sandbox": env.netns, "mtu": mtu},
    ]
    ips: list[dict[str, Any]] = [
        {"address": f"{lease.ip}/{_host_plen(lease.version)}", "gateway": lease.gateway,
         "interface": 1} for lease in leases]
    return interfaces, ips, routes


def _proxy_on_bridge(nl: Netlink, br: Link, ips: list[str], undo: list[tuple[str, Any]]
                     ) -> None:
    """Let bridge-mode pods reach routed pods of the same subnet on this host.

    A bridge pod holds the whole subnet on-link, so for a routed pod's address it asks ARP or
    NDP on the bridge, where no pod answers. The host answers instead (with the bridge's MAC)
    and then routes by the /32 (/128): proxy ARP for IPv4, which answers for any address the
    host routes out of another link; for IPv6, which has no such catch-all, a proxy entry per
    address, marked :data:`POD_ROUTE_PROTO` so DEL and GC can sweep the ones whose pod is
    gone. No delay before answering (the kernel's default is a random wait up to 0.8 s).
    """
    if any(":" not in ip for ip in ips):
        _write_sysctl(f"/proc/sys/net/ipv4/conf/{br.name}/proxy_arp", "1")
        _write_sysctl(f"/proc/sys/net/ipv4/neigh/{br.name}/proxy_delay", "0")
    v6 = [ip for ip in ips if ":" in ip]
    if v6:
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{br.name}/proxy_ndp", "1")
        _write_sysctl(f"/proc/sys/net/ipv6/neigh/{br.name}/proxy_delay", "0")
    for ip in v6:
        nl.add_neigh(br.index, ip, proxy=True, protocol=POD_ROUTE_PROTO)
        undo.append(("proxy", (br.index, ip)))


def _routed_pod_ips(nl: Netlink, sub: SubnetEnv) -> list[str]:
    """Addresses of this subnet's routed pods on this host, from their host routes."""
    from netagent.cni.link import RT_TABLE_MAIN

    out = []
    for r in nl.routes():
        if r.proto != POD_ROUTE_PROTO or r.table != RT_TABLE_MAIN:
            continue
        version, value, plen = parse_cidr_any(r.dst)
        fam = sub.family(version)
        if (fam is not None and plen == _host_plen(version)
                and value & netmask_any(version, fam.plen) == fam.subnet):
            out.append(format_ip(version, value))
    return out


def _sweep_bridge_proxies(nl: Netlink, bridge: str) -> None:
    """Remove our IPv6 proxy entries on the bridge whose routed pod is gone (its /128 host
    route went with its veth); entries we did not mark are left alone. Stale ones matter: the
    host would keep answering for an address IPAM may give to a bridge pod next."""
    from netagent.cni.link import AF_INET6

    br = nl.link(bridge)
    if br is None:
        return
    ours = [n for n in nl.neighs(br.index, AF_INET6, proxy=True)
            if n.protocol == POD_ROUTE_PROTO]
    if not ours:
        return
    live = {r.dst.partition("/")[0] for r in nl.routes(AF_INET6)
            if r.proto == POD_ROUTE_PROTO and r.dst.endswith("/128")}
    for n in ours:
        if n.ip not in live:
            nl.del_neigh(br.index, n.ip, proxy=True)


def _rollback(undo: list[tuple[str, Any]], cfg: Config, env: Env, sub: SubnetEnv,
              ns: Namespaces) -> None:
    """Undo a failed ADD in reverse order; each step is independent and best effort."""
    for kind, arg in reversed(undo):
        try:
            if kind == "masq":
                from netagent.cni import masq

                masq.delete(cfg.name, env.container_id, env.ifname)
            elif kind == "veth":
                ns.host.del_link_by_name(arg)  # takes the container end with it
            elif kind == "proxy":
                ns.host.del_neigh(arg[0], arg[1], proxy=True)
            elif kind == "ipam" and cfg.ipam_type:
                ipam_del(cfg, env, sub, 10.0)
            elif kind == "ipam":
                from netagent.cni.ipam import Store

                with Store(cfg.data_dir) as store:
                    for ip in arg:
                        store.release_ip(ip)
        except Exception as e:  # noqa: BLE001
            _log(f"rollback of {kind} failed: {e}")


def cmd_del(cfg: Config, env: Env, deadline_left: float) -> None:
    """Best effort, idempotent: every step runs even if an earlier one failed."""
    from netagent.cni.link import Netlink
    from netagent.cni.subnet import read_subnet_env

    sub: SubnetEnv | None
    try:
        sub = read_subnet_env(cfg.subnet_file, 0)
    except CniError:
        sub = None
    errors: list[CniError] = []
    if cfg.masq_enabled(sub):
        try:
            from netagent.cni import masq

            masq.delete(cfg.name, env.container_id, env.ifname)
        except Exception as e:  # noqa: BLE001
            errors.append(e if isinstance(e, CniError) else CniError(INTERNAL, str(e)))
    try:
        with Netlink() as nl:
            nl.del_link_by_name(host_veth_name(env.container_id, env.ifname))
            try:
                # a routed pod's routes and neighbours went with its veth; its IPv6 proxy
                # entry on the bridge did not. Whatever the mode now: it may have changed
                # since ADD. A failure is only logged: the pod is gone, the next DEL sweeps.
                _sweep_bridge_proxies(nl, cfg.bridge)
            except OSError as e:
                _log(f"cannot sweep proxy entries on {cfg.bridge}: {e}")
    except OSError as e:
        errors.append(CniError(INTERNAL, f"netlink: {e.strerror}"))
    try:
        ipam_del(cfg, env, sub, deadline_left)
    except CniError as e:
        errors.append(e)
    if errors:
        # the kernel side is gone; only report what the runtime may want to retry
        raise errors[0]


def cmd_check(cfg: Config, env: Env, deadline_left: float) -> None:
    from netagent.cni.subnet import read_subnet_env

    prev = cfg.prev
    if not prev:
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult")
    sub = read_subnet_env(cfg.subnet_file, 0)
    ifaces = prev.get("interfaces") or []
    idx = next((i for i, it in enumerate(ifaces)
                if it.get("name") == env.ifname and it.get("sandbox")), None)
    if idx is None:
        raise CniError(CHECK_FAILED, f"prevResult has no interface {env.ifname} in a sandbox")
    ns = Namespaces(env.netns)
    assert ns.cont is not None
    try:
        cv = ns.cont.link(env.ifname)
        if cv is None:
            raise CniError(CHECK_FAILED, f"interface {env.ifname} not found in {env.netns}")
        want_mac = str(ifaces[idx].get("mac") or "").lower()
        if want_mac and cv.mac != want_mac:
            raise CniError(CHECK_FAILED, f"{env.ifname} has MAC {cv.mac}, expected {want_mac}")
        if not cv.up:
            raise CniError(CHECK_FAILED, f"{env.ifname} is down")
        have = {f"{ip}/{plen}" for ip, plen in ns.cont.addrs(cv.index)}
        mine = [ip for ip in prev.get("ips") or [] if ip.get("interface") == idx]
        if not mine:
            raise CniError(CHECK_FAILED, f"prevResult has no address for {env.ifname}")
        gw_default: dict[int, str] = {}
        for ip in mine:
            try:
                addr = normalize_cidr(str(ip.get("address", "")))
            except ValueError:
                raise CniError(CHECK_FAILED, "prevResult has a malformed address",
                               str(ip.get("address"))) from None
            if addr not in have:
                raise CniError(CHECK_FAILED, f"address {ip['address']} not on {env.ifname}")
            version = ip_version(addr)
            fam = sub.family(version)
            gw_default.setdefault(version, str(ip.get("gateway")
                                               or (fam.gateway_ip if fam else "")))
        routes = ns.cont.routes()
        for r in prev.get("routes") or []:
            try:
                dst = normalize_cidr(str(r.get("dst", "")))
            except ValueError:
                raise CniError(CHECK_FAILED, "prevResult has a malformed route",
                               str(r.get("dst"))) from None
            gw = str(r.get("gw") or gw_default.get(ip_version(dst), ""))
            if gw:
                gw = format_ip(*parse_ip_any(gw))
            if not any(x.dst == dst and x.oif == cv.index and x.gw in (gw, "")
                       for x in routes):
                raise CniError(CHECK_FAILED, f"route {dst} via {gw} not found in {env.netns}")
        hname = host_veth_name(env.container_id, env.ifname)
        hv = ns.host.link(hname)
        if cfg.mode == "routed":
            ips = [normalize_cidr(str(ip.get("address", ""))).partition("/")[0] for ip in mine]
            _check_routed(cfg, env, ns, cv, hv, hname, ips, gw_default, routes)
        else:
            br = ns.host.link(cfg.bridge)
            if hv is None or br is None or hv.master != br.index:
                raise CniError(CHECK_FAILED, f"host veth {hname} is not a port of {cfg.bridge}")
            if cfg.hairpin and not ns.host.hairpin(hv.index):
                raise CniError(CHECK_FAILED, f"hairpin mode is off on {hname}")
        if not cfg.ipam_type:
            from netagent.cni.ipam import Store

            with Store(cfg.data_dir) as store:
                held = {r.ip for r in store.owned(env.container_id, env.ifname)}
            for ip in mine:
                addr = normalize_cidr(str(ip.get("address", ""))).partition("/")[0]
                if addr not in held:
                    raise CniError(CHECK_FAILED, f"no IPAM reservation of {addr} for "
                                   f"{env.container_id}/{env.ifname}")
        else:
            exec_delegate(cfg, env, "CHECK", _delegate_config(cfg, sub), deadline_left)
    finally:
        ns.close()


def _check_routed(cfg: Config, env: Env, ns: Namespaces, cv: Link, hv: Link | None,
                  hname: str, ips: list[str], gateways: dict[int, str],
                  pod_routes: list[Any]) -> None:
    """What a routed ADD made besides addresses and prevResult's routes: the pod's link route
    and permanent neighbour for each gateway, the host's marked route and permanent
    neighbour for each address, and the proxy entries when the bridge exists."""
    from netagent.cni.link import AF_INET6, RT_TABLE_MAIN

    assert ns.cont is not None
    if hv is None:
        raise CniError(CHECK_FAILED, f"host veth {hname} not found")
    if not hv.up:
        raise CniError(CHECK_FAILED, f"host veth {hname} is down")
    pod_neigh = {n.ip: n for n in ns.cont.neighs(cv.index)}
    for version, gw in gateways.items():
        if not gw:
            continue
        gw = format_ip(*parse_ip_any(gw))
        dst = f"{gw}/{_host_plen(version)}"
        if not any(r.dst == dst and r.oif == cv.index and not r.gw for r in pod_routes):
            raise CniError(CHECK_FAILED, f"route to the gateway {dst} not found on "
                           f"{env.ifname} in {env.netns}")
        n = pod_neigh.get(gw)
        if n is None or not n.permanent or n.mac != hv.mac:
            raise CniError(CHECK_FAILED, f"permanent neighbour {gw} lladdr {hv.mac} not found "
                           f"on {env.ifname} in {env.netns}")
    host_routes = ns.host.routes()
    host_neigh = {n.ip: n for n in ns.host.neighs(hv.index)}
    for ip in ips:
        dst = f"{ip}/{_host_plen(ip_version(ip))}"
        if not any(r.dst == dst and r.oif == hv.index and r.proto == POD_ROUTE_PROTO
                   and r.table == RT_TABLE_MAIN for r in host_routes):
            raise CniError(CHECK_FAILED, f"host route {dst} dev {hname} proto "
                           f"{POD_ROUTE_PROTO} not found")
        n = host_neigh.get(ip)
        if n is None or not n.permanent or n.mac != cv.mac:
            raise CniError(CHECK_FAILED, f"permanent neighbour {ip} lladdr {cv.mac} not found "
                           f"on {hname}")
    br = ns.host.link(cfg.bridge)
    if br is None or br.kind != "bridge":
        return
    proxies = {n.ip for n in ns.host.neighs(br.index, AF_INET6, proxy=True)}
    for ip in ips:
        if ":" in ip and ip not in proxies:
            raise CniError(CHECK_FAILED, f"proxy entry for {ip} not found on {cfg.bridge} "
                           "(bridge-mode pods cannot reach this pod)")


def _attachments(raw: dict[str, Any]) -> set[tuple[str, str]]:
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        items = raw.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            raise CniError(INVALID_CONFIG, f"{key} must be a list")
        out = set()
        for it in items:
            if not isinstance(it, dict):
                raise CniError(INVALID_CONFIG, f"{key} entries must be objects")
            out.add((str(it.get("containerID", "")), str(it.get("ifname", ""))))
        return out
    raise CniError(INVALID_CONFIG, "GC needs cni.dev/valid-attachments")


def cmd_gc(cfg: Config, env: Env, deadline_left: float) -> None:
    from netagent.cni.link import Netlink
    from netagent.cni.subnet import read_subnet_env

    valid = _attachments(cfg.raw)
    try:
        sub: SubnetEnv | None = read_subnet_env(cfg.subnet_file, 0)
    except CniError:
        sub = None
    if cfg.ipam_type:
        exec_delegate(cfg, env, "GC", _delegate_config(cfg, sub), deadline_left)
        return
    from netagent.cni.ipam import Store

    with Store(cfg.data_dir) as store:
        stale = store.gc(valid)
    if not stale:
        return
    with Netlink() as nl:
        for r in stale:
            try:
                nl.del_link_by_name(host_veth_name(r.container_id, r.ifname))
            except OSError as e:
                _log(f"GC: cannot delete host veth of {r.container_id}: {e}")
        try:
            _sweep_bridge_proxies(nl, cfg.bridge)
        except OSError as e:
            _log(f"GC: cannot sweep proxy entries on {cfg.bridge}: {e}")
    if cfg.masq_enabled(sub):
        from netagent.cni import masq

        for r in stale:
            try:
                masq.delete(cfg.name, r.container_id, r.ifname)
            except Exception as e:  # noqa: BLE001 - GC goes on past errors
                _log(f"GC: cannot delete masquerade chain of {r.container_id}: {e}")


def cmd_status(cfg: Config, env: Env, deadline_left: float) -> None:
    from netagent.cni.subnet import read_subnet_env

    try:
        read_subnet_env(cfg.subnet_file, 0)
    except CniError as e:
        raise CniError(NOT_AVAILABLE, f"netagent cannot serve ADD: {e.msg}", e.details) from None
    if cfg.ipam_type:
        exec_delegate(cfg, env, "STATUS", _delegate_config(cfg, None), deadline_left)


VERBS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status}


# --------------------------------------------------------------------------- entry point


class _Deadline(BaseException):
    """Raised from SIGALRM; a BaseException so no ``except Exception`` swallows it."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _Deadline()


def _arm_deadline(seconds: float) -> None:
    try:
        import _signal as sig
    except ImportError:  # pragma: no cover
        import signal as sig  # type: ignore[no-redef]
    sig.signal(SIGALRM, _on_alarm)
    sig.setitimer(0, seconds)  # ITIMER_REAL


def _disarm_deadline() -> None:
    try:
        import _signal as sig
    except ImportError:  # pragma: no cover
        import signal as sig  # type: ignore[no-redef]
    sig.setitimer(0, 0)


def _remaining(start: float, total: float) -> float:
    import time

    return max(total - (time.monotonic() - start), 0.5)


def run(environ: dict[str, str] | os._Environ[str], stdin: str) -> dict[str, Any] | None:
    """One plugin call: returns the object to print (None for no output) or raises CniError."""
    import time

    env = Env(environ)
    if not env.command:
        raise CniError(INVALID_ENV, "required env variables [CNI_COMMAND] missing")
    if env.command == "VERSION":
        version = LATEST
        if stdin.strip():
            try:
                doc = loads(stdin)
            except ValueError as e:
                raise CniError(DECODE, f"error decoding version request: {e}") from None
            if isinstance(doc, dict) and isinstance(doc.get("cniVersion"), str):
                version = doc["cniVersion"]
        return {"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}
    verb = VERBS.get(env.command)
    if verb is None:
        raise CniError(INVALID_ENV, f"unknown CNI_COMMAND: {env.command}")
    try:
        raw = loads(stdin)
    except ValueError as e:
        raise CniError(DECODE, f"error decoding network config: {e}") from None
    if not isinstance(raw, dict):
        raise CniError(DECODE, "network config must be a JSON object")
    env.validate()
    cfg = Config(raw)
    start = time.monotonic()
    _arm_deadline(cfg.timeout)
    try:
        return verb(cfg, env, _remaining(start, cfg.timeout))  # type: ignore[no-any-return,operator]
    except _Deadline:
        raise CniError(TRY_AGAIN_LATER, f"{env.command} did not finish within "
                       f"{cfg.timeout:g} s", "deadline") from None
    finally:
        _disarm_deadline()


def _error_version(stdin: str) -> str:
    try:
        doc = loads(stdin)
        if isinstance(doc, dict) and isinstance(doc.get("cniVersion"), str):
            return doc["cniVersion"]
    except ValueError:
        pass
    return LATEST


def main() -> int:
    """Console entry point: never lets a traceback reach stdout, always CNI-shaped."""
    stdin = ""
    try:
        if os.environ.get("CNI_COMMAND") != "VERSION" or not sys.stdin.isatty():
            stdin = sys.stdin.buffer.read().decode("utf-8", errors="replace") \
                if sys.stdin is not None else ""
        out = run(os.environ, stdin)
    except CniError as e:
        sys.stdout.write(dumps(e.to_json(_error_version(stdin))))
        sys.stdout.flush()
        return 1
    except BaseException as e:  # noqa: BLE001 - the runtime must get JSON, whatever happened
        import traceback

        traceback.print_exc(file=sys.stderr)
        err = CniError(INTERNAL, f"internal error: {type(e).__name__}: {e}")
        sys.stdout.write(dumps(err.to_json(_error_version(stdin))))
        sys.stdout.flush()
        return 1
    if out is not None:
        sys.stdout.write(dumps(out))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
