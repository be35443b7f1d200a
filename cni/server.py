"""netagent CNI server: runs the plugin for the compiled client (``cni/client.c``) in a fork.

Why it exists (bench/README.md, CNI section): a Python plugin pays ~7 ms of interpreter start
and ~4.5 ms of imports on every call, more than the reference Go plugins take in total. This
server pays both once; per call it forks (under 1 ms), and the child runs ``netagent.cni.plugin.main()``
exactly as the launcher would: the caller's environment, its stdin/stdout/stderr, network
namespace, working directory and umask. The parent never reads stdin, parses a config or
touches the kernel for a request, so a request that fails cannot hurt the server.

Protocol, one unix stream connection per call, integers little-endian; every word the server
sends is 4 bytes:

- server → client ``NAH1`` (hello: the peer's uid is 0 or ours, by SO_PEERCRED) or ``NAR1``
  (refused; the connection is closed);
- client → server a 16-byte header ``NAQ1``, u32 flags (1: netns fd attached, 2: working
  directory fd attached), u32 umask, u32 length of the environment; then the environment as
  NUL-terminated ``K=V`` entries; SCM_RIGHTS on the first bytes carries fds 0, 1, 2 and the
  flagged ones, in that order;
- server → client ``NAA1`` (ack), sent just **before** the fork: the commit point. The client
  runs the plugin itself (the Python launcher) after any failure before it, and never after;
- then the status: ``X`` + exit code, or ``K`` + signal when the child was killed, or ``F``
  when the child never started the plugin (fork failed, setns refused): nothing ran, so the
  client may run it itself.

The child sends its own ``X`` status just before it exits, over its copy of the connection, so
a request finishes and is reported even if the server dies meanwhile; the parent only reports
children that died of a signal. A client that hangs up (the runtime killed it) gets its child
killed with SIGKILL, which is what the runtime's kill did to a launcher.

Concurrency: one single-threaded accept loop (selectors) and any number of children at once,
bounded by ``--max-children``; at the bound the server stops accepting, so further callers wait
in the listen backlog and are served in order as children finish (a caller that waits more
than its connect timeout, 5 s, runs the launcher instead: nothing was handed over yet). The
IPAM store is locked per process with ``lockf``, so forked children share it as separate
plugin processes did. SIGTERM/SIGINT: stop accepting, let running children finish (up to
``--drain-timeout``), exit 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
import traceback
from typing import NoReturn

# Everything a request can need is imported here, once, so that a child imports nothing.
import netagent.cni.attach
import netagent.cni.conf
import netagent.cni.ipam
import netagent.cni.ipamcall
import netagent.cni.ipamdisk
import netagent.cni.link
import netagent.cni.masq
import netagent.cni.plugin
import netagent.cni.skel
import netagent.cni.subnet
import netagent.cni.verbs
from netagent.cni.errors import INTERNAL, CniError
from netagent.cni.fast import CLONE_NEWNET, dumps, setns

DEFAULT_SOCKET = "/run/netagent/cni.sock"
HELLO, REFUSE, ACK, REQUEST = b"NAH1", b"NAR1", b"NAA1", b"NAQ1"
NOT_RUN = b"F\0\0\0"
HEADER = struct.Struct("<4sIII")
FLAG_NETNS, FLAG_CWD = 1, 2
MAX_ENV = 1 << 20  # the client's limit too
MAX_FDS = 5
SD_LISTEN_FDS_START = 3

# named so linters see them used; json: cni.fast.loads imports it for its error messages
_PRELOADED = (netagent.cni.attach, netagent.cni.conf, netagent.cni.ipam, netagent.cni.ipamcall,
              netagent.cni.ipamdisk, netagent.cni.link, netagent.cni.masq, netagent.cni.subnet,
              netagent.cni.verbs, json)


def _log(msg: str) -> None:
    """One line on stderr (the journal under systemd); flushed, as a fork may follow. A log
    that cannot be written (its reader gone) must not take the server down."""
    try:
        sys.stderr.write(f"netagent-cni-server: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class BadRequest(Exception):
    """A request that does not follow the protocol: logged and dropped."""


class Request:
    """A decoded request: environment, the fds that came with it, umask."""

    def __init__(self, env: dict[str, str], stdio: list[int], netns: int, cwd: int,
                 umask: int) -> None:
        self.env, self.stdio, self.netns, self.cwd, self.umask = env, stdio, netns, cwd, umask

    @property
    def summary(self) -> str:
        e = self.env
        return " ".join(x for x in (e.get("CNI_COMMAND", "?"), e.get("CNI_CONTAINERID", ""),
                                    e.get("CNI_IFNAME", "")) if x)

    def fds(self) -> list[int]:
        return [fd for fd in (*self.stdio, self.netns, self.cwd) if fd >= 0]


def check_header(data: bytes) -> tuple[int, int, int]:
    """(flags, umask, environment length) of a request's header; BadRequest if it is none."""
    if len(data) < HEADER.size:
        raise BadRequest(f"short request ({len(data)} bytes)")
    magic, flags, umask, env_len = HEADER.unpack_from(data)
    if magic != REQUEST:
        raise BadRequest(f"bad magic {magic!r}")
    if flags & ~(FLAG_NETNS | FLAG_CWD):
        raise BadRequest(f"unknown flags {flags:#x}")
    if env_len > MAX_ENV:
        raise BadRequest(f"environment length {env_len} over the limit of {MAX_ENV}")
    return flags, umask, env_len


