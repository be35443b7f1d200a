"""The C client (cni/client.c) and the CNI server (cni/server.py), driven as libcni drives a plugin.

Tiers as elsewhere: the pure request decoder and the units need no root; the rest runs the
compiled client (env + stdin in, JSON on stdout, exit code) into real namespaces, through
servers each test starts on its own socket (``NETAGENT_CNI_SOCKET`` points the client there),
and checks what happens when the server is missing, stopped, killed mid-request, flooded with
concurrent calls or fed garbage.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cni import (
    CniCall,
    CniHost,
    CniServer,
    cni_env,
    cni_host,
    cni_path,
    install_plugin,
    launcher_fixture,
    plugin_fixture,
    pod_addrs,
    run_plugin,
    write_subnet_env,
)
from support.harness import REPO, RUN_ID, need, need_root

from netagent.cni.install import find_compiler
from netagent.cni.server import HEADER, BadRequest, decode_request

plugin_exe = plugin_fixture()
launcher_exe = launcher_fixture()

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def client() -> Iterator[tuple[str, str]]:
    """(C client, Python launcher) installed into a world-readable dir (the uid test runs it as
    nobody); the built-in socket does not exist, so without NETAGENT_CNI_SOCKET it falls back."""
    need(find_compiler() is not None, "needs a C compiler (apt-get install gcc libc6-dev)")
    d = Path(tempfile.mkdtemp(prefix=f"nacli{RUN_ID}"))
    d.chmod(0o755)
    try:
        yield install_plugin(d, client="c", socket_path=d / "none" / "cni.sock")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def servers() -> Iterator[Callable[..., CniServer]]:
    """Start servers on short, run-unique socket paths (sun_path holds 108 bytes); all are
    stopped, by PID, at the end of the test."""
    started: list[CniServer] = []
    dirs: list[str] = []

    def start(launcher: str, *args: str, ns: str | None = None,
              prefix: tuple[str, ...] = ()) -> CniServer:
        d = tempfile.mkdtemp(prefix=f"nasrv{RUN_ID}")
        dirs.append(d)
        srv = CniServer(launcher, Path(d) / "run" / "cni.sock", Path(d) / "server.log", *args,
                        ns=ns, prefix=prefix)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _via(srv: CniServer | str) -> dict[str, str]:
    """Client env pointing at a server (or at a path where none listens)."""
    return {"NETAGENT_CNI_SOCKET": str(srv.socket_path if isinstance(srv, CniServer) else srv)}


def _call(exe: str, h: CniHost, cmd: str, conf: Any, cid: str, netns: str = "",
          extra: dict[str, str] | None = None, **kw: Any) -> CniCall:
    return run_plugin(exe, cmd, conf, host_ns=h.ns, cid=cid, netns=netns, path=cni_path(exe),
                      extra=extra, **kw)


def _start(exe: str, h: CniHost, cmd: str, conf: Any, cid: str, netns: str,
           extra: dict[str, str]) -> subprocess.Popen[str]:
    """A call left running (to kill things under it); finish it with _finish."""
    proc = subprocess.Popen(["ip", "netns", "exec", h.ns, exe], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cni_env(cmd, cid=cid, netns=netns, path=cni_path(exe),
                                        extra=extra))
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(conf))
    proc.stdin.close()
    return proc


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> CniCall:
    assert proc.stdout is not None and proc.stderr is not None
    proc.wait(timeout=timeout)
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return CniCall(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))


def _requests(srv: CniServer, verb: str, expect: int = 0) -> int:
    """How many calls of ``verb`` the server ran to the end (its --verbose lines), waiting up
    to 5 s for ``expect`` of them: a child answers its client before the server reaps it."""
    deadline = time.monotonic() + 5
    while True:
        n = sum(1 for line in srv.log().splitlines() if f"({verb}" in line and " exit " in line)
        if n >= expect or time.monotonic() > deadline:
            return n
        time.sleep(0.02)


def _wait(pred: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _shape(res: dict[str, Any]) -> dict[str, Any]:
    """A result with what differs per container (addresses, MACs, names, netns) masked."""
    def mask(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: mask(x) if k in ("interfaces", "ips", "routes", "dns") else
                    ("*" if isinstance(x, str) else x) for k, x in v.items()}
        if isinstance(v, list):
            return [mask(x) for x in v]
        return v
    return mask(res)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- pure: the decoder


def _request(env: bytes = b"CNI_COMMAND=VERSION\0PATH=/bin\0", flags: int = 3,
             magic: bytes = b"NAQ1", length: int | None = None) -> bytes:
    return HEADER.pack(magic, flags, 0o022, len(env) if length is None else length) + env


def test_decode_request_takes_environment_fds_and_umask() -> None:
    req = decode_request(_request(b"CNI_COMMAND=ADD\0A=b=c\0=x\0E=\0"), [7, 8, 9, 10, 11])
    assert req.env == {"CNI_COMMAND": "ADD", "A": "b=c", "E": ""}  # "=x" names nothing
    assert (req.stdio, req.netns, req.cwd, req.umask) == ([7, 8, 9], 10, 11, 0o022)
    req = decode_request(_request(flags=2), [3, 4, 5, 6])
    assert (req.netns, req.cwd) == (-1, 6)
    assert decode_request(_request(b"", flags=0), [3, 4, 5]).env == {}


@pytest.mark.parametrize("data,fds,why", [
    (b"NAQ1", [3, 4, 5], "short"),
    (_request(magic=b"GET "), [3, 4, 5, 6, 7], "magic"),
    (_request(flags=4), [3, 4, 5], "flags"),
    (_request(length=5), [3, 4, 5, 6, 7], "does not match"),
    (_request(length=(1 << 20) + 1), [3, 4, 5, 6, 7], "over the limit"),
    (_request(length=1 << 30), [3, 4, 5, 6, 7], "over the limit"),
    (_request() + b"x", [3, 4, 5, 6, 7], "does not match"),
    (_request(), [3, 4, 5], "fds"),
    (_request(flags=0), [3, 4, 5, 6], "fds"),
    (_request(b"A=b"), [3, 4, 5, 6, 7], "NUL"),
    (_request(b"NOEQUALS\0"), [3, 4, 5, 6, 7], "without '='"),
])
def test_decode_request_rejects_malformed(data: bytes, fds: list[int], why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        decode_request(data, fds)


# --------------------------------------------------------------------------- units


def test_systemd_units_pass_analyze_verify(tmp_path: Path, client: tuple[str, str]) -> None:
    """The socket and service, with ExecStart pointed at a launcher that exists here."""
    need(shutil.which("systemd-analyze") is not None, "needs systemd-analyze (apt: systemd)")
    src = REPO / "contrib" / "systemd"
    sock_unit = (src / "netagent-cni.socket").read_text()
    svc_unit = (src / "netagent-cni.service").read_text()
    assert "ListenStream=/run/netagent/cni.sock" in sock_unit
    assert "SocketMode=0600" in sock_unit and "DirectoryMode=0700" in sock_unit
    assert "ExecStart=/opt/cni/bin/netagent.py --server" in svc_unit
    assert "KillMode=mixed" in svc_unit  # SIGTERM to the server only: children finish
    (tmp_path / "netagent-cni.socket").write_text(sock_unit)
    (tmp_path / "netagent-cni.service").write_text(
        svc_unit.replace("/opt/cni/bin/netagent.py", client[1]))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           str(tmp_path / "netagent-cni.socket"),
                           str(tmp_path / "netagent-cni.service")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_socket_activation(tmp_path: Path, client: tuple[str, str]) -> None:
    """systemd's own test tool passes the listening socket (LISTEN_FDS) on the first call."""
    need(shutil.which("systemd-socket-activate") is not None,
         "needs systemd-socket-activate (apt: systemd)")
    exe, launcher = client
    d = Path(tempfile.mkdtemp(prefix=f"nasa{RUN_ID}"))
    sock, log = d / "cni.sock", d / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), launcher,
                                 "--server", "--verbose"], stdin=subprocess.DEVNULL,
                                stdout=f, stderr=f)
    try:
        _wait(sock.exists, "the activation socket")
        for _ in range(2):
            out = run_plugin(exe, "VERSION", {"cniVersion": "0.4.0"}, ifname="",
                             extra=_via(sock)).ok()
            assert out["cniVersion"] == "0.4.0"
        _wait(lambda: log.read_text().count("(VERSION) exit 0") == 2, "two calls logged")
        assert "serving on" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- protocol paths


