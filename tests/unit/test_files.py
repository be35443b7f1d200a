"""subnet.env and docker_opts.env: flannel's exact formats, atomic writes."""

from __future__ import annotations

import os
import subprocess
import sys
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from netagent.files import (
    DockerOptsError,
    FileError,
    SubnetEnv,
    parse_env_text,
    previous_subnets,
    render_docker_opts,
    render_subnet_env,
    write_atomic,
    write_subnet_env,
)

REPO = Path(__file__).resolve().parents[2]


def test_subnet_env_matches_flannel_literally() -> None:
    env = SubnetEnv(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"), 1450, False)
    assert render_subnet_env(env) == (
        "FLANNEL_NETWORK=10.5.0.0/16\n"
        "FLANNEL_SUBNET=10.5.72.1/24\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=false\n"
    )


def test_dual_stack_subnet_env_has_six_lines_in_order() -> None:
    env = SubnetEnv(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"), 1450, True,
                    IPv6Network("2001:cafe:42::/56"), IPv6Network("2001:cafe:42::/64"))
    assert render_subnet_env(env) == (
        "FLANNEL_NETWORK=10.5.0.0/16\n"
        "FLANNEL_SUBNET=10.5.72.1/24\n"
        "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\n"
        "FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=true\n"
    )


def test_previous_subnet_read_back(tmp_path: Path) -> None:
    p = tmp_path / "subnet.env"
    write_subnet_env(p, SubnetEnv(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.9.0/24"), 1500,
                                  False))
    assert previous_subnets(p) == (IPv4Network("10.5.9.0/24"), None)
    assert oct(p.stat().st_mode & 0o777) == "0o644"
    p.write_text("FLANNEL_SUBNET=10.5.9.1/24,10.5.10.1/24\n")
    assert previous_subnets(p) == (None, None)
    assert previous_subnets(tmp_path / "missing") == (None, None)


def test_failed_write_keeps_previous_file(tmp_path: Path) -> None:
    p = tmp_path / "d" / "subnet.env"
    write_atomic(p, "OLD=1\n")
    os.chmod(p.parent, 0o555)
    try:
        if os.geteuid() == 0:
            # root ignores mode bits: make the rename fail by replacing a directory instead
            os.chmod(p.parent, 0o755)
            target = tmp_path / "d2"
            (target / "subnet.env").mkdir(parents=True)
            (target / "subnet.env" / "x").write_text("keep")
            with pytest.raises(FileError, match="cannot write"):
                write_atomic(target / "subnet.env", "NEW=1\n")
            assert (target / "subnet.env" / "x").read_text() == "keep"
            assert [f.name for f in target.iterdir()] == ["subnet.env"]  # no temp file left
        else:
            with pytest.raises(FileError, match="cannot write"):
                write_atomic(p, "NEW=1\n")
    finally:
        os.chmod(p.parent, 0o755)
    assert p.read_text() == "OLD=1\n"


ENV = {"FLANNEL_NETWORK": "10.1.0.0/16", "FLANNEL_SUBNET": "10.1.74.1/24", "FLANNEL_MTU": "1472",
       "FLANNEL_IPMASQ": "false"}


def test_docker_opts_default_matches_mk_docker_opts() -> None:
    assert render_docker_opts(ENV) == (
        'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        'DOCKER_OPT_MTU="--mtu=1472"\n'
        'DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'
    )


def test_docker_opts_each_flag() -> None:
    assert render_docker_opts(ENV, individual=True) == (
        'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        'DOCKER_OPT_MTU="--mtu=1472"\n'
    )
    assert render_docker_opts(ENV, combined=True) == \
        'DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'
    assert render_docker_opts(ENV, combined=True, combined_key="DOCKER_NETWORK_OPTIONS") == \
        'DOCKER_NETWORK_OPTIONS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'
    assert render_docker_opts(ENV, omit_ipmasq=True) == (
        'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\n'
        'DOCKER_OPT_MTU="--mtu=1472"\n'
        'DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"\n'
    )
    masq = dict(ENV, FLANNEL_IPMASQ="true")
    assert 'DOCKER_OPT_IPMASQ="--ip-masq=false"' in render_docker_opts(masq)
    # an existing value of the combined key comes first, followed by a space
    assert render_docker_opts(ENV, combined=True, existing_combined="--debug") == \
        'DOCKER_OPTS="--debug  --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'
    # no FLANNEL_IPMASQ: no ip-masq option; a bad one: an error
    no_masq = {k: v for k, v in ENV.items() if k != "FLANNEL_IPMASQ"}
    assert "ip-masq" not in render_docker_opts(no_masq)
    with pytest.raises(DockerOptsError, match="Invalid value of FLANNEL_IPMASQ: maybe"):
        render_docker_opts(dict(ENV, FLANNEL_IPMASQ="maybe"))


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netagent", *args], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ, **(env or {})), timeout=60)


def test_docker_opts_command_writes_file(tmp_path: Path) -> None:
    src = tmp_path / "subnet.env"
    src.write_text("".join(f"{k}={v}\n" for k, v in ENV.items()))
    out = tmp_path / "docker_opts.env"
    proc = _cli("docker-opts", "-f", str(src), "-d", str(out), "-c", "-k", "DOCKER_NET")
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == 'DOCKER_NET=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'
    proc = _cli("docker-opts", "-f", str(src), "-d", str(out), "-i", "-m")
    assert out.read_text() == 'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\nDOCKER_OPT_MTU="--mtu=1472"\n'
    src.write_text("FLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_IPMASQ=perhaps\n")
    before = out.read_text()
    proc = _cli("docker-opts", "-f", str(src), "-d", str(out))
    assert proc.returncode == 1 and "Invalid value of FLANNEL_IPMASQ" in proc.stderr
    assert out.read_text() == before


def test_env_parser_accepts_quotes_and_comments() -> None:
    assert parse_env_text('# c\nA=1\nB="x y"\n\nC=\'z\'\n') == {"A": "1", "B": "x y", "C": "z"}
