"""``netagent cleanup``: remove what netagent made on this host, and nothing else.

Operators decommissioning a host, or switching it back to flannel or to another CNI, need the
agent's leftovers gone: a stopped agent deliberately leaves its kernel state in place (pods keep
forwarding across restarts), so without this they are left deleting devices, routes and
iptables chains by hand, guessing which are ours.

Three parts, so the decision is testable without root:

* :func:`survey` reads the host: the link table, routes of proto 111 (the agent) and 112 (CNI
  routed pods) in the main table of both families, which address families hold our iptables
  chains, and the wireguard-go / BIRD processes the agent started (by their PID files in the
  state dir, each checked against its command line, as the backends check them).
* :func:`plan_cleanup` (pure) turns that :class:`HostView` into ordered :class:`Step` s:
  processes first (BIRD would re-add its routes; wireguard-go holds its TUN), then routes not on
  a device we delete, then our devices (their routes, neighbours and FDB entries go with them),
  the CNI bridge, iptables. What still serves a pod is kept and said so: the bridge while a
  port is attached, a routed pod's /32 while its veth exists.
* :func:`apply_steps` executes them: kernel work through :class:`~netagent.kernel.NetlinkKernel`
  (no ``ip`` commands), iptables through ``masq``. An entry already gone (ENOENT, ESRCH) counts
  as removed, so two cleanups racing, or a second run, end in the same state.

Ownership is by mark, never by guess: routes by proto (never another proto, never a blackhole of
someone else: ours carry proto 111), devices by flannel's names, chains by ``masq``'s names,
processes only when their command line names our device or our ``bird.conf``.

``--release-lease`` also deletes this host's lease key in etcd (found as the agent finds it:
by PublicIP, or PublicIPv6 on an IPv6-only network) and revokes its etcd lease; subnet.env then
names a subnet no longer ours, so it is removed too.

While an agent runs on the state dir (it holds ``<state-dir>/netagent.pid`` locked, see
:func:`netagent.files.take_run_lock`) cleanup refuses: the agent would put everything back.
A real run holds the same lock, so an agent started meanwhile waits instead of racing it.
"""

from __future__ import annotations

import errno
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from netagent.kernel import (
    RT_TABLE_MAIN,
    RTN_BLACKHOLE,
    RTPROT_NETAGENT,
    LinkSummary,
    NetlinkKernel,
    Op,
    Route,
)

#: a routed pod's host route (cni/conf.py POD_ROUTE_PROTO; the CNI package imports nothing of
#: the agent and the agent does not import the plugin's modules for one number)
RTPROT_CNI_POD = 112
#: our devices: vxlan (flannel.<VNI>, flannel-v6.<VNI>), udp's TUN, wireguard's two
OUR_DEVICE = re.compile(r"^(flannel\.\d+|flannel-v6\.\d+|flannel0|flannel-wg|flannel-wg-v6)$")
WG_DEVICES = ("flannel-wg", "flannel-wg-v6")

StepKind = Literal["stop-wireguard-go", "stop-bird", "route", "link", "iptables", "lease",
                   "file"]


@dataclass(frozen=True)
class Step:
    """One removal, described as an operator reads it (``--dry-run`` prints ``desc``)."""

    kind: StepKind
    desc: str
    target: Any = None


@dataclass(frozen=True)
class HostView:
    """What :func:`survey` found: everything :func:`plan_cleanup` decides on."""

    links: tuple[LinkSummary, ...] = ()
    #: proto 111 and 112 routes, main table, both families
    routes: tuple[Route, ...] = ()
    #: address families (4, 6) whose iptables hold our chains or hook rules
    iptables: tuple[int, ...] = ()
    #: (device, PID) of each wireguard-go we started and that still runs
    wireguard_go: tuple[tuple[str, int], ...] = ()
    #: PID of the BIRD we started (its command line names our bird.conf), if running
    bird: int | None = None
    #: the CNI bridge's name (the plugin's ``bridge``, default cni0)
    bridge: str = "cni0"