def test_socket_and_directory_are_private(client: tuple[str, str],
                                          servers: Callable[..., CniServer]) -> None:
    srv = servers(client[1])
    assert srv.socket_path.stat().st_mode & 0o777 == 0o600
    assert srv.socket_path.parent.stat().st_mode & 0o777 == 0o700
    # a second server on the same path refuses to start; the first one keeps serving
    second = subprocess.run([client[1], "--server", "--socket", str(srv.socket_path)],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode != 0 and "another server" in second.stderr
    assert run_plugin(client[0], "VERSION", None, ifname="", extra=_via(srv)).ok()


@pytest.mark.parametrize("case", [
    ("VERSION", {"cniVersion": "0.4.0"}, {}),
    ("FOO", {"cniVersion": "1.0.0"}, {}),
    ("ADD", "{not json", {"cid": "c1", "netns": "/run/netns/x"}),
    ("ADD", {"cniVersion": "1.0.0", "name": "bad name", "type": "netagent"},
     {"cid": "c1", "netns": "/run/netns/x"}),
    ("ADD", {"cniVersion": "2.0.0", "name": "n", "type": "netagent"},
     {"cid": "c1", "netns": "/run/netns/x"}),
    ("DEL", {"cniVersion": "1.0.0", "name": "n", "type": "netagent"}, {"cid": "-x"}),
], ids=["version", "unknown-verb", "code6", "code7", "code1", "code4"])
def test_answers_match_the_launcher_through_server_and_fallback(
        case: tuple[str, Any, dict[str, str]], client: tuple[str, str], launcher_exe: str,
        servers: Callable[..., CniServer], tmp_path: Path) -> None:
    """Same stdout and exit code: launcher alone, client → server, client with no server."""
    command, conf, env = case
    srv = servers(client[1])
    calls = [run_plugin(launcher_exe, command, conf, **env),
             run_plugin(client[0], command, conf, extra=_via(srv), **env),
             run_plugin(client[0], command, conf, extra=_via(tmp_path / "none.sock"), **env)]
    assert len({(c.rc, c.stdout) for c in calls}) == 1, calls
    assert _requests(srv, command, 1) == 1, srv.log()


def test_child_runs_in_the_callers_working_directory(client: tuple[str, str],
                                                     servers: Callable[..., CniServer],
                                                     tmp_path: Path) -> None:
    """A relative subnetFile resolves where the runtime runs, as with an exec'd plugin: found
    (so ADD gets as far as the bad netns, code 4) from tmp_path, missing (code 11) from /."""
    srv = servers(client[1])
    write_subnet_env(tmp_path / "subnet.env", "10.250.0.0/16", "10.250.3.1/24")
    conf = {"cniVersion": "1.0.0", "name": "cwdnet", "type": "netagent",
            "subnetFile": "subnet.env", "dataDir": str(tmp_path / "ipam"), "subnetFileWait": 0}
    for cwd, code in ((tmp_path, 4), (Path("/"), 11)):
        proc = subprocess.run([client[0]], input=json.dumps(conf), capture_output=True,
                              text=True, cwd=cwd, timeout=30,
                              env=cni_env("ADD", cid="c1", netns=str(tmp_path / "no-netns"),
                                          extra=_via(srv)))
        CniCall(proc).error(code)
    assert _requests(srv, "ADD", 2) == 2


def test_stale_socket_and_stopped_server_fall_back(client: tuple[str, str],
                                                   servers: Callable[..., CniServer],
                                                   tmp_path: Path) -> None:
    exe, launcher = client
    # a socket file nobody listens on (a server that died): connect is refused
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    assert run_plugin(exe, "VERSION", None, ifname="", extra=_via(stale)).ok()
    # a stopped server: the connection waits in the backlog, no hello comes, the client runs
    # the launcher after its connect timeout; the server, continued, sees the client gone and
    # runs nothing
    srv = servers(launcher, "--request-timeout", "1")
    srv.signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        out = run_plugin(exe, "VERSION", {"cniVersion": "0.3.1"}, ifname="",
                         extra={**_via(srv), "NETAGENT_CNI_CONNECT_TIMEOUT_MS": "300"}).ok()
        assert out["cniVersion"] == "0.3.1" and time.monotonic() - t0 < 10
    finally:
        srv.signal(signal.SIGCONT)
    _wait(lambda: "gave up" in srv.log() or "without a request" in srv.log(),
          "the server to see the abandoned call")
    assert _requests(srv, "VERSION") == 0
    assert run_plugin(exe, "VERSION", None, ifname="", extra=_via(srv)).ok()
    assert _requests(srv, "VERSION", 1) == 1


def test_wrong_uid_is_refused(client: tuple[str, str], servers: Callable[..., CniServer]) -> None:
    """SO_PEERCRED: only root and the server's own uid. The socket is opened up for the test
    (0600 in a 0700 dir normally keeps others out before the check)."""
    need_root()
    exe, launcher = client
    srv = servers(launcher)
    for d in (srv.socket_path.parent, srv.socket_path.parent.parent):
        d.chmod(0o755)
    srv.socket_path.chmod(0o666)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a raw peer as nobody
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(str(srv.socket_path))
            os.write(w, c.recv(4))
        finally:
            os._exit(0)
    os.close(w)
    answer = os.read(r, 4)
    os.close(r)
    os.waitpid(pid, 0)
    assert answer == b"NAR1"
    # the real client as nobody: refused, says so, and runs the launcher itself (whose
    # interpreter nobody may not be allowed to run, e.g. a pyenv under /root)
    proc = subprocess.run([exe], input='{"cniVersion":"1.0.0"}', capture_output=True, text=True,
                          user=65534, group=65534, cwd="/", timeout=30,
                          env=cni_env("VERSION", ifname="", extra=_via(srv)))
    assert "refused this uid 65534" in proc.stderr
    try:
        runnable = subprocess.run([sys.executable, "-c", "pass"], user=65534, group=65534,
                                  cwd="/", capture_output=True, timeout=30).returncode == 0
    except PermissionError:
        runnable = False
    if runnable:
        assert proc.returncode == 0, proc
        assert json.loads(proc.stdout)["cniVersion"] == "1.0.0"
    else:
        assert f"execv {launcher}: Permission denied" in CniCall(proc).error(11)["details"]
    assert srv.log().count("refused a client: pid") == 2 and "uid 65534" in srv.log()
    assert _requests(srv, "VERSION") == 0 and srv.alive()


def _raw(srv: CniServer, data: bytes = b"", fds: list[int] | None = None,
         hello: bool = True) -> bytes:
    """Connect, read the hello, send ``data`` (with ``fds``), return what the server says."""
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(10)
    try:
        c.connect(str(srv.socket_path))
        if hello:
            assert c.recv(4) == b"NAH1"
        if data:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] \
                if fds else []
            c.sendmsg([data], anc)
        c.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = c.recv(64)
            if not chunk:
                return out
            out += chunk
    finally:
        c.close()


