"""The plugin's verbs: ADD, DEL, CHECK, GC and STATUS (VERSION is the skeleton's).

Each verb composes the pieces: subnet.env (``cni.subnet``), addresses (``cni.ipamcall``), the
attach strategy of the config's mode (``cni.attach``) and masquerade (``cni.masq``). The
rules they keep:

- every failure is a CNI error; a failed ADD undoes what it did (veth, reservation,
  masquerade, proxy entries) before answering, in reverse order, each step best effort;
- DEL needs nothing but the container ID and ifname: the host veth name and the masquerade
  chain are derived from them, so DEL works without the netns, prevResult or subnet.env;
- every address family in subnet.env (IPv4, IPv6 or both) gets one pod address, routes and an
  entry in ``ips[]``; IPAM reserves both families or neither.
"""

from __future__ import annotations

from netagent.cni.attach import STRATEGIES, Namespaces, sweep_bridge_proxies
from netagent.cni.conf import host_veth_name
from netagent.cni.errors import (
    CHECK_FAILED,
    INTERFACE_EXISTS,
    INTERNAL,
    INVALID_CONFIG,
    NOT_AVAILABLE,
    CniError,
)
from netagent.cni.fast import format_ip, ip_version, normalize_cidr, parse_ip_any
from netagent.cni.ipamcall import ipam_add, ipam_check, ipam_del, ipam_gc, ipam_status, ipam_undo
from netagent.cni.skel import disarm_deadline, log, render_result

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from netagent.cni.conf import Config
    from netagent.cni.skel import Env, Verb
    from netagent.cni.subnet import SubnetEnv

def cmd_add(cfg: Config, env: Env, deadline_left: float) -> dict[str, Any]:
    """Attach the pod (addresses, strategy, masquerade) and answer the result; all or nothing."""
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
        attach = STRATEGIES[cfg.mode][0]
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
        disarm_deadline()
        _rollback(undo, cfg, env, sub, ns)
        if isinstance(exc, NetlinkError):
            raise CniError(INTERNAL, f"netlink: {exc.strerror}", str(exc)) from None
        raise
    finally:
        ns.close()


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
            elif kind == "ipam":
                ipam_undo(cfg, env, sub, arg)
        except Exception as e:  # noqa: BLE001
            log(f"rollback of {kind} failed: {e}")


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
                sweep_bridge_proxies(nl, cfg.bridge)
            except OSError as e:
                log(f"cannot sweep proxy entries on {cfg.bridge}: {e}")
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
    """prevResult against the kernel and the IPAM: the first difference is code 102."""
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
        addrs = [normalize_cidr(str(ip.get("address", ""))).partition("/")[0] for ip in mine]
        check = STRATEGIES[cfg.mode][1]
        check(cfg, env, ns, cv, ns.host.link(hname), hname, addrs, gw_default, routes)
        ipam_check(cfg, env, sub, addrs, deadline_left)
    finally:
        ns.close()


def _attachments(raw: dict[str, Any]) -> set[tuple[str, str]]:
    """GC's live attachments: the 1.1.0 text names the key ``cni.dev/attachments``, libcni
    sends ``cni.dev/valid-attachments`` too; either is read."""
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
    """Free reservations of attachments the runtime no longer lists, and their host side."""
    from netagent.cni.link import Netlink
    from netagent.cni.subnet import read_subnet_env

    valid = _attachments(cfg.raw)
    try:
        sub: SubnetEnv | None = read_subnet_env(cfg.subnet_file, 0)
    except CniError:
        sub = None
    stale = ipam_gc(cfg, env, sub, valid, deadline_left)
    if not stale:
        return
    with Netlink() as nl:
        for r in stale:
            try:
                nl.del_link_by_name(host_veth_name(r.container_id, r.ifname))
            except OSError as e:
                log(f"GC: cannot delete host veth of {r.container_id}: {e}")
        try:
            sweep_bridge_proxies(nl, cfg.bridge)
        except OSError as e:
            log(f"GC: cannot sweep proxy entries on {cfg.bridge}: {e}")
    if cfg.masq_enabled(sub):
        from netagent.cni import masq

        for r in stale:
            try:
                masq.delete(cfg.name, r.container_id, r.ifname)
            except Exception as e:  # noqa: BLE001 - GC goes on past errors
                log(f"GC: cannot delete masquerade chain of {r.container_id}: {e}")


def cmd_status(cfg: Config, env: Env, deadline_left: float) -> None:
    """Code 50 while ADD cannot be served (no subnet.env yet)."""
    from netagent.cni.subnet import read_subnet_env

    try:
        read_subnet_env(cfg.subnet_file, 0)
    except CniError as e:
        raise CniError(NOT_AVAILABLE, f"netagent cannot serve ADD: {e.msg}", e.details) from None
    ipam_status(cfg, env, deadline_left)


VERBS: dict[str, Verb] = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc,
                          "STATUS": cmd_status}
