"""The udp backend's compiled fast path: ``udpfast.c`` built with ``cc`` and run as a child.

flannel's udp backend forwarded in C because per-packet work in a scripting runtime is the
limit (issue 18: the Python loop reached 0.28× vxlan here, at ~147 % of two cores). The child
does only the per-packet work, TUN ⇄ UDP with the same trust checks and offloads as the Python
loop (:mod:`backends.udpfwd`); the agent keeps control:

* it opens flannel0 and the UDP socket and passes both fds to the child;
* the forwarding table is pushed over a unix socket pair each time ``sync`` swaps it
  (:func:`encode_table`); the setter returns once the child has acknowledged it, so a sync
  is in force when it returns, as with the Python loop's reference swap;
* the child sends its cumulative counters (at most every 50 ms, only when they changed), which
  are added to the backend's ``stats`` dict: metrics and status read them as before;
* end of file on the socket pair means the other side is gone: the child exits when the agent
  dies or stops (:meth:`FastForwarder.stop` half-closes it and collects the last counters); the
  agent sees a dead child at once, logs it and starts a new one after a second; after
  :data:`CRASH_LIMIT` crashes within :data:`CRASH_WINDOW` it falls back to the Python loop
  (and says so in the log and in status.json's ``backend_health``), so a faulty build can
  never black-hole traffic for long.

**Build.** :func:`fast_path_binary` compiles the source once per (source, compiler) into a
cache directory only root may write (``/var/cache/netagent``, else a 0700 directory in the
temp dir), atomically renamed into place, so restarts reuse it and concurrent agents do not
collide. No compiler, a failed build, ``NETAGENT_UDP_FASTPATH=python``: the Python loop runs
and the reason is logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netagent.backends.udpstats import DROP_REASONS, StatsFlusher, new_stats
from netagent.backends.udptrust import ForwardingTable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "udpfast.c"
#: FLAGS bits of the child's command line and of its HELLO
F_GRO, F_TSO, F_UDPGRO, F_GSO = 1, 2, 4, 8
M_TABLE, M_HELLO, M_ACK, M_STATS = 1, 2, 3, 4
#: the child's counters, in the order of its STATS message
COUNTERS = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_gro_merged",
            "tx_tso_packets", *DROP_REASONS)
#: exit status of a child whose TUN device was deleted (not a crash: retried, never counted)
EXIT_TUN_GONE = 3
CRASH_LIMIT = 3
CRASH_WINDOW = 60.0
#: seconds to wait for the child's HELLO, a table acknowledgement, or its exit on stop
REPLY_TIMEOUT = 5.0


# --------------------------------------------------------------------------- build


def find_compiler() -> str | None:
    """``$CC``, else ``cc``/``gcc``/``clang`` on PATH."""
    for cand in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def _private_dir(path: Path) -> bool:
    """Create `path` (0700) if needed; whether it is ours and nobody else may write in it: a
    binary run as root must never come from a directory another user can write."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError:
        return False
    return (path.is_dir() and not path.is_symlink() and st.st_uid == os.geteuid()
            and not st.st_mode & 0o022 and os.access(path, os.W_OK))


def cache_dirs() -> list[Path]:
    env = os.environ.get("NETAGENT_UDP_FASTPATH_DIR")
    if env:
        return [Path(env)]
    return [Path("/var/cache/netagent"),
            Path(tempfile.gettempdir()) / f"netagent-{os.geteuid()}"]