def test_malformed_requests_are_logged_and_dropped(client: tuple[str, str],
                                                   servers: Callable[..., CniServer]) -> None:
    srv = servers(client[1], "--request-timeout", "0.5")
    null = os.open(os.devnull, os.O_RDWR)
    try:
        std = [null] * 3
        cases = [
            (b"GET / HTTP/1.0\r\n\r\n", [], "bad magic"),
            (_request(), [], "0 fds attached"),
            (_request(length=1 << 30), std + [null, null], "environment length"),
            (_request()[:10], std, "before a whole request"),
            (_request(flags=0), [null] * 8, "more fds"),
            (_request(b"X\0", flags=0), std, "without '='"),
            (b"", [], "without a request"),
        ]
        for data, fds, why in cases:
            assert _raw(srv, data, fds) == b"", why
            _wait(lambda why=why: why in srv.log(), f"log line {why!r}")  # type: ignore[misc]
        # silent after the hello: dropped after --request-timeout, without blocking others
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(srv.socket_path))
        assert c.recv(4) == b"NAH1"
        assert run_plugin(client[0], "VERSION", None, ifname="", extra=_via(srv)).ok()
        c.settimeout(10)
        assert c.recv(4) == b""  # closed by the server
        c.close()
        assert "no whole request within 0.5 s" in srv.log()
        # fds after the first bytes
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(srv.socket_path))
        assert c.recv(4) == b"NAH1"
        req = _request()
        c.sendall(req[:8])
        time.sleep(0.1)
        c.sendmsg([req[8:]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                               struct.pack("5i", *[null] * 5))])
        c.settimeout(10)
        assert c.recv(4) == b""
        c.close()
        assert "fds attached after the first bytes" in srv.log()
    finally:
        os.close(null)
    assert srv.alive()
    assert run_plugin(client[0], "VERSION", None, ifname="", extra=_via(srv)).ok()
    assert _requests(srv, "VERSION", 2) == 2
    # the server holds no fd it was sent
    fds = os.listdir(f"/proc/{srv.pid}/fd")
    assert len(fds) < 12, [os.readlink(f"/proc/{srv.pid}/fd/{fd}") for fd in fds]


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_out_of_fds_pauses_accepting_without_spinning(client: tuple[str, str],
                                                      servers: Callable[..., CniServer]) -> None:
    """At RLIMIT_NOFILE accept fails (EMFILE): the server pauses instead of a busy loop, and
    serves the waiting call once an fd is free; the client meanwhile just waits."""
    need(shutil.which("prlimit") is not None, "needs prlimit (util-linux)")
    limit = 20
    srv = servers(client[1], prefix=("prlimit", f"--nofile={limit}:{limit}"))
    free = limit - len(os.listdir(f"/proc/{srv.pid}/fd"))
    assert free >= 6  # what a request needs: its connection + 5 fds
    holders = []
    for _ in range(free):  # idle connections take every free fd
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        holder.connect(str(srv.socket_path))
        assert holder.recv(4) == b"NAH1"
        holders.append(holder)
    proc = subprocess.Popen([client[0]], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=cni_env("VERSION", ifname="", extra=_via(srv)))
    _wait(lambda: "accept failed" in srv.log(), "EMFILE")
    ticks = _cpu_ticks(srv.pid)
    time.sleep(1)
    assert _cpu_ticks(srv.pid) - ticks < 20  # < 0.2 s of CPU in 1 s: not spinning
    for holder in holders:
        holder.close()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and json.loads(out)["supportedVersions"], (out, err)
    assert _requests(srv, "VERSION", 1) == 1


