"""Docker without root: the masquerade warning of `docker-opts` and `doctor`, and the systemd
drop-in that must start whichever dockerd the host has (issue 14). The real daemon runs in
tests/e2e/test_docker.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from support.harness import REPO, need

from netagent.ctl import check_docker_masq, docker_masq_warning

# TEST-NET-2: no route on any test machine clashes with it (docker-opts checks the routing table)
ENV = {"FLANNEL_NETWORK": "198.51.0.0/16", "FLANNEL_SUBNET": "198.51.100.1/24",
       "FLANNEL_MTU": "1450", "FLANNEL_IPMASQ": "false"}
DROPIN = REPO / "contrib" / "systemd" / "docker.service.d" / "10-netagent.conf"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netagent", *args], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          timeout=60)


def _write_env(path: Path, env: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return path


def test_warning_only_when_docker_will_masquerade_overlay_traffic() -> None:
    warning = docker_masq_warning(ENV)
    assert warning is not None
    assert "--ip-masq=true" in warning and "Fix: run the agent with --ip-masq" in warning
    # no FLANNEL_IPMASQ at all: docker_opts has no --ip-masq, Docker's default is true
    assert docker_masq_warning({k: v for k, v in ENV.items() if k != "FLANNEL_IPMASQ"})
    assert docker_masq_warning(dict(ENV, FLANNEL_IPMASQ="true")) is None
    assert docker_masq_warning({}) is None  # nothing leased yet: nothing to say


def test_doctor_check_warns_without_failing() -> None:
    check = check_docker_masq(ENV, agent_ip_masq=False, dockerd="/usr/sbin/dockerd")
    assert check.warn and check.ok is None  # a WARN is not a failure: exit code unchanged
    assert "--ip-masq" in check.fix
    assert check_docker_masq(ENV, agent_ip_masq=True, dockerd="/usr/sbin/dockerd").ok is True
    ok = check_docker_masq(dict(ENV, FLANNEL_IPMASQ="true"), False, "/usr/bin/dockerd")
    assert ok.ok is True and not ok.warn
    assert check_docker_masq(ENV, False, None).ok is None  # no Docker on the host
    assert not check_docker_masq(ENV, False, None).warn


def test_docker_opts_keeps_flannels_output_and_warns_on_stderr(tmp_path: Path) -> None:
    src = _write_env(tmp_path / "subnet.env", ENV)
    out = tmp_path / "docker_opts.env"
    proc = _cli("docker-opts", "-f", str(src), "-d", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().splitlines()[-1] == \
        'DOCKER_OPTS=" --bip=198.51.100.1/24 --ip-masq=true --mtu=1450"'
    assert proc.stdout == ""
    assert proc.stderr.startswith("netagent docker-opts: warning: the agent runs without --ip-masq")
    assert "Fix: run the agent with --ip-masq" in proc.stderr

    _write_env(src, dict(ENV, FLANNEL_IPMASQ="true"))
    proc = _cli("docker-opts", "-f", str(src), "-d", str(out))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "--ip-masq=false" in out.read_text()


def test_doctor_reports_the_docker_check(tmp_path: Path) -> None:
    """The whole command: other checks fail here (no etcd), the Docker one is a warning with
    the fix, in the table and in --json."""
    src = _write_env(tmp_path / "subnet.env", ENV)
    args = ["doctor", "--etcd-endpoints", "http://127.0.0.1:1", "--subnet-file", str(src),
            "--state-dir", str(tmp_path / "state")]
    doc = json.loads(_cli(*args, "--json").stdout)
    check = next(c for c in doc["checks"] if c["name"] == "docker masquerade")
    if shutil.which("dockerd") or any(os.access(p, os.X_OK)
                                      for p in ("/usr/sbin/dockerd", "/usr/bin/dockerd")):
        assert check["warn"] is True and check["ok"] is None
        human = _cli(*args).stdout
        assert "docker masquerade   WARN" in human
        assert "docker masquerade: run the agent with --ip-masq" in human
    else:
        assert check["ok"] is None and check["detail"] == "Docker is not installed"


def test_dropin_starts_any_dockerd_with_the_agents_options(tmp_path: Path) -> None:
    """No hard-coded path (Debian: /usr/sbin/dockerd, docker-ce: /usr/bin/dockerd): systemd
    looks a bare name up itself; `systemd-analyze verify` proves it resolves here, and that a
    name which resolves nowhere is refused (so the check is real)."""
    text = DROPIN.read_text()
    exec_lines = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
    assert exec_lines[0] == "ExecStart="  # clears the vendor unit's command
    command = exec_lines[1].removeprefix("ExecStart=").split()
    assert command[0] == "dockerd" and "$DOCKER_OPTS" in command
    assert "EnvironmentFile=/run/docker_opts.env" in text
    assert "Requires=netagent.service" in text and "After=netagent.service" in text

    need(shutil.which("systemd-analyze") is not None, "needs systemd-analyze (apt: systemd)")
    need(any(os.access(p, os.X_OK) for p in ("/usr/sbin/dockerd", "/usr/bin/dockerd")),
         "needs Docker (apt-get install docker.io)")

    unit = (REPO / "contrib" / "systemd" / "netagent.service").read_text()
    (tmp_path / "netagent.service").write_text(
        unit.replace("/usr/local/bin/netagent", f"{sys.executable} -m netagent"))

    def verify(dropin: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / "docker.service").write_text(
            "[Unit]\nDescription=stand-in for the vendor's unit\n[Service]\nExecStart=/bin/false\n")
        (tmp_path / "docker.service.d").mkdir(exist_ok=True)
        (tmp_path / "docker.service.d" / "10-netagent.conf").write_text(dropin)
        return subprocess.run(["systemd-analyze", "verify", "--man=no",
                               str(tmp_path / "netagent.service"), str(tmp_path / "docker.service")],
                              capture_output=True, text=True, timeout=60)

    proc = verify(text)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    bogus = verify(text.replace("ExecStart=dockerd ", "ExecStart=no-such-dockerd-here "))
    assert bogus.returncode != 0 and "no-such-dockerd-here" in bogus.stderr