def plan_cleanup(view: HostView) -> tuple[list[Step], list[str]]:
    """(steps in the order they must run, notes on what is kept and why)."""
    steps: list[Step] = []
    kept: list[str] = []
    by_index = {link.index: link for link in view.links}
    ours = [link for link in view.links if OUR_DEVICE.match(link.name)]
    gone = {link.index for link in ours}
    bridge = next((link for link in view.links
                   if link.name == view.bridge and link.kind == "bridge"), None)
    ports = [link for link in view.links if bridge is not None and link.master == bridge.index]
    if bridge is not None and not ports:
        gone.add(bridge.index)
    if view.bird is not None:
        steps.append(Step("stop-bird", f"BIRD (PID {view.bird}, our bird.conf)", view.bird))
    for wg_dev, pid in view.wireguard_go:
        steps.append(Step("stop-wireguard-go", f"wireguard-go for {wg_dev} (PID {pid})",
                          (wg_dev, pid)))
    riding: dict[int, int] = {}
    for r in view.routes:
        if r.oif is not None and r.oif in gone:
            riding[r.oif] = riding.get(r.oif, 0) + 1
            continue  # goes with its device
        dev = by_index.get(r.oif) if r.oif is not None else None
        if r.proto == RTPROT_CNI_POD:
            if dev is not None and dev.kind == "veth":
                kept.append(f"route {r.dst} dev {dev.name} (proto 112): a routed pod still uses it")
                continue
        elif r.proto != RTPROT_NETAGENT:
            continue  # survey() only reads ours; a foreign route is never touched
        steps.append(Step("route", describe_route(r, dev), r))
    for link in ours:
        extra = _routes_note(riding.get(link.index, 0))
        steps.append(Step("link", f"device {link.name} ({link.kind or 'link'}){extra}", link))
    if bridge is not None:
        if ports:
            names = ", ".join(p.name for p in ports[:5]) + (" ..." if len(ports) > 5 else "")
            kept.append(f"bridge {bridge.name}: {len(ports)} pod interface(s) attached ({names})")
        else:
            extra = _routes_note(riding.get(bridge.index, 0))
            steps.append(Step("link", f"CNI bridge {bridge.name} (no pod attached){extra}",
                              bridge))
    for fam in sorted(view.iptables):
        steps.append(Step("iptables", f"IPv{fam} iptables chains FLANNEL-POSTRTG/FLANNEL-FWD "
                          "and their hook rules", fam))
    return steps, kept


def _routes_note(n: int) -> str:
    return "" if not n else f" and its {n} route{'s' if n != 1 else ''}"


def describe_route(r: Route, dev: LinkSummary | None) -> str:
    how = ("blackhole " if r.rtype == RTN_BLACKHOLE else "") + str(r.dst)
    if r.gateway is not None:
        how += f" via {r.gateway}"
    if r.oif is not None:
        how += f" dev {dev.name if dev else r.oif}"
    return f"route {how} proto {r.proto} metric {r.metric}"


# --------------------------------------------------------------------------- reading the host


def iptables_families(run: Callable[[list[str]], str] | None = None) -> tuple[int, ...]:
    """Families whose iptables hold our chains or hooks (none without the binaries)."""
    from netagent.masq import COMMANDS, parse_save, removal_text, run_command

    out = []
    for fam, cmds in sorted(COMMANDS.items()):
        if run is None and shutil.which(cmds.save) is None:
            continue
        text = (run or run_command)([cmds.save])
        if removal_text(parse_save(text)):
            out.append(fam)
    return tuple(out)