# --------------------------------------------------------------------------- real namespaces


@pytest.fixture
def host(tmp_path: Path) -> Iterator[CniHost]:
    need_root()
    with cni_host(tmp_path, "cl") as h:
        yield h


def test_add_check_del_through_server_match_the_launcher(
        client: tuple[str, str], launcher_exe: str, host: CniHost,
        servers: Callable[..., CniServer], tmp_path: Path) -> None:
    """The server runs in the root namespace; the plugin still acts in the caller's (the test
    host's), as an exec'd plugin would. Then the same calls with no server: the fallback."""
    exe, launcher = client
    srv = servers(launcher)
    conf = host.conf()
    results = {}
    for label, prog, extra in (("server", exe, _via(srv)), ("launcher", launcher_exe, {}),
                               ("fallback", exe, _via(tmp_path / "none.sock"))):
        pod = host.pod(label)
        res = _call(prog, host, "ADD", conf, f"c{label}", pod, extra).ok()
        results[label] = res
        assert pod_addrs(pod) == [res["ips"][0]["address"]]
        assert _call(prog, host, "CHECK", {**conf, "prevResult": res}, f"c{label}", pod,
                     extra).ok() is None
        # ADD again: the interface exists, code 103 passes through unchanged
        _call(prog, host, "ADD", conf, f"c{label}", pod, extra).error(103)
    assert _shape(results["server"]) == _shape(results["launcher"]) == _shape(
        results["fallback"])
    assert len({r["ips"][0]["address"] for r in results.values()}) == 3
    assert host.run("ip", "link", "show", host.bridge).returncode == 0  # in the test host
    for label, prog, extra in (("server", exe, _via(srv)), ("launcher", launcher_exe, {}),
                               ("fallback", exe, _via(tmp_path / "none.sock"))):
        for _ in range(2):  # DEL is idempotent
            assert _call(prog, host, "DEL", conf, f"c{label}", f"/run/netns/{host.ns}p{label}",
                         extra).ok() is None
    assert host.reservations() == {} and host.host_veths() == []
    assert (_requests(srv, "ADD", 2), _requests(srv, "CHECK", 1), _requests(srv, "DEL", 2)) == (
        2, 1, 2)


