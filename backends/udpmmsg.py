"""Batched UDP I/O for the udp packet loop: ``recvmmsg``/``sendmmsg`` through ctypes (one
syscall for up to a batch of datagrams) and UDP GSO (``UDP_SEGMENT``) send groups.

Everything is preallocated once per loop (ctypes arrays, memoryviews of their length fields),
so a batch costs no Python objects per datagram. Which kernel features exist is asked with
:func:`sockopt_supported` before the loop starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket
import struct
from typing import Any

# linux/udp.h
UDP_SEGMENT = 103

UDP_GRO = 104
#: largest UDP payload one UDP_SEGMENT send may carry
GSO_SEND_LIMIT = 65000


def sockopt_supported(sock: socket.socket, option: int, value: int | None = None) -> bool:
    """Whether the kernel knows the SOL_UDP `option` (set it to `value`, or just read it)."""
    try:
        if value is None:
            sock.getsockopt(socket.SOL_UDP, option)
        else:
            sock.setsockopt(socket.SOL_UDP, option, value)
    except OSError:
        return False
    return True


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int))


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint))


def load_libc() -> Any:
    """libc with ``recvmmsg``/``sendmmsg`` typed, or None where it has not got them."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    lib = ctypes.CDLL(name, use_errno=True)
    if not (hasattr(lib, "recvmmsg") and hasattr(lib, "sendmmsg")):
        return None
    lib.recvmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                             ctypes.c_void_p)
    lib.recvmmsg.restype = ctypes.c_int
    lib.sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
    lib.sendmmsg.restype = ctypes.c_int
    return lib