def decode_request(data: bytes, fds: list[int]) -> Request:
    """Check a whole request (header + environment) and its fds; raise BadRequest otherwise.

    Pure, so tests can feed it any bytes. ``fds`` are not closed here.
    """
    flags, umask, env_len = check_header(data)
    if len(data) != HEADER.size + env_len:
        raise BadRequest(f"environment length {env_len} does not match {len(data)} bytes")
    want = 3 + bin(flags).count("1")
    if len(fds) != want:
        raise BadRequest(f"{len(fds)} fds attached, expected {want}")
    env: dict[str, str] = {}
    block = data[HEADER.size:]
    if block and not block.endswith(b"\0"):
        raise BadRequest("environment not NUL-terminated")
    for entry in block.split(b"\0")[:-1]:
        key, sep, value = entry.partition(b"=")
        if not sep:
            raise BadRequest(f"environment entry without '=': {entry[:40]!r}")
        if key:  # "=x" is legal in execve's envp but not a variable anyone can read
            env[os.fsdecode(key)] = os.fsdecode(value)
    rest = fds[3:]
    netns = rest.pop(0) if flags & FLAG_NETNS else -1
    cwd = rest.pop(0) if flags & FLAG_CWD else -1
    return Request(env, fds[:3], netns, cwd, umask & 0o777)


class Conn:
    """One client connection: reading its request, then watching it while its child runs."""

    __slots__ = ("sock", "peer", "buf", "fds", "deadline", "pid", "started", "summary", "done")

    def __init__(self, sock: socket.socket, peer: tuple[int, int], deadline: float) -> None:
        self.sock = sock
        self.peer = peer  # (pid, uid)
        self.buf = b""
        self.fds: list[int] = []
        self.deadline = deadline
        self.pid = 0
        self.started = 0.0
        self.summary = ""
        self.done = False  # the child said it finished (before it sent its status)

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        self.sock.close()


def _peer_cred(sock: socket.socket) -> tuple[int, int]:
    pid, uid, _gid = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("iII")))
    return pid, uid