def test_concurrent_adds_get_distinct_addresses(client: tuple[str, str], host: CniHost,
                                                servers: Callable[..., CniServer]) -> None:
    """50 calls at once against 8 child slots: the rest wait in the backlog, none falls back."""
    n = 50
    exe, launcher = client
    srv = servers(launcher, "--max-children", "8")
    pods = [host.pod(i) for i in range(n)]
    conf = host.conf()
    procs = [_start(exe, host, "ADD", conf, f"cc{i}", pods[i], _via(srv)) for i in range(n)]
    results = [_finish(p).ok() for p in procs]
    addrs = [r["ips"][0]["address"] for r in results]
    assert len(set(addrs)) == n and all(a.startswith(f"{host.prefix}.") for a in addrs)
    assert len(host.reservations()) == n and len(host.host_veths()) == n
    procs = [_start(exe, host, "DEL", conf, f"cc{i}", pods[i], _via(srv)) for i in range(n)]
    assert all(_finish(p).ok() is None for p in procs)
    assert host.reservations() == {} and host.host_veths() == []
    assert _requests(srv, "ADD", n) == n and _requests(srv, "DEL", n) == n, srv.log()[-2000:]


def _slow_add(exe: str, host: CniHost, srv: CniServer, cid: str, wait: float = 8
              ) -> tuple[subprocess.Popen[str], str, int]:
    """An ADD whose child waits for subnet.env (absent until the test writes it)."""
    host.subnet_file.unlink()
    pod = host.pod(cid)
    proc = _start(exe, host, "ADD", host.conf(subnetFileWait=wait), cid, pod, _via(srv))
    child = srv.wait_for_child()
    time.sleep(0.2)  # it has read stdin and is polling for the file
    return proc, pod, child


