"""The two device clients against one real wireguard-go: ``UapiClient`` (the wireguard-go path)
and ``WgToolClient`` (``wg show dump`` / ``wg set``, the kernel-module path; ``wg`` speaks UAPI
to wireguard-go, which is how that path is exercised on a machine without the module).

Each writes, the other reads back, and the diff of what was read against what was wanted is
empty: both text forms (UAPI, wg dump/argv) describe the same device. The script runs inside
the namespace and a private mount namespace, so its /run/wireguard is its own.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.harness import REPO, RUN_ID, need, netns

pytestmark = pytest.mark.privileged

SCRIPT = r'''
import base64, sys
from ipaddress import ip_network
from pathlib import Path
from netagent.backends.wireguard.client import UapiClient, WgToolClient
from netagent.backends.wireguard.model import WgPeer, diff_device, generate_private_key, public_key
from netagent.backends.wireguard.wggo import WireguardGo, socket_path

state = Path(sys.argv[1])
name = "natwg0"
psk = base64.b64encode(b"s" * 32).decode()
priv = generate_private_key()
keyfile = state / "wgkey"
keyfile.write_text(priv + "\n")
keyfile.chmod(0o400)
proc = WireguardGo(name, state)
proc.start()
try:
    uapi = UapiClient(socket_path(name))
    tool = WgToolClient(name, keyfile, psk, state / "psk")
    k1, k2, k3 = (public_key(generate_private_key()) for _ in range(3))
    want = {
        k1: WgPeer(k1, "192.0.2.1:51820", frozenset({ip_network("10.5.1.0/24")}), psk, 25),
        k2: WgPeer(k2, "[2001:db8::2]:51821", frozenset({ip_network("fd00:5:2::/64")})),
    }
    # the kernel path writes, both read
    tool.set(diff_device(tool.get(), priv, 51820, want))
    for c in (tool, uapi):
        got = c.get()
        assert diff_device(got, priv, 51820, want).empty, (type(c).__name__, got)
    # the UAPI path changes one field, removes one peer, adds one; both read
    want2 = {
        k1: WgPeer(k1, "192.0.2.9:51820", frozenset({ip_network("10.5.1.0/24")}), psk, 25),
        k3: WgPeer(k3, "192.0.2.3:4000", frozenset({ip_network("10.5.3.0/24"),
                                                     ip_network("10.5.4.0/24")})),
    }
    change = diff_device(uapi.get(), priv, 51820, want2)
    assert change.remove == (k2,) and [p.public_key for p in change.add] == [k3]
    assert [f for _, f in change.update] == [frozenset({"endpoint"})], change.update
    uapi.set(change)
    for c in (tool, uapi):
        assert diff_device(c.get(), priv, 51820, want2).empty, type(c).__name__
    # and a PSK taken away through the kernel path
    want3 = {k1: WgPeer(k1, "192.0.2.9:51820", frozenset({ip_network("10.5.1.0/24")}), "", 25),
             k3: want2[k3]}
    tool.set(diff_device(tool.get(), priv, 51820, want3))
    assert diff_device(uapi.get(), priv, 51820, want3).empty
    print("sets", uapi.sets, tool.sets)
finally:
    proc.stop()
print("OK")
'''


def test_uapi_and_wg_tool_clients_agree_on_one_device(tmp_path: Path) -> None:
    need(shutil.which("wireguard-go") is not None and shutil.which("wg") is not None,
         "wireguard-go and wg (wireguard-tools) are needed")
    run_dir = tmp_path / "run"
    state = tmp_path / "state"
    run_dir.mkdir()
    state.mkdir()
    Path("/run/wireguard").mkdir(mode=0o755, exist_ok=True)  # the mount point
    with netns(f"na{RUN_ID}-wgc") as ns:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, "unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount --bind "$0" /run/wireguard && exec "$@"', str(run_dir),
             sys.executable, "-c", SCRIPT, str(state)],
            capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(REPO),
                                                             "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
    assert "sets 1 2" in proc.stdout
    assert not list(state.glob("*.pid"))  # stopped by its PID, the record removed