def survey(kernel: NetlinkKernel, state_dir: Path, bridge: str) -> HostView:
    """Read everything :func:`plan_cleanup` needs (reads only)."""
    from netagent.backends.bgp.supervisor import BirdSupervisor
    from netagent.backends.wireguard.wggo import WireguardGo, _pid_alive

    routes = tuple(r for fam in (4, 6) for r in kernel.dump_routes(RT_TABLE_MAIN, family=fam)
                   if r.proto in (RTPROT_NETAGENT, RTPROT_CNI_POD))
    wg = []
    for dev in WG_DEVICES:
        try:
            pid = int(WireguardGo(dev, state_dir).pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if _pid_alive(pid, dev):
            wg.append((dev, pid))
    bird = BirdSupervisor(state_dir).pid() if state_dir.is_dir() else None
    return HostView(tuple(kernel.links()), routes, iptables_families(), tuple(wg), bird, bridge)


# --------------------------------------------------------------------------- removing


def _gone(exc: BaseException) -> bool:
    """Already removed (by the kernel with its device, a racing cleanup, or a second run)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ESRCH, errno.ENODEV)


def apply_steps(steps: Sequence[Step], kernel: NetlinkKernel, state_dir: Path,
                store: Any = None) -> list[tuple[Step, str]]:
    """Run ``steps`` in order; (step, error) for each that failed (the rest still run)."""
    failed: list[tuple[Step, str]] = []
    for step in steps:
        try:
            _apply(step, kernel, state_dir, store)
        except Exception as exc:  # noqa: BLE001 - reported per step; the others still run
            if not _gone(exc):
                failed.append((step, str(exc)))
    return failed


def _apply(step: Step, kernel: NetlinkKernel, state_dir: Path, store: Any) -> None:
    if step.kind == "stop-bird":
        from netagent.backends.bgp.supervisor import BirdSupervisor

        BirdSupervisor(state_dir).stop()
    elif step.kind == "stop-wireguard-go":
        from netagent.backends.wireguard.wggo import WireguardGo

        dev, pid = step.target
        wg = WireguardGo(dev, state_dir)
        wg.pid = pid
        wg.stop()
    elif step.kind == "route":
        [err] = kernel.write([Op("delete", step.target)])
        if err is not None:
            raise err
    elif step.kind == "link":
        kernel.delete_link(step.target.index)
    elif step.kind == "iptables":
        from netagent.masq import remove_leftovers

        remove_leftovers(step.target)
    elif step.kind == "lease":
        key, lease_id = step.target
        store.delete(key)
        if lease_id:
            try:
                store.revoke(lease_id)
            except Exception as exc:  # noqa: BLE001 - an expired lease is already revoked
                if "not found" not in str(exc).lower():
                    raise
    elif step.kind == "file":
        Path(step.target).unlink()


# --------------------------------------------------------------------------- the etcd lease


class CleanupError(RuntimeError):
    """A reason to change nothing at all (the lease cannot be found safely)."""


def lease_steps(store: Any, s: Any) -> list[Step]:
    """``--release-lease``: this host's lease key (as the agent finds its own: PublicIP, or
    PublicIPv6 on an IPv6-only network) with its etcd lease. [] when it holds none."""
    from netagent.config import ConfigError, parse_network_config
    from netagent.iface import IfaceError, find_iface, find_iface6
    from netagent.lease import LeaseError, decode_lease

    kv = store.get(store.key("config"))
    if kv is None:
        raise CleanupError(f"no network config at {store.key('config')}: cannot tell which "
                           "lease is this host's (nothing removed)")
    try:
        cfg = parse_network_config(kv.value)
    except ConfigError as exc:
        raise CleanupError(f"the network config is invalid ({exc}); nothing removed") from None
    try:
        if cfg.enable_ipv4:
            public: Any = find_iface(s.iface, s.iface_regex, s.public_ip,
                                     can_reach=s.iface_can_reach)[2]
        else:
            public = find_iface6(s.iface, s.iface_regex, s.public_ipv6,
                                 can_reach=s.iface_can_reach)[2]
    except IfaceError as exc:
        raise CleanupError(f"cannot tell this host's public address ({exc}); pass --iface or "
                           "--public-ip (nothing removed)") from None
    prefix = store.key("subnets/")
    items, _ = store.list_prefix(prefix)
    out = []
    for item in items:
        try:
            lease = decode_lease(item.key[len(prefix):], item.value, item.lease_id)
        except LeaseError:
            continue  # not a lease this host could have written
        mine = (lease.attrs.public_ip == public if cfg.enable_ipv4
                else lease.subnet is None and lease.attrs.public_ipv6 == public)
        if mine:
            lid = f"etcd lease {item.lease_id:x}" if item.lease_id else "a reservation, no etcd lease"
            out.append(Step("lease", f"lease {lease.label} in etcd ({item.key}, {lid})",
                            (item.key, item.lease_id)))
    return out
