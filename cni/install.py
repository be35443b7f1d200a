"""``netagent install-cni``: put the plugin where runtimes look (``CNI_PATH``) plus a conflist.

The executable is a four-line launcher, not pip's console-script wrapper: its shebang runs the
current interpreter with ``-I -S`` (written ``-IS``: Linux passes a single shebang argument) and
it puts the directory that holds the ``cni`` package first on ``sys.path``. Measured on the dev
host (bench/README.md): ``python3 -c pass`` 36 ms with site-packages (.pth files of the
installed dependencies), 7.4 ms with ``-I -S``. ``-I`` also keeps a runtime's PYTHON* variables
and working directory from changing which code runs as root.
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
CONFLIST_NAME = "10-netagent.conflist"


def launcher_source(python: str, package_parent: str) -> str:
    """Text of the executable; ``package_parent`` is the directory containing ``cni/``."""
    return (
        f"#!{python} -IS\n"
        '"""netagent CNI plugin launcher, written by `netagent install-cni`."""\n'
        "import sys\n"
        f"sys.path.insert(0, {package_parent!r})\n"
        "from cni.plugin import main\n"
        "sys.exit(main())\n"
    )


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


def install_cni(bin_dir: str, conf_dir: str, *, subnet_file: str = "/run/flannel/subnet.env",
                force: bool = False) -> list[str]:
    """Install the plugin executable and, unless one exists (or ``force``), the conflist.

    The executable is always rewritten (an upgrade must replace it); an existing conflist is an
    operator's choice and is kept unless ``force``. Returns the paths written.
    """
    package_parent = str(Path(__file__).resolve().parent.parent)
    # byte-compile now so the first pods do not pay for it (or fail on a read-only tree)
    compileall.compile_dir(str(Path(package_parent) / "cni"), quiet=1)
    written = []
    exe = Path(bin_dir) / PLUGIN_TYPE
    _atomic_write(exe, launcher_source(sys.executable, package_parent), 0o755)
    written.append(str(exe))
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

    def run(args: argparse.Namespace) -> int:
        for path in install_cni(args.bin_dir, args.conf_dir, subnet_file=args.subnet_file,
                                force=args.force):
            print(path)
        return 0

    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Standalone ``python -m cni.install`` until the lead wires it into ``netagent``."""
    parser = argparse.ArgumentParser(prog="netagent")
    sub = parser.add_subparsers(dest="command", required=True)
    add_install_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