def _same_netns(fd: int) -> bool:
    a, b = os.fstat(fd), os.stat("/proc/self/ns/net")
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class Server:
    def __init__(self, listener: socket.socket, *, max_children: int = 32,
                 request_timeout: float = 5.0, child_timeout: float = 300.0,
                 drain_timeout: float = 30.0, verbose: bool = False,
                 unlink_path: str = "") -> None:
        self.listener = listener
        self.max_children = max_children
        self.request_timeout = request_timeout
        self.child_timeout = child_timeout
        self.drain_timeout = drain_timeout
        self.verbose = verbose
        self.unlink_path = unlink_path  # the socket file we bound (not systemd's)
        self.unlink_ino = os.stat(unlink_path).st_ino if unlink_path else 0
        self.allowed_uids = {0, os.getuid()}
        self.sel = selectors.DefaultSelector()
        self.pending: dict[int, Conn] = {}  # fd -> connection still sending its request
        self.children: dict[int, Conn] = {}  # pid -> connection whose child runs
        self.accepting = False
        self.accept_paused_until = 0.0  # after an accept error (EMFILE): no busy loop
        self.stopping = False
        self.drain_deadline = 0.0
        self.wake_r, self.wake_w = os.pipe()
        # children write their pid here before they send their status: a client hanging up
        # after that is a finished call, not one to kill (its hang-up may beat the reaping)
        self.done_r, self.done_w = os.pipe()

    # ------------------------------------------------------------------ loop

    def serve(self) -> int:
        for fd in (self.wake_r, self.wake_w, self.done_r, self.done_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda s, f: None)  # wakes select through the wakeup fd
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        self.sel.register(self.done_r, selectors.EVENT_READ, "done")
        self.listener.setblocking(False)
        self._set_accepting(True)
        _log(f"serving on {self.listener.getsockname() or 'an inherited socket'} "
             f"(max {self.max_children} children, peers uid {sorted(self.allowed_uids)})")
        while not (self.stopping and not self.children):
            for key, _ in self.sel.select(self._next_timeout()):
                if key.data is None:
                    self._drain_wakeups()
                elif key.data == "listen":
                    self._accept()
                elif key.data == "done":
                    self._read_done()
                else:
                    self._on_readable(key.data)
            if self.stopping and self.listener.fileno() >= 0:
                self._shut_listener()
            self._reap()
            self._expire()
            self._set_accepting(not self.stopping and self._slots() > 0
                                and time.monotonic() >= self.accept_paused_until)
        _log("stopped")
        return 0

    def _on_stop(self, signum: int, frame: object) -> None:
        if not self.stopping:
            self.stopping = True
            self.drain_deadline = time.monotonic() + self.drain_timeout
            _log(f"signal {signum}: no new requests; waiting for {len(self.children)} running")

    def _next_timeout(self) -> float | None:
        deadlines = [c.deadline for c in self.pending.values()]
        deadlines += [c.deadline for c in self.children.values()]
        if self.stopping:
            deadlines.append(self.drain_deadline)
        elif self.accept_paused_until > time.monotonic():
            deadlines.append(self.accept_paused_until)
        if not deadlines:
            return None
        return max(min(deadlines) - time.monotonic(), 0.0) + 0.01

    def _slots(self) -> int:
        return self.max_children - len(self.children) - len(self.pending)

    def _set_accepting(self, on: bool) -> None:
        if on == self.accepting or self.listener.fileno() < 0:
            return
        if on:
            self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        else:
            self.sel.unregister(self.listener)
        self.accepting = on

    def _shut_listener(self) -> None:
        """Stop listening; connections still waiting in the backlog see EOF and fall back."""
        self._set_accepting(False)
        if self.unlink_path:
            try:
                if os.stat(self.unlink_path).st_ino == self.unlink_ino:
                    os.unlink(self.unlink_path)
            except OSError:
                pass
        self.listener.close()
        for conn in list(self.pending.values()):
            self._drop(conn, "")

    def _read_done(self) -> None:
        try:
            data = os.read(self.done_r, 4096)
        except BlockingIOError:
            return
        n = len(data) // 4  # 4-byte writes are atomic (< PIPE_BUF), so never split
        for pid in struct.unpack(f"{n}i", data[:n * 4]):
            conn = self.children.get(pid)
            if conn is not None:
                conn.done = True

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    # ------------------------------------------------------------------ connections

    def _accept(self) -> None:
        while self._slots() > 0:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # EMFILE and friends: try again a little later
                _log(f"accept failed: {e}; pausing for 0.2 s")
                self.accept_paused_until = time.monotonic() + 0.2
                self._set_accepting(False)
                return
            sock.setblocking(False)
            try:
                pid, uid = _peer_cred(sock)
            except OSError as e:
                _log(f"cannot read the peer's credentials: {e}")
                sock.close()
                continue
            if uid not in self.allowed_uids:
                _log(f"refused a client: pid {pid} uid {uid} (allowed uids: "
                     f"{sorted(self.allowed_uids)})")
                try:
                    sock.send(REFUSE)
                except OSError:
                    pass
                sock.close()
                continue
            conn = Conn(sock, (pid, uid), time.monotonic() + self.request_timeout)
            try:
                sock.send(HELLO)
            except OSError:  # it waited in the backlog past its connect timeout
                _log(f"client pid {pid} gave up before it was served (it runs the launcher)")
                sock.close()
                continue
            self.pending[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def _drop(self, conn: Conn, why: str) -> None:
        """Forget a connection whose request was not taken (the client falls back)."""
        if why:
            _log(f"dropped a request from pid {conn.peer[0]} uid {conn.peer[1]}: {why}")
        self.pending.pop(conn.sock.fileno(), None)
        self._unregister(conn)
        conn.close()

    def _unregister(self, conn: Conn) -> None:
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _on_readable(self, conn: Conn) -> None:
        if conn.pid:
            self._on_running_readable(conn)
            return
        try:
            data, anc, flags, _ = conn.sock.recvmsg(
                65536, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError as e:
            self._drop(conn, f"receive failed: {e}")
            return
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                n = len(cdata) // 4
                conn.fds += struct.unpack(f"{n}i", cdata[:n * 4])
        try:
            if flags & socket.MSG_CTRUNC:
                raise BadRequest("more fds attached than the protocol allows")
            if anc and conn.buf:
                raise BadRequest("fds attached after the first bytes")
            if not data:
                raise BadRequest("connection closed before a whole request arrived"
                                 if conn.buf else "connection closed without a request")
            conn.buf += data
            if len(conn.buf) < HEADER.size:
                return
            env_len = check_header(conn.buf)[2]  # garbage is dropped at once, not timed out
            if len(conn.buf) < HEADER.size + env_len:
                return
            req = decode_request(conn.buf, conn.fds)
        except BadRequest as e:
            self._drop(conn, str(e))
            return
        self._start(conn, req)

    def _on_running_readable(self, conn: Conn) -> None:
        """The client sends nothing after its request: readable means it hung up."""
        try:
            data = conn.sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._unregister(conn)  # once is enough either way
        self._read_done()
        if data:
            _log(f"ignoring bytes from the client of child {conn.pid} ({conn.summary})")
            return
        if conn.done:
            return  # it got its status and left
        _log(f"client of child {conn.pid} ({conn.summary}) hung up: killing the child")
        try:
            os.kill(conn.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # ------------------------------------------------------------------ children

    def _start(self, conn: Conn, req: Request) -> None:
        self.pending.pop(conn.sock.fileno(), None)
        conn.summary = req.summary
        try:
            conn.sock.send(ACK)  # the commit point: from here the client never runs it itself
        except OSError as e:
            self._unregister(conn)
            conn.close()
            _log(f"client of {req.summary} went away before its request was taken: {e}")
            return
        try:
            pid = os.fork()
        except OSError as e:
            _log(f"fork failed for {req.summary}: {e}; the client runs it itself")
            try:
                conn.sock.send(NOT_RUN)
            except OSError:
                pass
            self._unregister(conn)
            conn.close()
            return
        if pid == 0:
            self._child(conn, req)
        for fd in conn.fds:
            os.close(fd)
        conn.fds = []
        conn.pid = pid
        conn.started = time.monotonic()
        conn.deadline = conn.started + self.child_timeout
        self.children[pid] = conn

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            ms = (time.monotonic() - conn.started) * 1000
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                if not conn.done:  # else it had sent its status: nothing was lost
                    _log(f"child {pid} ({conn.summary}) killed by signal {sig} after "
                         f"{ms:.0f} ms")
                    try:
                        conn.sock.send(b"K" + bytes([sig & 0xFF]) + b"\0\0")
                    except OSError:
                        pass
            elif self.verbose or os.WEXITSTATUS(status) != 0:
                _log(f"child {pid} ({conn.summary}) exit {os.WEXITSTATUS(status)} "
                     f"in {ms:.1f} ms")
            self._unregister(conn)
            conn.close()

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in list(self.pending.values()):
            if now >= conn.deadline:
                self._drop(conn, f"no whole request within {self.request_timeout:g} s")
        drained = self.stopping and now >= self.drain_deadline
        for pid, conn in self.children.items():
            if now >= conn.deadline or drained:
                _log(f"child {pid} ({conn.summary}) still running after "
                     f"{now - conn.started:.0f} s: killing it")
                conn.deadline = now + 3600  # once
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _child(self, conn: Conn, req: Request) -> NoReturn:
        """In the forked child: become the plugin process the launcher would have been."""
        status, rc = NOT_RUN, 1
        try:
            self._become_caller(conn, req)
        except BaseException:  # noqa: BLE001 - the plugin never ran: the client runs it
            traceback.print_exc(file=sys.stderr)
        else:
            try:
                rc = netagent.cni.plugin.main()
                sys.stdout.flush()
            except BaseException:  # noqa: BLE001 - main() is CNI-shaped; this is a last resort
                traceback.print_exc(file=sys.stderr)
                err = CniError(INTERNAL, "netagent CNI server: the plugin failed unexpectedly")
                try:
                    sys.stdout.write(dumps(err.to_json(netagent.cni.skel.LATEST)))
                    sys.stdout.flush()
                except BaseException:  # noqa: BLE001
                    pass
                rc = 1
            status = b"X" + bytes([rc & 0xFF]) + b"\0\0"
        try:
            os.write(self.done_w, struct.pack("i", os.getpid()))
        except BaseException:  # noqa: BLE001 - the server is gone: the client still waits
            pass
        try:
            conn.sock.send(status)
        except BaseException:  # noqa: BLE001 - the client is gone; nothing to tell
            pass
        os._exit(rc & 0xFF)

    def _become_caller(self, conn: Conn, req: Request) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        # the server's fds are not the plugin's: close them through their objects, so no
        # stale object can later close an fd number the plugin reuses
        self.sel.close()
        if self.listener.fileno() >= 0:
            self.listener.close()
        for other in [*self.pending.values(), *self.children.values()]:
            other.close()  # with the fds of requests still arriving: not ours to hold open
        os.close(self.wake_r)
        os.close(self.wake_w)
        os.close(self.done_r)  # done_w stays: _child reports through it
        for target, fd in enumerate(req.stdio):
            os.dup2(fd, target)
        if req.netns >= 0 and not _same_netns(req.netns):
            setns(req.netns, CLONE_NEWNET)
        if req.cwd >= 0:
            os.fchdir(req.cwd)
        for fd in req.fds():
            if fd > 2:
                os.close(fd)
        conn.fds = []
        os.umask(req.umask)
        os.environ.clear()
        os.environ.update(req.env)
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace",  # noqa: SIM115
                          closefd=False)


# ---------------------------------------------------------------------- sockets


def inherited_socket() -> socket.socket | None:
    """The socket systemd passed (LISTEN_FDS, socket activation), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    if count < 1:
        return None
    if count > 1:
        _log(f"systemd passed {count} sockets; using the first")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    os.set_inheritable(sock.fileno(), False)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise SystemExit("netagent-cni-server: the inherited socket is not a unix stream socket")
    return sock


def bind_socket(path: str, backlog: int = 128) -> socket.socket:
    """Listen on ``path`` (mode 0600) in a directory only we can write (created 0700)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid()
            or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise SystemExit(f"netagent-cni-server: {directory} must be a directory owned by uid "
                         f"{os.getuid()} and not writable by group or others")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SystemExit(f"netagent-cni-server: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # left by a server that died
        else:
            raise SystemExit(f"netagent-cni-server: another server listens on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600: no window in which others could connect
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return sock


def _std_fds_open() -> None:
    """Received fds must never land on 0-2, so those are always taken."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(os.open(os.devnull, os.O_RDWR), fd)


def _warm_up() -> None:
    """Build what the plugin builds lazily (the libc setns binding) once, not per child."""
    fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd, CLONE_NEWNET)  # our own namespace: a no-op, but the binding is now made
    except OSError:
        pass  # not root: the binding exists anyway
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netagent-cni-server", description=__doc__.splitlines()[0])
    ap.add_argument("--socket", default=os.environ.get("NETAGENT_CNI_SOCKET") or DEFAULT_SOCKET,
                    help=f"path to listen on when not socket-activated (default {DEFAULT_SOCKET})")
    ap.add_argument("--max-children", type=int, default=32,
                    help="requests run at once; more wait in the listen backlog (default 32)")
    ap.add_argument("--request-timeout", type=float, default=5.0,
                    help="seconds a client has to send its request after the hello")
    ap.add_argument("--child-timeout", type=float, default=300.0,
                    help="a child still running after this many seconds is killed (the "
                    "plugin's own deadline, 20 s by default, normally ends it first)")
    ap.add_argument("--drain-timeout", type=float, default=30.0,
                    help="on SIGTERM, seconds to let running children finish")
    ap.add_argument("--verbose", action="store_true", help="log every request")
    args = ap.parse_args(argv)
    if args.max_children < 1:
        ap.error("--max-children must be at least 1")
    _std_fds_open()
    listener = inherited_socket()
    unlink_path = ""
    if listener is None:
        listener = bind_socket(args.socket)
        unlink_path = args.socket
    _warm_up()
    gc.collect()
    gc.freeze()  # keep the collector off the pre-fork heap: fewer pages copied per child
    server = Server(listener, max_children=args.max_children,
                    request_timeout=args.request_timeout, child_timeout=args.child_timeout,
                    drain_timeout=args.drain_timeout, verbose=args.verbose,
                    unlink_path=unlink_path)
    return server.serve()


if __name__ == "__main__":
    sys.exit(main())
