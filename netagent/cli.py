"""The `netagent` command. `main` only parses and composes; each command lives in one function.

Heavy imports (the etcd client/grpc, pyroute2) happen inside the commands that need them, so
`--help`, `docker-opts` and `config validate FILE` start fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from netagent import __version__

EXAMPLES = {
    "run": "example:\n  netagent run --etcd-endpoints http://10.0.0.1:2379 --iface eth0",
    "docker-opts": "example:\n  netagent docker-opts -k DOCKER_NETWORK_OPTIONS -d /run/flannel/docker",
    "config": "example:\n  netagent config validate net.json\n  echo '{\"Network\":\"10.5.0.0/16\"}' | "
              "netagent config validate -",
    "config validate": "example:\n  netagent config validate /etc/netagent/net.json",
    "config get": "example:\n  netagent config get --etcd-endpoints http://10.0.0.1:2379\n"
                  "  netagent config get --json | jq .Network",
    "config set": "example:\n  netagent config set net.json --etcd-endpoints http://10.0.0.1:2379\n"
                  "  echo '{\"Network\":\"10.5.0.0/16\"}' | netagent config set -",
    "status": "example:\n  netagent status --state-dir /var/lib/netagent "
              "--etcd-endpoints http://10.0.0.1:2379\n  netagent status --json | jq .peers",
    "leases": "example:\n  netagent leases --etcd-endpoints http://10.0.0.1:2379\n"
              "  netagent leases --json | jq '.leases[] | select(.reserved)'",
    "doctor": "example:\n  netagent doctor --etcd-endpoints http://10.0.0.1:2379 --iface eth0\n"
              "  netagent doctor --json | jq '.checks[] | select(.ok == false)'",
    "migrate-v2": "example:\n  netagent migrate-v2 --etcd-endpoints http://10.0.0.1:2379\n"
                  "  netagent migrate-v2 --force   # replace a different v3 config",
    "cleanup": "example:\n  netagent cleanup --dry-run           # what would be removed\n"
               "  netagent cleanup --release-lease --etcd-endpoints http://10.0.0.1:2379",
    "install-cni": "example:\n  netagent install-cni --bin-dir /opt/cni/bin --conf-dir /etc/cni/net.d",
}


def _fmt(parser_name: str) -> dict[str, object]:
    return {
        "epilog": EXAMPLES.get(parser_name, ""),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# --------------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    from netagent.settings import SettingsError, load_settings, read_config_file

    try:
        settings = load_settings(args, os.environ, read_config_file(args.config))
    except SettingsError as exc:
        print(f"netagent: {exc}", file=sys.stderr)
        return 1
    setup_logging(settings.effective_log_level)
    from netagent.daemon import Daemon
    from netagent.registry import RegistryError

    try:
        daemon = Daemon(settings)
    except RegistryError as exc:
        logging.getLogger("netagent").error("%s", exc)
        return 1

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("netagent").info("received %s", signal.Signals(signum).name)
        daemon.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return daemon.run()


# --------------------------------------------------------------------------- docker-opts


def cmd_docker_opts(args: argparse.Namespace) -> int:
    from netagent.files import (
        DockerOptsError,
        FileError,
        read_env_file,
        render_docker_opts,
        write_docker_opts,
    )

    try:
        env = read_env_file(args.f) if Path(args.f).is_file() else {}
        text = render_docker_opts(
            env, individual=args.i, combined=args.c, combined_key=args.k, omit_ipmasq=args.m,
            existing_combined=os.environ.get(args.k, ""),
        )
    except (DockerOptsError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        write_docker_opts(args.d, text)
    except FileError as exc:
        print(exc, file=sys.stderr)
        return 1
    from netagent.ctl import docker_masq_warning

    warning = docker_masq_warning(env)
    if warning:  # flannel's output is kept (compatibility); the user is told what it means
        print(f"netagent docker-opts: warning: {warning}", file=sys.stderr)
    subnet = env.get("FLANNEL_SUBNET", "")
    if subnet:
        from netagent.iface import routes_via_for

        clash = routes_via_for(subnet)
        if clash:
            print(f"Your routing table already contains the subnet: {clash}", file=sys.stderr)
            return 1
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from netagent import ctl
    from netagent.settings import add_flags

    parser = argparse.ArgumentParser(
        prog="netagent",
        description="flannel-compatible overlay networking agent",
        epilog="example:\n  netagent run --etcd-endpoints http://127.0.0.1:2379\n"
               "  netagent config validate net.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"netagent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent (lease a subnet, program the backend)",
                         **_fmt("run"))  # type: ignore[arg-type]
    add_flags(run)
    run.add_argument("--version", action="version", version=f"netagent {__version__}")
    run.set_defaults(func=cmd_run)

    dopts = sub.add_parser(
        "docker-opts", help="write docker_opts.env from subnet.env (mk-docker-opts.sh)",
        **_fmt("docker-opts"),  # type: ignore[arg-type]
    )
    dopts.add_argument("-f", default="/run/flannel/subnet.env", metavar="FLANNEL-ENV-FILE",
                       help="flannel env file to read (default /run/flannel/subnet.env)")
    dopts.add_argument("-d", default="/run/docker_opts.env", metavar="DOCKER-ENV-FILE",
                       help="docker env file to write (default /run/docker_opts.env)")
    dopts.add_argument("-i", action="store_true", help="write individual DOCKER_OPT_* variables")
    dopts.add_argument("-c", action="store_true", help="write the combined variable")
    dopts.add_argument("-k", default="DOCKER_OPTS", metavar="COMBINED-KEY",
                       help="name of the combined variable (default DOCKER_OPTS)")
    dopts.add_argument("-m", action="store_true", help="omit --ip-masq (old Docker)")
    dopts.set_defaults(func=cmd_docker_opts)

    config = sub.add_parser("config", help="validate, read or write the network config",
                            **_fmt("config"))  # type: ignore[arg-type]
    csub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    validate = csub.add_parser("validate", help="check a network config file (- = stdin)",
                               **_fmt("config validate"))  # type: ignore[arg-type]
    validate.add_argument("file", metavar="FILE|-")
    validate.set_defaults(func=ctl.cmd_config_validate)
    def config_help(_args: argparse.Namespace) -> int:
        config.print_help()
        return 2

    config.set_defaults(func=config_help)
    _add_ops_commands(sub, csub)
    return parser


def _add_ops_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                      csub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Operator commands; their implementations live in netagent/ctl.py."""
    from netagent import ctl
    from netagent.cni.install import add_install_parser

    etcd = ctl.ETCD_FLAGS

    def cmd(parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
            example: str, help_text: str, flags: tuple[str, ...], func: object,
            json_flag: bool = True) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=help_text,
                              **_fmt(example))  # type: ignore[arg-type]
        ctl.add_flags(p, flags)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)
        return p

    cmd(csub, "get", "config get", "print the network config stored in etcd", etcd,
        ctl.cmd_config_get)
    cset = cmd(csub, "set", "config set", "validate a network config and write it to etcd "
               "(nothing is written when it is invalid)", etcd, ctl.cmd_config_set, False)
    cset.add_argument("file", metavar="FILE|-")
    cmd(sub, "status", "status", "this host: lease, expiry, backend, peers and their "
        "reachability, last reconcile, drift repairs", (*etcd, "state-dir"), ctl.cmd_status)
    cmd(sub, "leases", "leases", "all subnet leases in etcd with their TTL (reservations "
        "marked)", etcd, ctl.cmd_leases)
    cmd(sub, "doctor", "doctor", "check this host: ip_forward, kernel modules, MTU, etcd, "
        "conflicting routes, FORWARD policy, iptables backend, Docker masquerade",
        (*etcd, "state-dir", "subnet-file", "iface", "iface-regex", "iface-can-reach",
         "public-ip", "public-ipv6", "ip-masq", "iptables-forward-rules"),
        ctl.cmd_doctor)
    mig = cmd(sub, "migrate-v2", "migrate-v2", "copy the network config from the etcd v2 store "
              "into v3", etcd, ctl.cmd_migrate_v2, False)
    mig.add_argument("--force", action="store_true",
                     help="overwrite a different config already in the v3 store")
    clean = cmd(sub, "cleanup", "cleanup", "remove what netagent made on this host (its "
                "devices, proto 111/112 routes, iptables chains, the CNI bridge when no pod "
                "uses it, the wireguard-go/BIRD it started); refuses while an agent runs",
                (*etcd, "state-dir", "subnet-file", "iface", "iface-regex", "iface-can-reach",
                 "public-ip", "public-ipv6"), ctl.cmd_cleanup, False)
    clean.add_argument("--dry-run", action="store_true", help="print what would be removed")
    clean.add_argument("--release-lease", action="store_true",
                       help="also delete this host's lease in etcd and revoke its etcd lease")
    clean.add_argument("--cni-bridge", default="cni0",
                       help="the CNI plugin's bridge (removed only with no pod attached)")
    inst = add_install_parser(sub)
    inst.epilog = EXAMPLES["install-cni"]
    inst.formatter_class = argparse.RawDescriptionHelpFormatter


def main(argv: Sequence[str] | None = None) -> int:
    from netagent.settings import SettingsError, long_dash

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        argv = ["run", *long_dash(argv[1:])]
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except SettingsError as exc:  # a bad --config file, flag or environment value: no traceback
        print(f"netagent {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
