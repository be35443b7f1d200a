"""Drive CNI plugins the way libcni does (env + stdin in, JSON on stdout) in test namespaces."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support.harness import RUN_ID, add_netns, del_netns, need, sh

REF_PLUGINS = "/usr/lib/cni"


class CniCall:
    """Outcome of one plugin execution."""

    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.json: Any = json.loads(proc.stdout) if proc.stdout.strip() else None

    def __repr__(self) -> str:
        return f"CniCall(rc={self.rc}, stdout={self.stdout!r}, stderr={self.stderr[-800:]!r})"

    def ok(self) -> Any:
        assert self.rc == 0, self
        return self.json

    def error(self, code: int) -> dict[str, Any]:
        """Assert a spec-shaped error with ``code`` (non-zero exit, JSON on stdout)."""
        assert self.rc != 0, self
        assert isinstance(self.json, dict), self
        assert self.json.get("code") == code, self
        assert isinstance(self.json.get("msg"), str) and self.json["msg"], self
        return self.json  # type: ignore[no-any-return]


def cni_env(command: str, *, cid: str = "", netns: str = "", ifname: str = "eth0",
            args: str = "", path: str = "", extra: dict[str, str] | None = None
            ) -> dict[str, str]:
    """Environment as libcni builds it (plus PATH so iptables etc. resolve)."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
           "CNI_COMMAND": command}
    if cid:
        env["CNI_CONTAINERID"] = cid
    if netns:
        env["CNI_NETNS"] = netns
    if ifname:
        env["CNI_IFNAME"] = ifname
    if args:
        env["CNI_ARGS"] = args
    if path:
        env["CNI_PATH"] = path
    env.update(extra or {})
    return env


def run_plugin(exe: str, command: str, conf: dict[str, Any] | str | None, *,
               host_ns: str | None = None, timeout: float = 60, **env_kw: Any) -> CniCall:
    """Execute ``exe`` once; ``host_ns`` runs it inside that namespace (the test "host")."""
    stdin = conf if isinstance(conf, str) else ("" if conf is None else json.dumps(conf))
    cmd = [exe] if host_ns is None else ["ip", "netns", "exec", host_ns, exe]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=cni_env(command, **env_kw), check=False)
    return CniCall(proc)


