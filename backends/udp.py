"""The udp backend: flannel's user-space encapsulation (``flannel0`` TUN + UDP port 8285).

Kernel state is small and set once: the TUN device ``flannel0`` (IFF_NO_PI, persistent, MTU =
underlay − 28), our subnet's network address as /32 on it, and one route for the whole flannel
Network through it (``proto`` :data:`~netagent.kernel.RTPROT_NETAGENT`; ``route_owner``
never sweeps it because it is not *inside* the Network). Peers are not kernel entries at all:
``sync`` renders them (pure, :func:`render_udp_peers`) into a
:class:`~backends.udptrust.ForwardingTable` and swaps it into the running packet loop without
stopping it: the compiled loop (:mod:`backends.udpfast`, a child process built from
``udpfast.c`` with ``cc``) or, without a compiler or after it crashed repeatedly, the Python
loop (:mod:`backends.udpfwd`). Which one runs is logged and shown as ``data_path`` in
status.json's ``backend_health``.

**Which leases are peers.** flannel's udp backend accepts every lease. netagent accepts leases
with no ``BackendType`` (what flannel's udp and ours write) and ``"udp"``, and skips leases of
any other backend type with a logged reason (``SyncReport.skipped``): a vxlan or host-gw host
has nothing listening on the udp port, so "forwarding" to it would silently black-hole traffic,
where skipping gives the sender an ICMP net-unreachable at once. A lease with our own PublicIP
is skipped too (a stale lease of this host).

**Net unreachable.** Like flannel, a packet no lease covers is answered with ICMP "destination
net unreachable" written back into the TUN, but sourced from the would-be subnet's network
address instead of flannel0's own address: Linux drops a packet arriving with a local source
address as a martian, so flannel's reply never reaches the sender.

**Restarts** keep the device: it is persistent, so the next run re-attaches to it (same index,
address and route; the reconcile makes no kernel writes). Traffic pauses only while no process
reads the TUN. ``shutdown`` stops the loop and closes our fds, nothing else; ``teardown`` (a
live switch to another backend or network) deletes flannel0, and its address and route with it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, cast

from netagent.backends.base import Backend, BackendHealth, HostFacts, LeaseContribution, SyncReport
from netagent.backends.udpfast import FastForwarder, fast_path_binary
from netagent.backends.udpfwd import Forwarder
from netagent.backends.udprun import numpy_payload_sums, payload_sums_python
from netagent.backends.udpstats import new_stats
from netagent.backends.udptrust import (
    DEFAULT_UDP_PORT,
    UDP_OVERHEAD,
    ForwardingTable,
    build_forwarding_table,
)
from netagent.backends.udptun import open_tun, tun_txqueuelen
from netagent.config import NetworkConfig
from netagent.kernel import Kernel, KernelError, Op, Route, address_device
from netagent.lease import Lease, PeerId

log = logging.getLogger(__name__)

DEVICE = "flannel0"
#: BackendType values a udp host treats as udp peers ("" = flannel's udp lease)
UDP_LEASE_TYPES = frozenset({"", "udp"})
#: socket buffers: a few ms of line rate, so bursts queue instead of being dropped
SOCKET_BUFFER = 4 << 20
#: flannel0's transmit queue: bursts wait here while the loop is descheduled (TUN default 500)
TX_QUEUE_LEN = 5000
#: the packet loop's offloads unless NETAGENT_UDP_OFFLOAD says otherwise (see _new_forwarder)
OFFLOADS = "gro,gso,udpgro,tso"


def render_udp_peers(
    peers: Mapping[IPv4Network, Lease], *, own_subnet: IPv4Network | None,
    own_ip: IPv4Address | None, port: int, subnet_len: int = 32,
) -> tuple[ForwardingTable, dict[IPv4Network, str]]:
    """The forwarding table for `peers`, plus the peers left out and why (pure)."""
    usable: list[tuple[IPv4Network, IPv4Address]] = []
    skipped: dict[IPv4Network, str] = {}
    for subnet, lease in sorted(peers.items()):
        btype = lease.attrs.backend_type
        if btype not in UDP_LEASE_TYPES:
            skipped[subnet] = (f"BackendType {btype!r} is not udp (a {btype} host has no udp "
                               "listener); ignoring this lease")
        elif own_subnet is not None and subnet.overlaps(own_subnet):
            skipped[subnet] = f"overlaps our own subnet {own_subnet}"
        elif own_ip is not None and lease.attrs.public_ip == own_ip:
            skipped[subnet] = f"lease has our own PublicIP {own_ip} (a stale lease of this host?)"
        else:
            usable.append((subnet, lease.attrs.public_ip))
    table = build_forwarding_table(usable, own_subnet=own_subnet, port=port,
                                   subnet_len=subnet_len)
    return table, skipped


class UdpBackend(Backend):
    type_name = "udp"

    @classmethod
    def check_config(cls, config: NetworkConfig) -> str:
        """flannel's udp wire format carries IPv4 packets only."""
        if config.enable_ipv6:
            return ("Backend.Type: udp carries IPv4 only (as flannel's); use vxlan or host-gw "
                    "with EnableIPv6, or turn EnableIPv6 off")
        return ""

    def __init__(self, config: NetworkConfig, host: HostFacts, *,
                 kernel: Kernel | None = None) -> None:
        super().__init__(config, host)
        self._kernel = kernel
        self.port = config.backend.port or DEFAULT_UDP_PORT
        self.mtu = host.iface_mtu - UDP_OVERHEAD
        self.own: Lease | None = None
        self.ifindex = 0
        self.tun_fd = -1
        self.sock: socket.socket | None = None
        self.forwarder: Forwarder | FastForwarder | None = None
        #: which loop forwards: "c" (the compiled child, backends/udpfast.py) or "python (why)"
        self.data_path = ""
        self._skipped: dict[IPv4Network, str] = {}
        self._route_ok = False
        self._peers: Mapping[IPv4Network, Lease] = {}
        #: packet and drop counters, updated in place by the packet loop (read at scrape time)
        self.stats: dict[str, Any] = new_stats()

    @property
    def kernel(self) -> Kernel:
        if self._kernel is None:
            from netagent.kernel import NetlinkKernel

            self._kernel = NetlinkKernel()
        return self._kernel

    # -- lifecycle

    def prepare(self) -> LeaseContribution:
        self._open_device()
        self._open_socket()
        assert self.sock is not None
        self.forwarder = self._start_forwarder()
        fwd = self.forwarder
        if isinstance(fwd, FastForwarder):
            how = f"compiled loop, pid {fwd.pid}"
        else:
            sums = "numpy" if fwd.payload_sums is not payload_sums_python else "python"
            how = (f"Python loop{f' with {sums} checksums' if fwd.tso else ''}, "
                   + ("one thread" if fwd.threads == 1 else "a thread per direction"))
        log.info("udp: %s (index %d, MTU %d), listening on %s:%d/udp (offloads: gro %s, "
                 "udp gso %s, udp gro %s, tso %s; %s)", DEVICE, self.ifindex, self.mtu,
                 self.host.iface_addr, self.port, fwd.gro, fwd.gso, fwd.udp_gro, fwd.tso, how)
        return LeaseContribution(backend_type="", backend_data="", mtu=self.mtu)

    def activate(self, own: Lease) -> None:
        self.own = own
        self._ensure_address()
        self._ensure_route()
        self._install(self._peers)  # the inbound "is it for us" check follows our subnet

    def _install(self, peers: Mapping[IPv4Network, Lease]) -> tuple[ForwardingTable,
                                                                      dict[IPv4Network, str]]:
        """Render and swap the table into the running loop (one reference assignment)."""
        self._peers = peers
        table, skipped = render_udp_peers(peers, own_subnet=self.own.subnet if self.own else None,
                                          own_ip=self.host.public_ip, port=self.port,
                                          subnet_len=self.config.subnet_len)
        if self.forwarder is not None:
            self.forwarder.table = table
        return table, skipped

    def sync(
        self, peers: Mapping[PeerId, Lease], changed: frozenset[PeerId] | None = None
    ) -> SyncReport:
        """Render the whole table (cheap: thousands of peers take milliseconds) and swap it in.

        A full sync also re-checks the device, its address and the overlay route (drift repair).
        """
        report = SyncReport()
        if changed is None:
            report.added += self._repair()
        before = self.forwarder.table.peers if self.forwarder else 0
        # udp carries IPv4 only (UdpBackend.check_config refuses it with IPv6): peers are IPv4
        table, skipped = self._install(cast(dict[IPv4Network, Lease], dict(peers)))
        for subnet, why in skipped.items():
            if self._skipped.get(subnet) != why:
                log.warning("skipping peer %s: %s", subnet, why)
        for subnet in set(self._skipped) - set(skipped):
            if subnet in peers:
                log.info("peer %s is no longer skipped", subnet)
        self._skipped = skipped
        if changed is not None:
            report.added += len([s for s in changed if s in peers and s not in skipped])
            report.removed += len([s for s in changed if s not in peers])
        elif table.peers != before:
            report.added += max(0, table.peers - before)
            report.removed += max(0, before - table.peers)
        report.entries = {"route": 1 if self._route_ok else 0, "udp_peer": table.peers}
        report.skipped = {k: v for k, v in skipped.items()}
        return report

    def shutdown(self) -> None:
        """Stop the loop, close our fds; the device, address and route stay for the restart."""
        if self.forwarder is not None:
            self.forwarder.stop()
            self.forwarder = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.tun_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.tun_fd)
            self.tun_fd = -1

    def _offloads(self) -> set[str]:
        return set(os.environ.get("NETAGENT_UDP_OFFLOAD", OFFLOADS).replace(" ", "").split(","))

    def _start_forwarder(self) -> Forwarder | FastForwarder:
        """The compiled loop (:mod:`backends.udpfast`) when it can be built and started, else
        the Python loop; ``NETAGENT_UDP_FASTPATH`` = ``python`` forces the Python loop (a bench
        and fallback knob; ``auto``, the default, and ``c`` try the compiled one). Started."""
        assert self.sock is not None
        choice = os.environ.get("NETAGENT_UDP_FASTPATH", "auto").strip().lower()
        if choice not in ("auto", "c", "python"):
            log.warning("NETAGENT_UDP_FASTPATH=%r is not auto, c or python; using auto", choice)
        why = "NETAGENT_UDP_FASTPATH=python"
        if choice != "python":
            binary, why = fast_path_binary()
            if binary is not None:
                want = self._offloads()
                fast = FastForwarder(binary, self.tun_fd, self.sock, gro="gro" in want,
                                     tso="tso" in want or "tsopy" in want, gso="gso" in want,
                                     udp_gro="udpgro" in want, stats=self.stats,
                                     fallback=self._new_forwarder)
                try:
                    fast.start()
                except OSError as exc:
                    why = f"the compiled loop did not start: {exc}"
                else:
                    self.data_path = "c"
                    return fast
            log.warning("udp: compiled fast path unavailable (%s); using the Python packet "
                        "loop (slower)", why)
        fwd = self._new_forwarder()
        fwd.start()
        self.data_path = f"python ({why})"
        return fwd

    def health(self) -> BackendHealth:
        """Which packet loop forwards (status.json's ``backend_health``); the compiled one may
        have fallen back to Python since start."""
        fwd = self.forwarder
        path = fwd.data_path if isinstance(fwd, FastForwarder) else self.data_path
        if path.startswith("none"):  # neither loop runs: nothing forwards, so not ready
            return BackendHealth(ok=False, detail=f"udp packet loop: {path}",
                                 info={"data_path": path})
        return BackendHealth(info={"data_path": path} if path else {})

    def _new_forwarder(self) -> Forwarder:
        """The Python loop, with the offloads ``NETAGENT_UDP_OFFLOAD`` lists (a bench knob; the
        default :data:`OFFLOADS`; any subset, or ``none``, measures one step back):

        * ``tso``: flannel0 hands over TCP super-packets, segmented here in whole-packet steps
          (:func:`~backends.udprun.segment_tso`). Only with numpy installed: its payload sums
          are ~8× faster than pure Python's, without which TSO is slower than letting the
          kernel segment (``tsopy`` forces it, to measure that).
        * ``threads2``: one thread per direction, as before; the GIL hand-offs between two busy
          threads cost more than their overlap gains (bench/README.md, udp section).

        What the kernel cannot do is switched off by the Forwarder (and logged by prepare).
        Not started.
        """
        assert self.sock is not None
        want = self._offloads()
        sums = numpy_payload_sums() if "tso" in want else None
        if "tso" in want and sums is None:
            log.info("udp: TSO off: numpy is not installed (segmenting with pure-Python "
                     "checksums costs more than the kernel's own segmentation)")
        fwd = Forwarder(self.tun_fd, self.sock, vnet=True, gro="gro" in want,
                        tso=sums is not None or "tsopy" in want, gso="gso" in want,
                        udp_gro="udpgro" in want, stats=self.stats,
                        threads=2 if "threads2" in want else 1)
        if sums is not None:
            fwd.payload_sums = sums
        return fwd

    def teardown(self) -> None:
        """Remove what this backend made, for a live switch to another backend or network:
        stop the loop, delete flannel0 (its address and the Network route go with it).

        Only a TUN named flannel0 is deleted; a plain stop (``shutdown``) keeps everything.
        """
        self.shutdown()
        link = self.kernel.link(DEVICE)
        if link is not None and link.kind == "tun":
            self.kernel.delete_link(link.index)
            log.info("removed %s and its route to %s", DEVICE, self.config.network)
        self._route_ok = False
        self.ifindex = 0

    # -- device, address, route (netlink through netagent.kernel's Kernel)

    def _open_device(self) -> None:
        """Attach to flannel0 (creating it); replace a tun of that name we cannot attach to.

        A flannel0 left by flannel itself has the same flags and is simply adopted. EBUSY means
        another process (a second agent, or flanneld) still runs it: that is fatal, not ours to
        take over.
        """
        try:
            self.tun_fd = open_tun(DEVICE)
        except OSError as exc:
            link = self.kernel.link(DEVICE)
            if exc.errno == errno.EBUSY or link is None or link.kind != "tun":
                raise KernelError(exc.errno or 0, f"cannot attach to TUN device {DEVICE}: {exc}"
                                  + (" (another process holds it)"
                                     if exc.errno == errno.EBUSY else "")) from None
            log.warning("%s exists with other TUN flags (%s); recreating it", DEVICE, exc)
            self.kernel.delete_link(link.index)
            self.tun_fd = open_tun(DEVICE)
        link = self.kernel.link(DEVICE)
        if link is None:
            raise KernelError(0, f"{DEVICE} vanished right after it was opened")
        if link.mtu != self.mtu:
            log.info("setting %s MTU %d → %d", DEVICE, link.mtu, self.mtu)
            self.kernel.set_link(link.index, mtu=self.mtu)
        qlen = int(os.environ.get("NETAGENT_UDP_TXQUEUELEN", TX_QUEUE_LEN))
        try:
            if tun_txqueuelen(DEVICE) != qlen:
                tun_txqueuelen(DEVICE, qlen)
                log.info("set %s txqueuelen to %d", DEVICE, qlen)
        except OSError as exc:
            log.warning("cannot set %s txqueuelen: %s", DEVICE, exc)
        self.ifindex = link.index

    def _open_socket(self) -> None:
        """UDP on <interface address>:<port> (flannel binds the interface address, IPv4 only)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # *BUFFORCE
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        try:
            sock.bind((str(self.host.iface_addr), self.port))
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def _ensure_address(self) -> int:
        """Our subnet's network address as /32 on flannel0 (stale overlay addresses removed),
        link up. Returns the number of kernel writes."""
        if self.own is None:
            return 0
        k, writes = self.kernel, 0
        link = k.link(DEVICE)
        if link is None:
            return 0
        assert self.own.subnet is not None, "udp runs IPv4 networks only"
        want = IPv4Interface(f"{self.own.subnet.network_address}/32")
        writes += address_device(k, link, want, self.config.network)
        if link.mtu != self.mtu:
            k.set_link(link.index, mtu=self.mtu)
            writes += 1
        return writes

    def _ensure_route(self) -> int:
        """The whole Network via flannel0; a route at that key made by others is left alone."""
        net = self.config.network
        if net is None or self.ifindex == 0:
            return 0
        want = Route(net, gateway=None, oif=self.ifindex)
        have = [r for r in self.kernel.dump_routes(want.table) if r.key == want.key]
        if have and have[0] == want:
            self._route_ok = True
            return 0
        if have and have[0].proto != want.proto and have[0].oif != self.ifindex:
            log.error("route %s exists (proto %d, via %s, index %s) and is not ours; udp "
                      "traffic will not reach %s", net, have[0].proto, have[0].gateway,
                      have[0].oif, DEVICE)
            self._route_ok = False
            return 0
        (err,) = self.kernel.write([Op("replace", want)])
        self._route_ok = err is None
        if err is not None:
            log.warning("route %s dev %s failed (retried next full sync): %s", net, DEVICE, err)
            return 0
        return 1

    def _repair(self) -> int:
        """Full sync: the device may have been deleted or changed; put everything back."""
        link = self.kernel.link(DEVICE)
        if link is None or link.index != self.ifindex:
            log.warning("%s disappeared or was replaced; re-creating it", DEVICE)
            self._reopen_device()
        return self._ensure_address() + self._ensure_route()

    def _reopen_device(self) -> None:
        old_fd = self.tun_fd
        if self.forwarder is not None:
            self.forwarder.stop()
        try:
            self._open_device()
        except OSError as exc:
            log.error("cannot re-create %s: %s (retried next full sync)", DEVICE, exc)
            self.tun_fd = old_fd
            return
        with contextlib.suppress(OSError):
            os.close(old_fd)
        if self.forwarder is not None and self.sock is not None:
            self.forwarder = self._start_forwarder()
            self._install(self._peers)