def _restore_subnet_env(host: CniHost) -> None:
    write_subnet_env(host.subnet_file, host.network, host.subnet, host.mtu)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # reaped between the two looks: gone too
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(") ", 1)[1].startswith("Z")


def test_server_killed_mid_request_child_still_answers(client: tuple[str, str], host: CniHost,
                                                       servers: Callable[..., CniServer]
                                                       ) -> None:
    """The child reports its own status, so the call completes without the server."""
    exe, launcher = client
    srv = servers(launcher)
    proc, pod, child = _slow_add(exe, host, srv, "k1")
    srv.signal(signal.SIGKILL)
    srv.proc.wait(timeout=10)
    _restore_subnet_env(host)
    res = _finish(proc).ok()
    assert pod_addrs(pod) == [res["ips"][0]["address"]]
    # the server is gone: the next call (DEL) runs the launcher
    assert _call(exe, host, "DEL", host.conf(), "k1", pod, _via(srv)).ok() is None
    assert host.reservations() == {}


def test_server_and_child_killed_mid_request_is_code_11_not_a_rerun(
        client: tuple[str, str], host: CniHost, servers: Callable[..., CniServer]) -> None:
    """After the ack the client never runs the call again (stdin is consumed, the work may be
    half done): one CNI error 11 on stdout; the runtime's DEL and retry take it from there."""
    exe, launcher = client
    srv = servers(launcher)
    proc, pod, child = _slow_add(exe, host, srv, "k2")
    srv.signal(signal.SIGKILL)
    srv.proc.wait(timeout=10)
    os.kill(child, signal.SIGKILL)
    _restore_subnet_env(host)  # a launcher run now would succeed, so a re-run would show
    call = _finish(proc)
    err = call.error(11)
    assert "went away while running the request" in err["msg"], call
    assert call.stdout.count("{") == 1
    assert host.reservations() == {} and host.host_veths() == []