def write_subnet_env(path: Path, network: str, subnet: str, mtu: int = 1450,
                     ipmasq: bool = True, ipv6_network: str = "", ipv6_subnet: str = "") -> Path:
    """subnet.env as the daemon writes it (flannel-compat §9): an empty IPv4 pair leaves the
    IPv4 lines out (IPv6-only), an IPv6 pair adds the IPv6 lines after them (dual stack)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    if network:
        lines += [f"FLANNEL_NETWORK={network}", f"FLANNEL_SUBNET={subnet}"]
    if ipv6_network:
        lines += [f"FLANNEL_IPV6_NETWORK={ipv6_network}", f"FLANNEL_IPV6_SUBNET={ipv6_subnet}"]
    lines += [f"FLANNEL_MTU={mtu}", f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def random_subnet() -> tuple[str, str, str]:
    """(overlay network /16, host subnet /24 with .1, prefix "a.b.c") unlikely to collide."""
    a = random.randrange(100, 199)
    c = random.randrange(1, 250)
    return f"10.{a}.0.0/16", f"10.{a}.{c}.1/24", f"10.{a}.{c}"


def random_subnet6() -> tuple[str, str, str]:
    """(overlay network /56, host subnet /64 with ::1, prefix "fd6e:…::") in a random ULA."""
    a, g = random.randrange(1, 0xFFFF), random.randrange(1, 0xFFFF)
    b, c = random.randrange(16, 256), random.randrange(256)  # 4th group: 4 digits, canonical
    head = f"fd6e:{a:x}:{g:x}:{b:02x}"
    return f"{head}00::/56", f"{head}{c:02x}::1/64", f"{head}{c:02x}::"


class CniHost:
    """A run-unique test "host" namespace with its own subnet.env, IPAM dir and bridge name.

    ``stack`` is "v4" (IPv4 subnet.env), "dual" (both pairs) or "v6" (IPv6 lines only); the
    IPv6 attributes (``network6``, ``subnet6``, ``prefix6``, ``gateway6``) are "" without IPv6.
    """

    def __init__(self, tmp: Path, tag: str, *, mtu: int = 1450, ipmasq: bool = True,
                 stack: str = "v4") -> None:
        assert stack in ("v4", "dual", "v6"), stack
        self.tag = tag
        self.stack = stack
        self.ns = f"na{RUN_ID}{tag}"
        self.bridge = f"nb{RUN_ID}{tag}"[:15]
        self.network, self.subnet, self.prefix = random_subnet()
        self.gateway = f"{self.prefix}.1"
        self.network6 = self.subnet6 = self.prefix6 = self.gateway6 = ""
        if stack != "v4":
            self.network6, self.subnet6, self.prefix6 = random_subnet6()
            self.gateway6 = f"{self.prefix6}1"
        if stack == "v6":
            self.network = self.subnet = self.prefix = self.gateway = ""
        self.mtu = mtu
        self.dir = tmp / f"cni-{tag}"
        self.subnet_file = write_subnet_env(self.dir / "subnet.env", self.network, self.subnet,
                                            mtu, ipmasq, self.network6, self.subnet6)
        self.data_dir = self.dir / "ipam"
        self.name = f"nanet{RUN_ID}{tag}"
        self.pods: list[str] = []
        add_netns(self.ns)

    def pod(self, i: int | str) -> str:
        """Create pod namespace ``i``; returns its /run/netns path."""
        name = f"{self.ns}p{i}"
        add_netns(name)
        self.pods.append(name)
        return f"/run/netns/{name}"

    def drop_pod(self, path: str) -> None:
        name = Path(path).name
        del_netns(name)
        if name in self.pods:
            self.pods.remove(name)

    def conf(self, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "cniVersion": version, "name": self.name, "type": "netagent",
            "bridge": self.bridge, "subnetFile": str(self.subnet_file),
            "dataDir": str(self.data_dir), "hairpinMode": True, "ipMasq": False,
            "subnetFileWait": 0,
        }
        conf.update(extra)
        return conf

    def reservations(self) -> dict[str, str]:
        """IP → "cid/ifname" of every address file in the IPAM dir."""
        out = {}
        if self.data_dir.is_dir():
            for f in self.data_dir.iterdir():
                if f.name[0].isdigit() or ":" in f.name:
                    cid, _, ifname = f.read_bytes().decode().partition("\r\n")
                    out[f.name] = f"{cid}/{ifname}"
        return out

    def host_veths(self) -> list[str]:
        out = sh("ip", "-o", "link", "show", "type", "veth", ns=self.ns).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*args, ns=self.ns, check=check)

    def close(self) -> None:
        for name in list(self.pods):
            del_netns(name)
        del_netns(self.ns)  # takes the bridge, veths and nat rules of this namespace with it


@contextlib.contextmanager
def cni_host(tmp: Path, tag: str, **kw: Any) -> Iterator[CniHost]:
    host = CniHost(tmp, tag, **kw)
    try:
        yield host
    finally:
        host.close()


def pod_addrs(netns_path: str, ifname: str = "eth0", family: str = "-4") -> list[str]:
    """Addresses on ``ifname``; ``family="-6"`` lists global IPv6 ones (no link-local)."""
    args = ["ip", "-o", family, "addr", "show", "dev", ifname]
    if family == "-6":
        args += ["scope", "global"]
    out = sh(*args, ns=Path(netns_path).name).stdout
    return [line.split()[3] for line in out.splitlines()]


def pod_routes(netns_path: str, family: str = "-4") -> list[str]:
    out = sh("ip", family, "route", "show", ns=Path(netns_path).name).stdout
    return [" ".join(line.split()) for line in out.splitlines()]


# --------------------------------------------------------------------------- install + server


def is_elf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


class CniServer:
    """``netagent.py --server`` (cni/server.py) on a socket of its own, started by PID.

    ``ns`` starts it inside that namespace (as systemd starts it on a host); stderr goes to
    ``log_path``. Only this process (and its children, the requests) is ever signalled.
    """

    def __init__(self, launcher: str, socket_path: Path, log_path: Path, *args: str,
                 ns: str | None = None, prefix: tuple[str, ...] = ()) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        cmd = [*prefix, launcher, "--server", "--socket", str(socket_path), "--verbose", *args]
        if ns is not None:
            cmd = ["ip", "netns", "exec", ns, *cmd]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"CNI server did not start: {self.log()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def children(self) -> list[int]:
        """PIDs of the requests running now (the server's child processes)."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(x) for x in text.split()]

    def wait_for_child(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kids = self.children()
            if kids:
                return kids[0]
            time.sleep(0.01)
        raise AssertionError(f"no request started within {timeout} s: {self.log()}")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 30) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def install_plugin(d: Path, client: str = "auto", socket_path: Path | None = None
                   ) -> tuple[str, str]:
    """install_cni into ``d``: (what runtimes exec, the Python launcher)."""
    from netagent.cni.install import install_cni

    sock = socket_path or d / "run" / "cni.sock"
    written = install_cni(str(d / "bin"), str(d / "net.d"), client=client,
                          socket_path=str(sock))
    return written[0], written[1]


def plugin_fixture() -> Any:
    """What install_cni installs (the C client when a compiler exists) into a temp bin dir,
    exactly what runtimes exec, with a CNI server for the session on the socket built into the
    client: every call goes client → server → forked plugin. Without a compiler the plugin is
    the Python launcher and no server runs."""
    import pytest

    @pytest.fixture(scope="session")
    def plugin_exe(tmp_path_factory: Any) -> Iterator[str]:
        d = tmp_path_factory.mktemp("cni-bin")
        exe, launcher = install_plugin(d)
        if not is_elf(exe):
            yield exe
            return
        server = CniServer(launcher, d / "run" / "cni.sock", d / "server.log")
        try:
            yield exe
        finally:
            alive = server.alive()
            server.stop()
            assert alive, f"the session's CNI server died: {server.log()[-3000:]}"

    return plugin_exe


def launcher_fixture() -> Any:
    """The Python launcher alone (``install-cni --client python``, the old behaviour)."""
    import pytest

    @pytest.fixture(scope="session")
    def launcher_exe(tmp_path_factory: Any) -> str:
        return install_plugin(tmp_path_factory.mktemp("cni-launcher"), client="python")[0]

    return launcher_exe


def cni_path(exe: str) -> str:
    """CNI_PATH with our bin dir first and Debian's reference plugins after it."""
    return f"{Path(exe).parent}:{REF_PLUGINS}"


# --------------------------------------------------------------------------- podman (cni.md §11.2)


def need_podman() -> None:
    need(shutil.which("podman") is not None and shutil.which("runc") is not None,
         "needs podman and runc (apt-get install podman runc uidmap fuse-overlayfs busybox-static)")
    need(Path("/bin/busybox").exists(), "needs busybox-static")


BUSYBOX_APPLETS = ["sh", "ip", "cat", "ls", "sleep", "ping", "echo"]


def podman_env(tmp: Path, plugin_dir: str) -> dict[str, str]:
    lab = tmp / "podman"
    (lab / "net.d").mkdir(parents=True)
    (lab / "containers.conf").write_text(f"""
[containers]
netns = "private"
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[network]
network_backend = "cni"
cni_plugin_dirs = ["{plugin_dir}", "{REF_PLUGINS}"]
network_config_dir = "{lab / 'net.d'}"
default_network = "podman"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{lab / 'events.log'}"
runtime = "runc"
""")
    (lab / "storage.conf").write_text(f"""
[storage]
driver = "vfs"
graphroot = "{lab / 'storage'}"
runroot = "{lab / 'runroot'}"
""")
    return dict(os.environ, CONTAINERS_CONF=str(lab / "containers.conf"),
                CONTAINERS_STORAGE_CONF=str(lab / "storage.conf"))


def import_busybox(tmp: Path, env: dict[str, str]) -> str:
    rootfs = tmp / "rootfs"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp"):
        (rootfs / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    tar = tmp / "bbox.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    image = f"localhost/nabbox{RUN_ID}:latest"
    subprocess.run(["podman", "import", str(tar), image], env=env, check=True,
                   capture_output=True, timeout=120)
    return image


def podman_conflist(tmp: Path, name: str, plugin_conf: dict[str, Any]) -> None:
    """Write ``name``.conflist (our plugin, then portmap) into the podman lab's net.d."""
    conf = {k: v for k, v in plugin_conf.items() if k not in ("cniVersion", "name")}
    conflist = {"cniVersion": "1.0.0", "name": name,
                "plugins": [conf, {"type": "portmap", "capabilities": {"portMappings": True}}]}
    (tmp / "podman" / "net.d" / f"{name}.conflist").write_text(json.dumps(conflist))
