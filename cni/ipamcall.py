"""Where a pod's addresses come from: the built-in host-local store or the IPAM plugin named
by ``ipam.type`` (run as a delegate, spec §IPAM), behind one set of calls per verb.

Every "built-in or delegate?" decision lives here, so the verbs read the same for both, and a
delegate gets the same environment and whole config whichever verb calls it.
"""

from __future__ import annotations

import os

from netagent.cni.errors import (
    ADDRESS_UNAVAILABLE,
    CHECK_FAILED,
    DECODE,
    INTERNAL,
    INVALID_CONFIG,
    INVALID_ENV,
    TRY_AGAIN_LATER,
    CniError,
)
from netagent.cni.fast import dumps, format_ip, ip_version, loads, parse_cidr_any
from netagent.cni.skel import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from netagent.cni.conf import Config
    from netagent.cni.ipam import Reservation
    from netagent.cni.skel import Env
    from netagent.cni.subnet import SubnetEnv

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
    """The delegate's executable in ``CNI_PATH`` (a name only: a path would escape it)."""
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
        from netagent.cni.ipam import Pool
        from netagent.cni.ipamdisk import Store

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
        ipam_del_quiet(cfg, env, sub, timeout)
        raise CniError(INVALID_CONFIG, f"IPAM plugin {cfg.ipam_type} returned no "
                       + " and no ".join(f"IPv{v}" for v in missing) + " address")
    return [leases[f.version] for f in sub.families]


def ipam_del(cfg: Config, env: Env, sub: SubnetEnv | None, timeout: float) -> None:
    """Free every address of the attachment (DEL): idempotent in both stores."""
    if not cfg.ipam_type:
        from netagent.cni.ipamdisk import Store

        with Store(cfg.data_dir) as store:
            store.release(env.container_id, env.ifname)
        return
    exec_delegate(cfg, env, "DEL", _delegate_config(cfg, sub), timeout)


def ipam_del_quiet(cfg: Config, env: Env, sub: SubnetEnv | None, timeout: float) -> None:
    """:func:`ipam_del` for a rollback, where an earlier error is the one to report."""
    try:
        ipam_del(cfg, env, sub, timeout)
    except Exception as e:  # noqa: BLE001 - rollback is best effort, the first error wins
        log(f"rollback: IPAM release failed: {e}")


def ipam_undo(cfg: Config, env: Env, sub: SubnetEnv, created: list[str]) -> None:
    """Give back what a failed ADD reserved: only the addresses this call created (an older
    reservation of the attachment stays); a delegate can only be asked to DEL them all."""
    if cfg.ipam_type:
        ipam_del(cfg, env, sub, 10.0)
        return
    from netagent.cni.ipamdisk import Store

    with Store(cfg.data_dir) as store:
        for ip in created:
            store.release_ip(ip)


def ipam_check(cfg: Config, env: Env, sub: SubnetEnv, addresses: list[str],
               timeout: float) -> None:
    """CHECK: every address of prevResult is still reserved for this attachment (built-in),
    or the delegate's own CHECK passes."""
    if cfg.ipam_type:
        exec_delegate(cfg, env, "CHECK", _delegate_config(cfg, sub), timeout)
        return
    from netagent.cni.ipamdisk import Store

    with Store(cfg.data_dir) as store:
        held = {r.ip for r in store.owned(env.container_id, env.ifname)}
    for addr in addresses:
        if addr not in held:
            raise CniError(CHECK_FAILED, f"no IPAM reservation of {addr} for "
                           f"{env.container_id}/{env.ifname}")


def ipam_gc(cfg: Config, env: Env, sub: SubnetEnv | None, valid: set[tuple[str, str]],
            timeout: float) -> list[Reservation]:
    """GC: free every reservation of an attachment not in ``valid``; the freed ones (whose
    host side the caller removes), or none when a delegate did the work."""
    if cfg.ipam_type:
        exec_delegate(cfg, env, "GC", _delegate_config(cfg, sub), timeout)
        return []
    from netagent.cni.ipamdisk import Store

    with Store(cfg.data_dir) as store:
        return store.gc(valid)


def ipam_status(cfg: Config, env: Env, timeout: float) -> None:
    """STATUS is passed on to a delegate (the built-in store is always available)."""
    if cfg.ipam_type:
        exec_delegate(cfg, env, "STATUS", _delegate_config(cfg, None), timeout)