def fast_path_binary(source: Path = SOURCE, cc: str | None = None) -> tuple[Path | None, str]:
    """(the compiled child, "") or (None, why not). Built once per source and compiler."""
    if not source.is_file():
        return None, f"{source} is missing (installed without the C source)"
    cc = cc or find_compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or clang; on Debian: apt-get install gcc libc6-dev)"
    text = source.read_bytes()
    key = hashlib.sha256(text + b"\0" + cc.encode()).hexdigest()[:16]
    for d in cache_dirs():
        if not _private_dir(d):
            continue
        out = d / f"udpfast-{key}"
        if out.is_file() and out.stat().st_uid == os.geteuid() and os.access(out, os.X_OK):
            return out, ""
        tmp = d / f".udpfast-{key}.{os.getpid()}.{threading.get_ident()}"
        cmd = [cc, "-std=gnu99", "-O2", "-Wall", "-s", "-o", str(tmp), str(source)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{cc} failed: {exc}"
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            return None, f"{cc} failed: {proc.stderr.strip()[-2000:]}"
        os.replace(tmp, out)
        for stale in d.glob("udpfast-*"):  # builds of older sources (a running one keeps its
            if stale != out:               # inode: unlinking it is safe)
                with contextlib.suppress(OSError):
                    stale.unlink()
        return out, ""
    return None, "no private cache directory to build in (/var/cache/netagent, temp dir)"


# --------------------------------------------------------------------------- protocol


def encode_table(table: ForwardingTable, generation: int) -> bytes:
    """A TABLE message: the own subnet and the routes as host-order 32-bit words, then the
    peers' sockaddr_in as the table already holds them (no per-peer arithmetic here: 20,000
    peers encode in a few ms)."""
    own_net, own_mask = table.own
    nets, masks, addrs = array("I"), array("I"), []
    for mask, routes in table.routes:
        nets.extend(routes.keys())
        masks.extend([mask] * len(routes))
        addrs.append(b"".join(peer[1] for peer in routes.values()))
    head = array("I", [generation & 0xFFFFFFFF, own_net, own_mask, table.subnet_mask,
                       int(table.own_address), len(nets)])
    payload = b"".join((head.tobytes(), nets.tobytes(), masks.tobytes(), *addrs))
    return struct.pack("=II", M_TABLE, len(payload)) + payload


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_message(sock: socket.socket) -> tuple[int, bytes] | None:
    """(type, payload) of the child's next message; None at end of file."""
    head = _recv_exact(sock, 8)
    if head is None:
        return None
    kind, size = struct.unpack("=II", head)
    body = _recv_exact(sock, size) if size else b""
    return None if body is None else (kind, body)


# --------------------------------------------------------------------------- the child


class _Child:
    """One running child process and our end of its socket pair."""

    def __init__(self, binary: Path, tun_fd: int, sock_fd: int, flags: int,
                 table: bytes) -> None:
        """Start the child and hand it its first `table` (a TABLE message); it forwards
        nothing before that, so no packet meets an empty table. OSError when it fails."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [str(binary), str(tun_fd), str(sock_fd), str(theirs.fileno()), str(flags)],
                pass_fds=(tun_fd, sock_fd, theirs.fileno()), stdin=subprocess.DEVNULL)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.last = [0] * len(COUNTERS)
        ours.settimeout(REPLY_TIMEOUT)
        msg = None
        with contextlib.suppress(OSError):
            msg = read_message(ours)
        if msg is not None and msg[0] == M_HELLO and len(msg[1]) >= 8:
            self.features, self.pid = struct.unpack_from("=II", msg[1])
            msg = None
            with contextlib.suppress(OSError):
                ours.sendall(table)
                msg = read_message(ours)
        if msg is None or msg[0] != M_ACK:
            status = self.kill()
            raise OSError(f"udp fast path child did not start (exit status {status})")
        ours.settimeout(None)

    def kill(self) -> int | None:
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            return self.proc.wait(REPLY_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class FastForwarder:
    """The compiled packet loop behind the Python loop's interface (``table``, ``start``,
    ``stop``, the offload flags), with a supervisor thread that reads the child's messages,
    notices its death and restarts it, or hands over to `fallback` (a factory of the Python
    loop) after repeated crashes."""

    def __init__(self, binary: Path, tun_fd: int, sock: socket.socket, *, gro: bool = True,
                 tso: bool = True, gso: bool = True, udp_gro: bool = True,
                 stats: dict[str, Any] | None = None,
                 fallback: Callable[[], Any] | None = None) -> None:
        self.binary = binary
        self.tun_fd = tun_fd
        self.sock = sock
        self.flags = (F_GRO if gro else 0) | (F_TSO if tso else 0) | \
            (F_UDPGRO if udp_gro else 0) | (F_GSO if gso else 0)
        self.stats: dict[str, Any] = stats if stats is not None else new_stats()
        self._counters = StatsFlusher(self.stats)
        self._fallback_factory = fallback
        self.fallback: Any = None
        self._table = ForwardingTable()
        self._generation = 0
        self._acked = 0
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._child: _Child | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._crashes: list[float] = []
        self.restarts = 0
        #: "c", or "python (…why)" after a fallback: shown in status.json
        self.data_path = "c"
        self.gro = self.tso = self.gso = self.udp_gro = False
        self.threads = 1

    # -- the interface the backend uses

    @property
    def table(self) -> ForwardingTable:
        return self._table

    @table.setter
    def table(self, table: ForwardingTable) -> None:
        """Swap the table in; returns once the child uses it (or is gone)."""
        with self._cond:
            self._table = table
            fb = self.fallback
            if fb is not None:
                fb.table = table
                return
            self._generation += 1
            gen = self._generation
            child = self._child
        if child is None:
            return  # between two children: the next one is started with this table
        with self._send_lock:  # not under _cond: the supervisor takes it to record the ACK
            try:
                child.sock.sendall(encode_table(table, gen))
            except OSError:
                return  # the supervisor sees the child die and pushes the table to the next
        with self._cond:
            self._cond.wait_for(lambda: self._acked >= gen or self._child is not child,
                                timeout=REPLY_TIMEOUT)

    def start(self) -> None:
        """Start the child (raises OSError when it cannot run) and its supervisor."""
        self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="netagent-udpfast",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the child (end of file on its socket; it sends its last counters and exits),
        then the supervisor. The caller closes the TUN and socket fds."""
        self._stop.set()
        with self._cond:
            child = self._child
            self._cond.notify_all()
        if child is not None:
            with contextlib.suppress(OSError):
                child.sock.shutdown(socket.SHUT_WR)
            try:
                child.proc.wait(REPLY_TIMEOUT)
            except subprocess.TimeoutExpired:
                child.proc.kill()
        if self._thread is not None:
            self._thread.join(REPLY_TIMEOUT)
            self._thread = None
        if child is not None:
            child.kill()
        if self.fallback is not None:
            self.fallback.stop()

    @property
    def running(self) -> bool:
        if self.fallback is not None:
            return bool(self.fallback.running)
        child = self._child
        return child is not None and child.proc.poll() is None

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.proc.pid if child is not None else None

    # -- the child

    def _spawn(self) -> None:
        """A new child with the current table; a table set meanwhile is pushed to it."""
        with self._cond:
            gen, table = self._generation, self._table
        child = _Child(self.binary, self.tun_fd, self.sock.fileno(), self.flags,
                       encode_table(table, gen))
        f = child.features
        self.gro, self.tso = bool(f & F_GRO), bool(f & F_TSO)
        self.gso, self.udp_gro = bool(f & F_GSO), bool(f & F_UDPGRO)
        with self._cond:
            self._child = child
            newer = self._table if self._table is not table else None
            self._generation += 1
            gen = self._generation
        if newer is not None:
            with self._send_lock, contextlib.suppress(OSError):  # dead: the supervisor sees
                child.sock.sendall(encode_table(newer, gen))

    def _supervise(self) -> None:
        while not self._stop.is_set():
            child = self._child
            if child is None:
                return
            self._read_until_eof(child)
            status = child.kill()
            with self._cond:
                self._child = None
                self._cond.notify_all()
            if self._stop.is_set():
                return
            self._child_died(status)

    def _read_until_eof(self, child: _Child) -> None:
        while True:
            try:
                msg = read_message(child.sock)
            except OSError:
                return
            if msg is None:
                return
            kind, body = msg
            if kind == M_STATS and len(body) == 8 * len(COUNTERS):
                self._add_counts(child, struct.unpack(f"={len(COUNTERS)}Q", body))
            elif kind == M_ACK and len(body) == 4:
                with self._cond:
                    self._acked = max(self._acked, struct.unpack("=I", body)[0])
                    self._cond.notify_all()

    def _add_counts(self, child: _Child, values: tuple[int, ...]) -> None:
        counts: dict[str, int] = {}
        drops: dict[str, int] = {}
        for i, (name, v) in enumerate(zip(COUNTERS, values, strict=True)):
            delta = v - child.last[i]
            child.last[i] = v
            (drops if name in DROP_REASONS else counts)[name] = delta
        self._counters.flush(counts, drops)

    def _child_died(self, status: int | None) -> None:
        """Log it; start a new child after a second, or fall back to the Python loop."""
        now = time.monotonic()
        if status == EXIT_TUN_GONE:
            log.warning("udp fast path: flannel0 is gone; retrying every second until the "
                        "device is back (the next full sync re-creates it)")
        else:
            self._crashes = [t for t in self._crashes if now - t < CRASH_WINDOW] + [now]
            log.error("udp fast path process exited (status %s); %s", status,
                      "restarting it" if len(self._crashes) < CRASH_LIMIT else
                      "falling back to the Python packet loop")
        if status != EXIT_TUN_GONE and len(self._crashes) >= CRASH_LIMIT:
            self._fall_back(f"the compiled loop exited {len(self._crashes)} times in "
                            f"{CRASH_WINDOW:g} s")
            return
        while not self._stop.wait(1.0):
            try:
                self._spawn()
                self.restarts += 1
                return
            except OSError as exc:
                if self._fallback_factory is not None:
                    self._fall_back(f"cannot restart the compiled loop: {exc}")
                    return
                log.error("udp fast path: %s; retrying", exc)

    def _fall_back(self, why: str) -> None:
        if self._fallback_factory is None:
            return
        log.error("udp: %s; forwarding with the Python packet loop from now on", why)
        try:
            fb = self._fallback_factory()
        except Exception as exc:  # noqa: BLE001 - say so rather than die silently
            log.error("udp: the Python packet loop cannot start either (%s); no udp "
                      "forwarding until the agent restarts", exc)
            self.data_path = f"none ({why}; the Python loop failed: {exc})"
            return
        with self._cond:
            fb.table = self._table
            self.fallback = fb
            self.data_path = f"python ({why})"
        self.gro, self.tso, self.gso, self.udp_gro = fb.gro, fb.tso, fb.gso, fb.udp_gro
        if not self._stop.is_set():
            fb.start()
