"""The udp backend's compiled packet loop (backends/udpfast.c) in the real agent.

Two namespace hosts, one on the compiled loop and one forced onto the Python loop
(``NETAGENT_UDP_FASTPATH=python``): the two loops interoperate on the wire (a TCP transfer both
ways arrives intact), status.json says which loop each host runs, the compiled loop's counters
reach /metrics, a killed child is noticed and replaced with traffic flowing again, and repeated
crashes hand forwarding over to the Python loop (said in status.json) instead of a black hole.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from support.harness import RUN_ID, Host, Lab, wait_for
from test_udp_hosts import TRANSFER_BYTES, start_udp_hosts, tcp_transfer

pytestmark = [pytest.mark.privileged, pytest.mark.slow]


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except OSError:
            pass
    return out


def fast_child(host: Host) -> int | None:
    """The pid of the agent's compiled loop (a child running udpfast-*), or None."""
    assert host.agent is not None
    for c in children(host.agent.pid):
        try:
            exe = os.readlink(f"/proc/{c}/exe")
        except OSError:
            continue
        if Path(exe).name.startswith("udpfast-"):
            return c
    return None


def udp_packets(host: Host, direction: str) -> float:
    code = ("import urllib.request\n"
            "print(urllib.request.urlopen('http://127.0.0.1:9108/metrics', timeout=5)"
            ".read().decode())")
    for line in host.run(sys.executable, "-c", code).stdout.splitlines():
        if line.startswith(f'netagent_udp_packets_total{{direction="{direction}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def data_path(host: Host) -> str:
    return str(host.status().get("backend_health", {}).get("data_path", ""))


def test_compiled_and_python_loops_interoperate_and_a_dead_child_is_replaced(lab: Lab) -> None:
    hosts = start_udp_hosts(lab, 2, "--metrics-port", "9108", "--healthz-ip", "127.0.0.1",
                            env=[{}, {"NETAGENT_UDP_FASTPATH": "python"}])
    fast, slow = hosts
    wait_for(lambda: data_path(fast) == "c", timeout=20, what="status: compiled loop")
    wait_for(lambda: data_path(slow).startswith("python (NETAGENT_UDP_FASTPATH=python"),
             timeout=20, what="status: Python loop, and why")
    assert fast_child(fast) is not None and fast_child(slow) is None
    assert "compiled loop, pid" in lab.log(fast) and "Python loop" in lab.log(slow)

    pods = [lab.add_pod(h, bridge=f"nb{RUN_ID}") for h in hosts]
    wait_for(lambda: pods[0].ping(pods[1].ip), timeout=20, interval=0.2, what="pod ping")
    for a, b, seed in ((0, 1, 11), (1, 0, 12)):
        sent, got = tcp_transfer(pods[a], pods[b], TRANSFER_BYTES // 2, seed=seed)
        assert got == sent
    # the child's counters reach the agent's metrics (as the Python loop's did)
    wait_for(lambda: udp_packets(fast, "rx") > 10000 and udp_packets(fast, "tx") > 10000,
             timeout=5, what="the compiled loop's counters in /metrics")

    # kill the child: the agent starts a new one and traffic flows again
    first = fast_child(fast)
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: fast_child(fast) not in (None, first), timeout=10,
             what="a new compiled loop after the kill")
    wait_for(lambda: pods[0].ping(pods[1].ip), timeout=10, interval=0.2,
             what="traffic after the child was replaced")
    assert "udp fast path process exited" in lab.log(fast)
    assert data_path(fast) == "c"

    # crashes in a row: the Python loop takes over, and status.json says so
    for _ in range(2):
        pid = fast_child(fast)
        if pid is None:
            wait_for(lambda: fast_child(fast) is not None, timeout=10, what="child back")
            pid = fast_child(fast)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda pid=pid: fast_child(fast) != pid, timeout=10, what="child gone")
    wait_for(lambda: data_path(fast).startswith("python (the compiled loop exited 3 times"),
             timeout=20, what="status: fell back to the Python loop")
    assert fast_child(fast) is None
    assert "forwarding with the Python packet loop from now on" in lab.log(fast)
    wait_for(lambda: pods[0].ping(pods[1].ip) and pods[1].ping(pods[0].ip), timeout=10,
             interval=0.2, what="traffic on the Python loop after the fallback")
    sent, got = tcp_transfer(pods[0], pods[1], TRANSFER_BYTES // 5, seed=13)
    assert got == sent

    # a clean stop on SIGTERM: the agent and its child are gone, nothing left behind
    assert lab.stop_agent(slow) == 0
    assert fast.agent is not None
    child = fast_child(fast)
    assert lab.stop_agent(fast) == 0
    if child is not None:
        assert not Path(f"/proc/{child}").exists()