class MmsgBatch:
    """`count` preallocated datagram slots (buffer + sockaddr_in) for recvmmsg/sendmmsg.

    Each slot starts with ``headroom`` bytes the kernel never touches (the iovec begins after
    them): room for the TUN's virtio-net header in front of a received packet, so a packet is
    written to the TUN from where it was received, without a copy. Everything lives in ctypes
    arrays made once; the loop reaches the length fields through memoryviews made once.
    """

    SOCKADDR_LEN = 16

    def __init__(self, count: int, size: int, headroom: int = 0, control: bool = False) -> None:
        self.count, self.size = count, size
        self.data = (ctypes.c_char * (count * size))()
        self.names = (ctypes.c_char * (count * self.SOCKADDR_LEN))()
        self.iov = (_Iovec * count)()
        self.msgs = (_Mmsghdr * count)()
        base, nbase = ctypes.addressof(self.data), ctypes.addressof(self.names)
        self.room = size - headroom
        for i in range(count):
            self.iov[i].iov_base = base + i * size + headroom
            self.iov[i].iov_len = self.room
            h = self.msgs[i].msg_hdr
            h.msg_name = nbase + i * self.SOCKADDR_LEN
            h.msg_namelen = self.SOCKADDR_LEN
            h.msg_iov = ctypes.pointer(self.iov[i])
            h.msg_iovlen = 1
        view = memoryview(self.data).cast("B")
        #: whole slots (headroom included) and the packet part of each
        self.slots = [view[i * size:(i + 1) * size] for i in range(count)]
        self.packets = [view[i * size + headroom:(i + 1) * size] for i in range(count)]
        names = memoryview(self.names).cast("B")
        self.name_slots = [names[i * 16:(i + 1) * 16] for i in range(count)]
        self.addr_slots = [names[i * 16 + 4:i * 16 + 8] for i in range(count)]
        stride = ctypes.sizeof(_Mmsghdr)
        assert stride % 4 == 0 and ctypes.sizeof(_Iovec) == 16
        self.words = memoryview(self.msgs).cast("B").cast("I")
        len_off = _Mmsghdr.msg_len.offset // 4
        namelen_off = _Msghdr.msg_namelen.offset // 4
        self.len_index = [i * (stride // 4) + len_off for i in range(count)]
        self.namelen_index = [i * (stride // 4) + namelen_off for i in range(count)]
        self.iov_lens = memoryview(self.iov).cast("B").cast("Q")  # [2i+1] = iov_len of slot i
        self.msgs_addr = ctypes.addressof(self.msgs)
        self.stride = stride
        #: with `control`: one CMSG_SPACE(2) buffer per slot for the UDP_GRO segment size;
        #: ``ctl_index[i]`` indexes the slot's msg_controllen (low half) in ``words``, reset
        #: after each use; ``ctl_words[6 i + 2..4]`` = level, type, data of its cmsghdr
        self.ctl_index: list[int] = []
        self.ctl_words = memoryview(b"")
        if control:
            space = GsoGroups.CMSG_SPACE
            self.control = (ctypes.c_char * (count * space))()
            caddr = ctypes.addressof(self.control)
            for i in range(count):
                self.msgs[i].msg_hdr.msg_control = caddr + i * space
                self.msgs[i].msg_hdr.msg_controllen = space
            ctl_off = _Msghdr.msg_controllen.offset // 4
            self.ctl_index = [i * (stride // 4) + ctl_off for i in range(count)]
            self.ctl_words = memoryview(self.control).cast("B").cast("I")


class GsoGroups:
    """Send a filled :class:`MmsgBatch` as UDP GSO messages in one ``sendmmsg``.

    Consecutive packets for the same peer with the same length (the last of a run may be
    shorter) become one message whose iovecs are those packets' slots, with a UDP_SEGMENT
    control message: the kernel then builds one skb per run and cuts it into datagrams as late
    as it can (on veth, at the receiving socket), instead of running its output path once per
    datagram. Each datagram on the wire is still exactly one inner packet.
    """

    CMSG_SPACE = 24  # CMSG_SPACE(sizeof(uint16_t)) on 64-bit Linux
    MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS is 64 on older kernels, 128 on newer
    MAX_BYTES = 65000  # one UDP send carries at most 64 kB

    def __init__(self, batch: MmsgBatch) -> None:
        n = batch.count
        self.batch = batch
        self.msgs = (_Mmsghdr * n)()
        self.cmsgs = (ctypes.c_char * (n * self.CMSG_SPACE))()
        self.words = memoryview(self.msgs).cast("B").cast("Q")  # 8 words per mmsghdr
        assert ctypes.sizeof(_Mmsghdr) == 64
        iov, names = ctypes.addressof(batch.iov), ctypes.addressof(batch.names)
        cm = ctypes.addressof(self.cmsgs)
        self.iov_addr = [iov + 16 * i for i in range(n)]
        self.name_addr = [names + 16 * i for i in range(n)]
        self.cmsg_addr = [cm + self.CMSG_SPACE * g for g in range(n)]
        for g in range(n):
            # cmsghdr: len = CMSG_LEN(2) = 18, SOL_UDP, UDP_SEGMENT; data (u16) at +16
            struct.pack_into("=QiiH", self.cmsgs, self.CMSG_SPACE * g, 18, socket.SOL_UDP,
                             UDP_SEGMENT, 0)
            self.words[8 * g + 1] = MmsgBatch.SOCKADDR_LEN
        self.sizes = memoryview(self.cmsgs).cast("B").cast("H")  # [12 g + 8] = segment size
        self.addr = ctypes.addressof(self.msgs)

    def build(self, nq: int) -> tuple[int, list[int]]:
        """Group the first `nq` queued packets; (messages, packets per message)."""
        b = self.batch
        lens, names, w = b.iov_lens, b.name_slots, self.words
        per: list[int] = []
        g = i = 0
        while i < nq:
            size = lens[2 * i + 1]
            name = names[i]
            j, total = i + 1, size
            while j < nq and j - i < self.MAX_SEGMENTS and total + size <= self.MAX_BYTES \
                    and lens[2 * j + 1] == size and names[j] == name:
                total += size
                j += 1
            if j < nq and j - i < self.MAX_SEGMENTS and lens[2 * j + 1] < size \
                    and total + lens[2 * j + 1] <= self.MAX_BYTES and names[j] == name:
                j += 1  # a shorter last segment is allowed
            base = 8 * g
            w[base] = self.name_addr[i]
            w[base + 2] = self.iov_addr[i]
            w[base + 3] = j - i
            if j - i > 1:
                w[base + 4] = self.cmsg_addr[g]
                w[base + 5] = self.CMSG_SPACE
                self.sizes[12 * g + 8] = size
            else:
                w[base + 4] = w[base + 5] = 0
            per.append(j - i)
            g += 1
            i = j
        return g, per


def sendmmsg_all(libc: Any, fileno: int, msgs_addr: int, stride: int, nq: int,
                 iov_lens: memoryview, drops: dict[str, int]) -> tuple[int, int]:
    """Send the first `nq` queued datagrams of a batch; (datagrams sent, bytes sent)."""
    done = 0
    while done < nq:
        r = libc.sendmmsg(fileno, msgs_addr + done * stride, nq - done, 0)
        if r <= 0:
            drops["send_error"] += nq - done  # the rest of this batch is lost
            break
        done += r
    nbytes = sum(iov_lens[2 * i + 1] for i in range(done))
    return done, nbytes


def send_groups(libc: Any, fileno: int, groups: GsoGroups, nq: int,
                drops: dict[str, int]) -> tuple[int, int]:
    """Send the queued packets as GSO runs; (packets sent, bytes), or (-errno, 0) when the
    kernel rejects UDP_SEGMENT itself before anything was sent."""
    count, per = groups.build(nq)
    lens = groups.batch.iov_lens
    done = 0
    while done < count:
        r = libc.sendmmsg(fileno, groups.addr + done * 64, count - done, 0)
        if r <= 0:
            err = ctypes.get_errno()
            if done == 0 and err in (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT,
                                     errno.EOPNOTSUPP):
                return -err, 0
            drops["send_error"] += sum(per[done:])
            break
        done += r
    sent = sum(per[:done])
    return sent, sum(lens[2 * i + 1] for i in range(sent))