def test_child_killed_is_code_11_and_server_survives(client: tuple[str, str], host: CniHost,
                                                     servers: Callable[..., CniServer]) -> None:
    exe, launcher = client
    srv = servers(launcher)
    proc, pod, child = _slow_add(exe, host, srv, "k3")
    os.kill(child, signal.SIGKILL)
    err = _finish(proc).error(11)
    assert err["msg"] == "netagent: the plugin process was killed" and err["details"] == "signal 9"
    assert f"child {child} (ADD k3 eth0) killed by signal 9" in srv.log()
    _restore_subnet_env(host)
    assert srv.alive()
    assert _call(exe, host, "ADD", host.conf(), "k3", pod, _via(srv)).ok()
    assert _call(exe, host, "DEL", host.conf(), "k3", pod, _via(srv)).ok() is None


def test_client_killed_kills_its_child(client: tuple[str, str], host: CniHost,
                                       servers: Callable[..., CniServer]) -> None:
    """A runtime that gives up kills the plugin; through the server that still ends the call."""
    exe, launcher = client
    srv = servers(launcher)
    proc, pod, child = _slow_add(exe, host, srv, "k4", wait=30)
    proc.kill()
    _finish(proc)
    _wait(lambda: _gone(child), "the child to be killed")
    assert "(ADD k4 eth0) hung up: killing the child" in srv.log()
    assert srv.alive()


def test_sigterm_drains_running_requests(client: tuple[str, str], host: CniHost,
                                         servers: Callable[..., CniServer]) -> None:
    exe, launcher = client
    srv = servers(launcher)
    proc, pod, child = _slow_add(exe, host, srv, "d1")
    srv.signal(signal.SIGTERM)
    _wait(lambda: not srv.socket_path.exists(), "the socket to go")
    # meanwhile new calls find no socket and run the launcher
    assert run_plugin(exe, "VERSION", None, ifname="", extra=_via(srv)).ok()
    assert srv.alive()  # still waiting for its child
    _restore_subnet_env(host)
    assert _finish(proc).ok()
    assert srv.proc.wait(timeout=20) == 0
    assert "stopped" in srv.log()
    assert _call(exe, host, "DEL", host.conf(), "d1", pod, _via(srv)).ok() is None
    assert host.reservations() == {}


def test_session_fixture_goes_through_a_server(plugin_exe: str) -> None:
    """The other CNI test files use plugin_exe: it is the C client with a live server."""
    need(find_compiler() is not None, "needs a C compiler (apt-get install gcc libc6-dev)")
    log = Path(plugin_exe).parent.parent / "server.log"
    before = log.read_text().count("(VERSION) exit 0")
    assert run_plugin(plugin_exe, "VERSION", None, ifname="").ok()
    _wait(lambda: log.read_text().count("(VERSION) exit 0") == before + 1, "the call logged")


# --------------------------------------------------------------------------- under pressure


