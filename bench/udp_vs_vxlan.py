#!/usr/bin/env python3
"""Pod-to-pod iperf3 throughput over the udp backend against vxlan, between the same hosts.

One lab (underlay bridge, etcd, two namespace hosts, one pod per host) per backend, the real
agent on each host, then iperf3 TCP pod → pod, ``--repeat`` runs of ``--seconds`` each,
interleaved between the two labs so machine load drifts hit both alike. Reported per backend:
median throughput, packets/s (TCP data segments the sending pod's kernel sent; the
packet rate through the overlay device, ``flannel0`` or ``flannel.1``, is shown beside it and is
lower wherever GRO/GSO carries several segments per skb), retransmits, kernel drops, and the
CPU time of both agents per second of test (100 % = one core). The result line is the
udp/vxlan ratio (goal ≥ 0.30).

``--udp-path python`` runs the udp agents with ``NETAGENT_UDP_FASTPATH=python`` (the Python
packet loop) instead of their default, the compiled loop (``backends/udpfast.c``); the agents'
CPU includes that child process. ``--udp-offload`` passes ``NETAGENT_UDP_OFFLOAD`` to the udp
agents to measure one step (see ``UdpBackend._new_forwarder``: a subset of
``gro,gso,udpgro,tso``, ``tsopy``, ``threads2``, or ``none``; the compiled loop reads
``gro,gso,udpgro,tso``); without it the agents run their defaults. The path each agent chose (offloads the
kernel has, numpy or not) is printed from its log. Needs root, etcd and iperf3; everything
lives in run-unique namespaces and is removed at the end.

    sudo python3 bench/udp_vs_vxlan.py                      # 3 × 5 s per backend
    sudo python3 bench/udp_vs_vxlan.py --seconds 10 --repeat 5 --json out.json
    sudo python3 bench/udp_vs_vxlan.py --backend udp --udp-offload none   # one step back
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from support.harness import RUN_ID, Host, Lab, PingRun, Pod, sh, wait_for  # noqa: E402

GOAL = 0.30
NETWORK = "10.43.0.0/16"
DEVICES = {"udp": "flannel0", "vxlan": "flannel.1"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """`pid` and the processes below it (the udp agent's compiled packet loop is a child)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in task.read_text().split())
            except OSError:
                pass
    return out


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one agent (`ip netns exec` execs it in place) and its live
    children (the compiled udp loop runs as one)."""
    user = system = 0.0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / CLK_TCK
        system += int(fields[12]) / CLK_TCK
    return user, system


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def dev_packets(host: Host, dev: str) -> int:
    out = host.run("cat", f"/sys/class/net/{dev}/statistics/rx_packets",
                   f"/sys/class/net/{dev}/statistics/tx_packets").stdout.split()
    return sum(int(x) for x in out)


def tcp_out_segs(pod: Pod) -> int:
    """TCP segments the pod sent (counted by wire segment, whatever GSO/TSO did with them; the
    receiver's TcpInSegs would count a user-space GRO packet as one)."""
    out = sh("nstat", "-az", "TcpOutSegs", ns=pod.name).stdout.splitlines()
    return sum(int(line.split()[1]) for line in out if line.startswith("Tcp"))


def tun_drops(host: Host, dev: str) -> int:
    """Packets the overlay device dropped on transmit (its queue full: the agent fell behind)."""
    return int(host.run("cat", f"/sys/class/net/{dev}/statistics/tx_dropped").stdout)


def udp_errors(host: Host) -> int:
    """Datagrams the kernel dropped before the agent read them (socket buffer full etc.)."""
    out = host.run("nstat", "-az", "UdpRcvbufErrors", "UdpInErrors").stdout.splitlines()
    return sum(int(line.split()[1]) for line in out if line.startswith("Udp"))


def iperf(client: Pod, server: Pod, seconds: float, streams: int) -> tuple[float, int]:
    """One iperf3 TCP run pod → pod; (received bits per second, retransmitted segments)."""
    port = str(random.randrange(20000, 30000))
    proc = subprocess.Popen(["ip", "netns", "exec", server.name, "iperf3", "-s", "-1", "-p", port],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def connect() -> dict[str, Any] | None:
            run = sh("iperf3", "-c", server.ip, "-p", port, "-t", str(seconds), "-P",
                     str(streams), "-J", ns=client.name, check=False, timeout=seconds + 30)
            try:
                doc = json.loads(run.stdout)
            except ValueError:
                return None
            if run.returncode != 0 or "sum_received" not in doc.get("end", {}):
                return None  # server not listening yet
            return doc  # type: ignore[no-any-return]

        doc = wait_for(connect, timeout=seconds + 40, interval=0.1, what="iperf3 run")
        return (float(doc["end"]["sum_received"]["bits_per_second"]),
                int(doc["end"].get("sum_sent", {}).get("retransmits", 0)))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


class BackendLab:
    """Two hosts running the agent with one backend, one pod each."""

    def __init__(self, backend: str, tmp: Path, env: dict[str, str]) -> None:
        self.backend = backend
        self.lab = Lab(tmp / backend, tag="u" if backend == "udp" else "x")
        try:
            etcd = self.lab.start_etcd()
            etcd.put("/coreos.com/network/config",
                     json.dumps({"Network": NETWORK, "Backend": {"Type": backend}}))
            self.hosts = [self.lab.add_host(), self.lab.add_host()]
            for h in self.hosts:
                self.lab.start_agent(h, env=env)
            for h in self.hosts:
                wait_for(lambda h=h: h.subnet_file.exists(), timeout=60, what=f"{h.name} lease")
            self.pods = [self.lab.add_pod(h, bridge=f"nb{RUN_ID}") for h in self.hosts]
            wait_for(lambda: self.pods[0].ping(self.pods[1].ip), timeout=30, interval=0.2,
                     what=f"pod-to-pod connectivity over {backend}")
        except BaseException:
            self.lab.close()
            raise
        self.runs: list[dict[str, float]] = []

    def run_once(self, seconds: float, streams: int) -> dict[str, float]:
        pids = [h.agent.pid for h in self.hosts if h.agent is not None]
        dev = DEVICES[self.backend]
        cpu0 = [cpu_seconds(p) for p in pids]
        user0 = cpu_split(pids[1])[0]
        pk0 = dev_packets(self.hosts[1], dev)
        seg0 = tcp_out_segs(self.pods[0])
        err0 = sum(udp_errors(h) for h in self.hosts)
        drop0 = sum(tun_drops(h, dev) for h in self.hosts)
        t0 = time.monotonic()
        bps, retrans = iperf(self.pods[0], self.pods[1], seconds, streams)
        wall = time.monotonic() - t0
        run = {"bps": bps, "pps": (tcp_out_segs(self.pods[0]) - seg0) / wall,
               "dev_pps": (dev_packets(self.hosts[1], dev) - pk0) / wall,
               "retransmits": retrans,
               "udp_rcv_errors": sum(udp_errors(h) for h in self.hosts) - err0,
               "dev_tx_dropped": sum(tun_drops(h, dev) for h in self.hosts) - drop0,
               "agent_cpu": (sum(cpu_seconds(p) for p in pids) - sum(cpu0)) / wall,
               "sender_cpu": (cpu_seconds(pids[0]) - cpu0[0]) / wall,
               "receiver_cpu": (cpu_seconds(pids[1]) - cpu0[1]) / wall,
               "receiver_user": (cpu_split(pids[1])[0] - user0) / wall}
        self.runs.append(run)
        return run

    def restart_gap(self, rounds: int, env: dict[str, str]) -> tuple[int, int]:
        """Pings pod 0 → pod 1 every 10 ms while the receiving host's agent is restarted
        `rounds` times (SIGTERM, start, wait until ready, 1 s of traffic); (sent, lost)."""
        host = self.hosts[1]
        ping = PingRun(self.pods[0], self.pods[1].ip, rounds * 6 + 2, interval=0.01)
        time.sleep(1)
        for _ in range(rounds):
            self.lab.stop_agent(host)
            (host.state_dir / "status.json").unlink(missing_ok=True)
            self.lab.start_agent(host, env=env)
            wait_for(lambda: host.status().get("ready"), timeout=30, what="agent ready again")
            time.sleep(1)
        sent, got = ping.result()
        return sent, sent - got

    def summary(self) -> dict[str, Any]:
        med = {k: statistics.median(r[k] for r in self.runs)
               for k in ("bps", "pps", "dev_pps", "agent_cpu", "sender_cpu", "receiver_cpu")}
        return {"backend": self.backend, **med, "runs": self.runs}

    def close(self) -> None:
        self.lab.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of one iperf3 run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per backend (median reported)")
    ap.add_argument("--streams", type=int, default=1, help="parallel TCP streams (-P)")
    ap.add_argument("--backend", choices=("udp", "vxlan"), action="append",
                    help="measure only this backend (default: both, and the ratio)")
    ap.add_argument("--udp-offload", default=None,
                    help="NETAGENT_UDP_OFFLOAD for the udp agents (default: theirs): a subset "
                         "of gro,gso,udpgro,tso, tsopy, threads2, or none")
    ap.add_argument("--udp-path", choices=("auto", "c", "python"), default=None,
                    help="NETAGENT_UDP_FASTPATH for the udp agents (default: theirs, auto: the "
                         "compiled loop when it builds)")
    ap.add_argument("--restarts", type=int, default=0, metavar="N",
                    help="after the runs, restart the receiving udp agent N times under a 10 ms "
                         "ping and report the pings lost")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    for tool in ("iperf3", "etcd", "etcdctl", "ip"):
        if shutil.which(tool) is None:
            print(f"udp_vs_vxlan: {tool} not found", file=sys.stderr)
            return 2
    backends = args.backend or ["udp", "vxlan"]
    results: dict[str, dict[str, Any]] = {}
    udp_env: dict[str, str] = {}
    if args.udp_offload is not None:
        udp_env["NETAGENT_UDP_OFFLOAD"] = args.udp_offload
    if args.udp_path is not None:
        udp_env["NETAGENT_UDP_FASTPATH"] = args.udp_path
    with tempfile.TemporaryDirectory(prefix=f"na-bench-udp-{RUN_ID}-") as tmp:
        labs: list[BackendLab] = []
        try:
            for b in backends:
                env = udp_env if b == "udp" else {}
                labs.append(BackendLab(b, Path(tmp), env))
                if b == "udp":
                    for line in labs[-1].lab.log(labs[-1].hosts[0]).splitlines():
                        if "udp: flannel0" in line:
                            print("udp agent:", line.split("udp: ", 1)[1], flush=True)
            for i in range(args.repeat):
                for bl in labs:
                    r = bl.run_once(args.seconds, args.streams)
                    dev = DEVICES[bl.backend]
                    print(f"run {i + 1} {bl.backend:5}: {r['bps'] / 1e9:6.3f} Gbit/s "
                          f"{r['pps'] / 1e3:7.1f} kpps ({r['dev_pps'] / 1e3:.1f} k on {dev}) "
                          f"agents {100 * r['agent_cpu']:5.1f} % CPU "
                          f"(sender {100 * r['sender_cpu']:.0f} %, receiver "
                          f"{100 * r['receiver_cpu']:.0f} %, of it user "
                          f"{100 * r['receiver_user']:.0f} %), {r['retransmits']} retransmits, "
                          f"{r['udp_rcv_errors']} UDP receive errors, {r['dev_tx_dropped']} "
                          "device tx drops",
                          flush=True)
            for bl in labs:
                results[bl.backend] = bl.summary()
            for bl in labs:
                if bl.backend == "udp" and args.restarts:
                    sent, lost = bl.restart_gap(args.restarts, udp_env)
                    results["udp"]["restart_pings"] = {"sent": sent, "lost": lost,
                                                       "restarts": args.restarts}
                    print(f"udp agent restarts: {lost} of {sent} pings (10 ms apart) lost over "
                          f"{args.restarts} restarts, ≈ {10 * lost / args.restarts:.0f} ms "
                          "each", flush=True)
        finally:
            for bl in labs:
                bl.close()
    print(f"\n{'backend':8} {'Gbit/s':>8} {'kpps':>8} {'agent CPU':>10} {'Gbit/s per core':>16}")
    for b, r in results.items():
        per_core = r["bps"] / 1e9 / r["agent_cpu"] if r["agent_cpu"] > 0.01 else float("inf")
        r["gbps_per_agent_core"] = per_core
        print(f"{b:8} {r['bps'] / 1e9:>8.3f} {r['pps'] / 1e3:>8.1f} {100 * r['agent_cpu']:>9.1f}%"
              f" {per_core:>16.2f}")
    ok = True
    if "udp" in results and "vxlan" in results:
        ratio = results["udp"]["bps"] / results["vxlan"]["bps"]
        ok = ratio >= GOAL
        print(f"\nudp / vxlan = {ratio:.3f} (goal ≥ {GOAL:.2f}){'' if ok else '  (below goal)'}")
        results["ratio"] = {"udp_over_vxlan": ratio, "goal": GOAL}
    print(f"udp offloads: {args.udp_offload or 'the agent defaults'}; udp path: "
          f"{args.udp_path or 'the agent default'}; {args.repeat} × "
          f"{args.seconds:g} s, {args.streams} stream(s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
