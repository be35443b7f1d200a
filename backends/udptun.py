"""The udp backend's TUN device: everything done to ``/dev/net/tun`` by ioctl.

TUN flags, persistence, offloads and queue length are ioctls on the TUN fd or a socket, not
netlink, so they live here and not in the netlink dataplane. The virtio-net header constants
are the TUN's framing with ``IFF_VNET_HDR`` (10 bytes in front of every read and write).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

# linux/if_tun.h
TUNSETIFF = 0x400454CA

TUNSETPERSIST = 0x400454CB

TUNSETOFFLOAD = 0x400454D0

IFF_TUN = 0x0001

IFF_NO_PI = 0x1000

IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01

TUN_F_TSO4 = 0x02
# linux/virtio_net.h: struct virtio_net_hdr (10 bytes, little-endian on the TUN)
VNET_LEN = 10

VNET_F_NEEDS_CSUM = 1

VNET_GSO_NONE = 0

VNET_GSO_TCPV4 = 1
SIOCGIFTXQLEN = 0x8942

SIOCSIFTXQLEN = 0x8943


def open_tun(name: str, *, persist: bool = True, vnet: bool = True) -> int:
    """Open (creating if needed) the TUN device `name`, IFF_NO_PI; return a non-blocking fd.

    ``vnet`` adds a 10-byte virtio-net header to every read and write (``IFF_VNET_HDR``): it is
    how the loop hands the kernel coalesced TCP super-packets and receives TSO ones; the
    device itself (what flannel and peers see) is the same.

    ``persist`` makes the device outlive this process, so a restart re-attaches to the same
    device (same index, address and route: no kernel writes, no interruption beyond the loop's
    own down time). EBUSY means another process still holds it.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
        ifr = struct.pack("16sH22x", name.encode(), flags)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        if persist:
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError:
        os.close(fd)
        raise
    return fd


def set_tun_offload(fd: int, tso: bool) -> None:
    """Let the kernel hand us TCP super-packets with partial checksums (we segment them)."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 if tso else 0)


def tun_offload(fd: int, tso: bool) -> bool:
    """:func:`set_tun_offload`; False where the fd is no TUN or the kernel refuses."""
    try:
        set_tun_offload(fd, tso)
    except OSError:
        return False
    return True


def tun_txqueuelen(name: str, want: int | None = None) -> int:
    """Read (and with `want`, set) the device's transmit queue length, by ioctl.

    The queue is what absorbs bursts while the loop is descheduled (a GIL hand-off alone can
    take 5 ms); the TUN default of 500 packets is ~4 ms at 130 kpps, and every overflow is a
    TCP retransmit.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16si20x", name.encode(), 0)
        have = struct.unpack_from("16si", fcntl.ioctl(s.fileno(), SIOCGIFTXQLEN, ifr))[1]
        if want is not None and want != have:
            fcntl.ioctl(s.fileno(), SIOCSIFTXQLEN, struct.pack("16si20x", name.encode(), want))
            return want
        return int(have)