def test_200_calls_with_the_server_killed_and_restarted_then_gc(
        client: tuple[str, str], host: CniHost, servers: Callable[..., CniServer]) -> None:
    """200 concurrent ADDs; the server is SIGKILLed a quarter of the way in and a new one
    starts on the same socket. Calls in flight finish in their children, calls not yet taken
    fall back to the launcher or reach the new server; a failed ADD gets the runtime's DEL +
    retry. No address is ever given twice; after a GC (the runtime forgot 20 pods: their
    namespaces deleted, no DEL) no address and no veth is left over."""
    n, forgotten = 200, 20
    exe, launcher = client
    srv = servers(launcher, "--max-children", "8")
    pods = [host.pod(i) for i in range(n)]
    conf = host.conf()
    procs = [_start(exe, host, "ADD", conf, f"pr{i}", pods[i], _via(srv)) for i in range(n)]
    _wait(lambda: _requests(srv, "ADD") >= n // 4, "a quarter of the ADDs", timeout=120)
    srv.signal(signal.SIGKILL)
    srv.proc.wait(timeout=10)
    srv.socket_path.unlink()  # as a restarted unit would find it: gone or stale, both work
    srv2 = CniServer(launcher, srv.socket_path, srv.log_path.with_name("server2.log"),
                     "--max-children", "8")
    try:
        calls = [_finish(p, timeout=180) for p in procs]
        failed = [i for i, c in enumerate(calls) if c.rc != 0]
        for i in failed:  # the runtime's answer to a failed ADD: DEL, then ADD again
            assert calls[i].json["code"] in (11, 999), calls[i]
            assert _call(exe, host, "DEL", conf, f"pr{i}", pods[i], _via(srv2)).ok() is None
            calls[i] = _call(exe, host, "ADD", conf, f"pr{i}", pods[i], _via(srv2))
        addrs = {i: c.ok()["ips"][0]["address"] for i, c in enumerate(calls)}
        assert len(set(addrs.values())) == n, "an address was given twice"
        held = host.reservations()
        assert {f"{ip}/{host_len(host)}": owner for ip, owner in held.items()} == {
            a: f"pr{i}/eth0" for i, a in addrs.items()}
        assert len(host.host_veths()) == n
        for i in range(n):
            assert pod_addrs(pods[i]) == [addrs[i]]
        # the runtime lost 20 pods (namespaces gone, no DEL): GC with the ones it still knows
        for i in range(forgotten):
            host.drop_pod(pods[i])
        live = [{"containerID": f"pr{i}", "ifname": "eth0"} for i in range(forgotten, n)]
        gc = _call(exe, host, "GC", host.conf(**{"cni.dev/valid-attachments": live}), "",
                   extra=_via(srv2))
        assert gc.ok() is None
        assert sorted(host.reservations().values()) == sorted(f"pr{i}/eth0"
                                                              for i in range(forgotten, n))
        _wait(lambda: len(host.host_veths()) == n - forgotten, "the forgotten pods' veths gone")
        for i in range(forgotten, n):
            assert _call(exe, host, "DEL", conf, f"pr{i}", pods[i], _via(srv2)).ok() is None
        assert host.reservations() == {} and host.host_veths() == []
        assert _requests(srv2, "DEL", n - forgotten) >= n - forgotten, srv2.log()[-2000:]
        print(f"\n{n} ADDs, server killed after {_requests(srv, 'ADD')} answered: "
              f"{len(failed)} failed and were retried, {_requests(srv2, 'ADD')} ran on the "
              f"new server")
    finally:
        srv2.stop()


def host_len(host: CniHost) -> int:
    return int(host.subnet.split("/")[1])


def test_full_disk_ipam_store_fails_clearly_and_writes_nothing(
        client: tuple[str, str], host: CniHost, tmp_path: Path) -> None:
    """The IPAM store on a full file system: ADD is a clear CNI error, no reservation, no
    temporary file and no veth is left; once there is room again the same ADD works."""
    exe, _ = client
    conf = host.conf()
    pod0, pod1 = host.pod("fd0"), host.pod("fd1")
    assert _call(exe, host, "ADD", conf, "fd0", pod0).ok()  # the store exists, one address in
    host.data_dir.mkdir(parents=True, exist_ok=True)
    before = sorted(p.name for p in host.data_dir.iterdir())
    held = host.reservations()
    # a tiny tmpfs over the store, with the files it had, then filled up
    saved = {p.name: p.read_bytes() for p in host.data_dir.iterdir() if p.is_file()}
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", f"nafull{RUN_ID}",
                    str(host.data_dir)], check=True)
    try:
        for name, data in saved.items():
            (host.data_dir / name).write_bytes(data)
        filler = host.data_dir / "zz-filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        call = _call(exe, host, "ADD", conf, "fd1", pod1)
        assert call.rc != 0 and isinstance(call.json, dict), call
        msg = call.json.get("msg", "") + " " + call.json.get("details", "")
        assert "space" in msg.lower(), call
        assert host.reservations() == held
        assert sorted(p.name for p in host.data_dir.iterdir()) == sorted([*before, filler.name])
        assert len(host.host_veths()) == 1, "the failed ADD left a veth behind"
        links = subprocess.run(["ip", "netns", "exec", Path(pod1).name, "ip", "-o", "link"],
                               capture_output=True, text=True, check=True).stdout
        assert "eth0" not in links, links
        filler.unlink()
        res = _call(exe, host, "ADD", conf, "fd1", pod1).ok()
        assert pod_addrs(pod1) == [res["ips"][0]["address"]]
        for cid, pod in (("fd0", pod0), ("fd1", pod1)):
            assert _call(exe, host, "DEL", conf, cid, pod).ok() is None
    finally:
        subprocess.run(["umount", str(host.data_dir)], check=False)
