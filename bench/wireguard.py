#!/usr/bin/env python3
"""Pod-to-pod iperf3 TCP over the wireguard backend against vxlan, between the same kind of hosts.

One lab per backend (underlay bridge, etcd, two namespace hosts, one pod per host, the real
agent on each host; the wireguard hosts each with a private /run/wireguard, see
tests/support/wireguard.py), then iperf3 TCP pod → pod, ``--repeat`` runs of ``--seconds``
each, interleaved between the two labs so machine load drifts hit both alike.

Reported per backend: median throughput; the CPU of the WireGuard implementation's processes
(wireguard-go, both hosts; 0 for vxlan and for the kernel module, whose work is kernel time no
process owns); the machine-wide busy CPU during the run (from /proc/stat, all cores, so it
includes iperf3, the kernel's network stack and — on a shared machine — everyone else's work);
and the CPU cost per Gbit/s from each (cores per Gbit/s). The implementation the wireguard
agents chose (kernel or wireguard-go) is printed from their status.

    sudo python3 bench/wireguard.py                          # 3 × 5 s per backend
    sudo python3 bench/wireguard.py --seconds 10 --repeat 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.harness import RUN_ID, Lab, wait_for  # noqa: E402
from support.wireguard import WgLab  # noqa: E402
from udp_vs_vxlan import cpu_seconds, iperf  # noqa: E402

NETWORK = "10.44.0.0/16"


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot (busy = all but idle and iowait)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


def machine_cores() -> int:
    return sum(1 for ln in Path("/proc/stat").read_text().splitlines()
               if ln.startswith("cpu") and ln[3:4].isdigit())


class BackendLab:
    """Two hosts running the agent with one backend, one pod each."""

    def __init__(self, backend: str, tmp: Path) -> None:
        self.backend = backend
        cls = WgLab if backend == "wireguard" else Lab
        self.lab = cls(tmp / backend, tag="w" if backend == "wireguard" else "x")
        try:
            etcd = self.lab.start_etcd()
            etcd.put("/coreos.com/network/config",
                     json.dumps({"Network": NETWORK, "Backend": {"Type": backend}}))
            self.hosts = [self.lab.add_host(), self.lab.add_host()]
            for h in self.hosts:
                self.lab.start_agent(h)
            for h in self.hosts:
                wait_for(lambda h=h: h.subnet_file.exists(), timeout=60, what=f"{h.name} lease")
            self.pods = [self.lab.add_pod(h, bridge=f"nb{RUN_ID}") for h in self.hosts]
            wait_for(lambda: self.pods[0].ping(self.pods[1].ip), timeout=30, interval=0.2,
                     what=f"pod-to-pod connectivity over {backend}")
        except BaseException:
            self.lab.close()
            raise
        self.runs: list[dict[str, float]] = []

    @property
    def implementation(self) -> str:
        if self.backend != "wireguard":
            return "kernel vxlan"
        health = self.hosts[0].status().get("backend_health", {})
        return str(health.get("implementation", "?"))

    def wg_pids(self) -> list[int]:
        return self.lab.wg_pids() if isinstance(self.lab, WgLab) else []

    def run_once(self, seconds: float, streams: int) -> dict[str, float]:
        pids = self.wg_pids()
        cpu0 = sum(cpu_seconds(p) for p in pids)
        busy0, total0 = machine_busy()
        t0 = time.monotonic()
        bps, retrans = iperf(self.pods[0], self.pods[1], seconds, streams)
        wall = time.monotonic() - t0
        busy1, total1 = machine_busy()
        cores = machine_cores()
        run = {"bps": bps, "retransmits": retrans,
               "impl_cpu": (sum(cpu_seconds(p) for p in pids) - cpu0) / wall,
               "machine_busy_cores": cores * (busy1 - busy0) / max(1, total1 - total0)}
        self.runs.append(run)
        return run

    def summary(self) -> dict[str, Any]:
        med = {k: statistics.median(r[k] for r in self.runs)
               for k in ("bps", "impl_cpu", "machine_busy_cores")}
        gbps = med["bps"] / 1e9
        return {"backend": self.backend, "implementation": self.implementation, **med,
                "impl_cores_per_gbps": med["impl_cpu"] / gbps if gbps else float("inf"),
                "machine_cores_per_gbps": med["machine_busy_cores"] / gbps if gbps
                else float("inf"),
                "runs": self.runs}

    def close(self) -> None:
        self.lab.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of one iperf3 run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per backend (median reported)")
    ap.add_argument("--streams", type=int, default=1, help="parallel TCP streams (-P)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    for tool in ("iperf3", "etcd", "etcdctl", "ip", "wg"):
        if shutil.which(tool) is None:
            print(f"wireguard bench: {tool} not found", file=sys.stderr)
            return 2
    print("load average before:", Path("/proc/loadavg").read_text().strip(), flush=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=f"na-bench-wg-{RUN_ID}-") as tmp:
        labs: list[BackendLab] = []
        try:
            for b in ("wireguard", "vxlan"):
                labs.append(BackendLab(b, Path(tmp)))
            print("wireguard implementation:", labs[0].implementation, flush=True)
            for i in range(args.repeat):
                for bl in labs:
                    r = bl.run_once(args.seconds, args.streams)
                    print(f"run {i + 1} {bl.backend:9}: {r['bps'] / 1e9:6.3f} Gbit/s, "
                          f"wireguard-go {100 * r['impl_cpu']:5.1f} % CPU, machine busy "
                          f"{r['machine_busy_cores']:.2f} cores, {r['retransmits']} retransmits",
                          flush=True)
            for bl in labs:
                results[bl.backend] = bl.summary()
        finally:
            for bl in labs:
                bl.close()
    print(f"\n{'backend':10} {'implementation':15} {'Gbit/s':>8} {'wg-go cores':>12} "
          f"{'busy cores':>11} {'wg-go cores/Gbit/s':>19} {'busy cores/Gbit/s':>18}")
    for b, r in results.items():
        print(f"{b:10} {r['implementation']:15} {r['bps'] / 1e9:>8.3f} {r['impl_cpu']:>12.2f} "
              f"{r['machine_busy_cores']:>11.2f} {r['impl_cores_per_gbps']:>19.2f} "
              f"{r['machine_cores_per_gbps']:>18.2f}")
    if "wireguard" in results and "vxlan" in results:
        ratio = results["wireguard"]["bps"] / results["vxlan"]["bps"]
        results["ratio"] = {"wireguard_over_vxlan": ratio}
        print(f"\nwireguard / vxlan throughput = {ratio:.3f}")
    print(f"{args.repeat} × {args.seconds:g} s, {args.streams} stream(s); load average after: "
          f"{Path('/proc/loadavg').read_text().strip()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
