"""``netagent install-cni``: put the plugin where runtimes look (``CNI_PATH``) plus a conflist.

Two executables go into ``--bin-dir``:

- ``netagent.py``, a four-line launcher, not pip's console-script wrapper: its shebang runs the
  current interpreter with ``-I -S`` (written ``-IS``: Linux passes a single shebang argument)
  and it puts the directory that holds the ``cni`` package first on ``sys.path``. Measured on
  the dev host (bench/README.md): ``python3 -c pass`` 36 ms with site-packages (.pth files of
  the installed dependencies), 7.4 ms with ``-I -S``. ``-I`` also keeps a runtime's PYTHON*
  variables and working directory from changing which code runs as root. ``netagent.py
  --server`` runs the CNI server (``cni/server.py``; contrib/systemd/netagent-cni.*).
- ``netagent``, what runtimes exec: the C client (``cni/client.c``), compiled here with ``cc``
  when there is one (``gcc`` + ``libc6-dev`` on Debian), with the server's socket and the
  launcher's path built in. It hands the call to the server and runs the launcher itself when
  the server is not there, so ADD works with or without it. Without a compiler (or with
  ``--client python``, the old behaviour) ``netagent`` is a copy of the launcher.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import sys
import tempfile
from pathlib import Path

PLUGIN_TYPE = "netagent"
LAUNCHER_NAME = "netagent.py"
CONFLIST_NAME = "10-netagent.conflist"
DEFAULT_SOCKET = "/run/netagent/cni.sock"  # cni.server.DEFAULT_SOCKET (not imported: it is big)
CLIENT_CHOICES = ("auto", "c", "python")


def launcher_source(python: str, package_parent: str) -> str:
    """Text of the launcher; ``package_parent`` is the directory containing ``netagent/``.

    Runtimes never pass arguments to a CNI plugin, so ``--server`` cannot clash with a call.
    """
    return (
        f"#!{python} -IS\n"
        '"""netagent CNI plugin launcher, written by `netagent install-cni`."""\n'
        "import sys\n"
        f"sys.path.insert(0, {package_parent!r})\n"
        "if sys.argv[1:2] == ['--server']:\n"
        "    from netagent.cni.server import main as serve\n"
        "    sys.exit(serve(sys.argv[2:]))\n"
        "from netagent.cni.plugin import main\n"
        "sys.exit(main())\n"
    )


def _c_string(text: str) -> str:
    """``text`` as a C string literal (for -D): printable ASCII kept, everything else octal."""
    out = []
    for b in text.encode():
        ch = chr(b)
        if ch in '"\\' or not 32 <= b < 127:
            out.append(f"\\{b:03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def find_compiler() -> str | None:
    """``$CC``, else ``cc``/``gcc``/``clang`` on PATH."""
    import shutil

    for cand in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def build_client(out: Path, *, socket_path: str, launcher: str, cc: str) -> None:
    """Compile cni/client.c to ``out`` with the socket and launcher paths built in.

    Static when the C library allows it (0.25 ms less per exec here: no dynamic loader),
    else dynamic. Raises RuntimeError with the compiler's message when neither links.
    """
    import subprocess

    src = Path(__file__).resolve().parent / "client.c"
    if not src.is_file():
        raise RuntimeError(f"{src} is missing (installed without the C source)")
    base = [cc, "-std=c99", "-O2", "-Wall", "-Wextra", "-s",
            f"-DNETAGENT_CNI_SOCKET={_c_string(socket_path)}",
            f"-DNETAGENT_LAUNCHER={_c_string(launcher)}", "-o", str(out), str(src)]
    errors = []
    for extra in (["-static"], []):
        proc = subprocess.run([*base[:1], *extra, *base[1:]], capture_output=True, text=True,
                              timeout=120, check=False)
        if proc.returncode == 0:
            return
        errors.append(proc.stderr.strip())
    raise RuntimeError(f"{cc} failed: {errors[-1][-2000:]}")


def default_conflist(subnet_file: str) -> dict[str, object]:
    """Like flannel's 10-flannel.conflist: our plugin, then portmap for hostPort."""
    return {
        "name": "netagent",
        "cniVersion": "1.0.0",
        # libcni >= 1.2 picks the highest it supports (GC/STATUS); 1.1.x ignores the list
        "cniVersions": ["1.0.0", "1.1.0"],
        "plugins": [
            {
                "type": PLUGIN_TYPE,
                "subnetFile": subnet_file,
                "hairpinMode": True,
                "isDefaultGateway": True,
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def _atomic_write(path: Path, data: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)  # a runtime exec'ing the old file never sees a half-written one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _note(msg: str) -> None:
    sys.stderr.write(f"install-cni: {msg}\n")


def install_cni(bin_dir: str, conf_dir: str, *, subnet_file: str = "/run/flannel/subnet.env",
                force: bool = False, client: str = "auto", socket_path: str = DEFAULT_SOCKET,
                cc: str | None = None) -> list[str]:
    """Install the plugin executable, its launcher and, unless one exists (or ``force``), the
    conflist.

    ``client``: ``"c"`` compiles the C client (error without a compiler), ``"python"`` makes
    ``netagent`` the launcher itself (the behaviour before the server existed), ``"auto"`` the
    C client when a compiler is found, else the launcher with a note on stderr. The
    executables are always rewritten (an upgrade must replace them); an existing conflist is
    an operator's choice and is kept unless ``force``. Returns the paths written, the
    runtime's executable first.
    """
    if client not in CLIENT_CHOICES:
        raise ValueError(f"client must be one of {CLIENT_CHOICES}, not {client!r}")
    # the directory holding the netagent package (site-packages, or a source checkout, where
    # netagent/cni is a symlink to cni/): not resolved, so the symlink is kept
    package_parent = str(Path(__file__).absolute().parents[2])
    # byte-compile now so the first pods do not pay for it (or fail on a read-only tree)
    compileall.compile_dir(str(Path(package_parent) / "netagent" / "cni"), quiet=1)
    exe = Path(bin_dir) / PLUGIN_TYPE
    launcher = Path(bin_dir) / LAUNCHER_NAME
    launcher_text = launcher_source(sys.executable, package_parent)
    _atomic_write(launcher, launcher_text, 0o755)
    compiler = cc or (find_compiler() if client != "python" else None)
    if client == "c" and compiler is None:
        raise RuntimeError("--client c needs a C compiler (apt-get install gcc libc6-dev)")
    if compiler is not None:
        exe.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{exe.name}.", dir=exe.parent)
        os.close(fd)
        try:
            build_client(Path(tmp), socket_path=socket_path,
                         launcher=str(launcher.resolve()), cc=compiler)
            os.chmod(tmp, 0o755)
            os.replace(tmp, exe)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if client == "c" or not isinstance(e, (RuntimeError, OSError)):
                raise
            _note(f"cannot build the C client ({e}); installed the Python launcher as "
                  f"{exe} instead")
            compiler = None
    elif client == "auto":
        _note(f"no C compiler found: installed the Python launcher as {exe} (about 10 ms more "
              "per CNI call than the C client; apt-get install gcc libc6-dev and re-run)")
    if compiler is None:
        _atomic_write(exe, launcher_text, 0o755)
    written = [str(exe), str(launcher)]
    conf = Path(conf_dir) / CONFLIST_NAME
    if force or not conf.exists():
        _atomic_write(conf, json.dumps(default_conflist(subnet_file), indent=2) + "\n", 0o644)
        written.append(str(conf))
    return written


def add_install_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]
                       ) -> argparse.ArgumentParser:
    """Register ``install-cni``; the parser's ``func`` runs it and returns an exit code."""
    p = subparsers.add_parser("install-cni", help="install the CNI plugin and a default conflist")
    p.add_argument("--bin-dir", default="/opt/cni/bin", help="where runtimes find plugins")
    p.add_argument("--conf-dir", default="/etc/cni/net.d", help="where runtimes find conflists")
    p.add_argument("--subnet-file", default="/run/flannel/subnet.env",
                   help="subnet.env the plugin reads (written by the daemon)")
    p.add_argument("--force", action="store_true", help="overwrite an existing conflist")
    p.add_argument("--client", choices=CLIENT_CHOICES, default="auto",
                   help="what runtimes exec: the C client talking to the CNI server (c), the "
                   "Python launcher as before (python), or c when a compiler exists (auto)")
    p.add_argument("--socket", default=DEFAULT_SOCKET,
                   help="CNI server socket built into the C client")

    def run(args: argparse.Namespace) -> int:
        try:
            written = install_cni(args.bin_dir, args.conf_dir, subnet_file=args.subnet_file,
                                  force=args.force, client=args.client, socket_path=args.socket)
        except RuntimeError as e:
            _note(str(e))
            return 1
        for path in written:
            print(path)
        return 0

    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Standalone ``python -m netagent.cni.install`` until the lead wires it into ``netagent``."""
    parser = argparse.ArgumentParser(prog="netagent")
    sub = parser.add_subparsers(dest="command", required=True)
    add_install_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
