#!/usr/bin/env python3
"""Pod-to-pod iperf3 throughput over vxlan and host-gw, against the underlay, with real agents.

For each backend: a fresh lab (underlay bridge, etcd, two namespace hosts running
``netagent run``, one pod namespace per host on a plain bridge), then iperf3 TCP

* underlay: host 1 → host 2 over ``eth0`` (the baseline the goals are relative to),
* overlay:  pod on host 1 → pod on host 2 (through the agent's routes),

each ``--repeat`` times, median reported. Goals (project issue 3): vxlan ≥ 0.90×, host-gw ≥
0.95× of the underlay. Needs root, etcd and iperf3; everything lives in run-unique namespaces.

    sudo python3 bench/throughput.py                # both backends, 3 × 5 s each
    sudo python3 bench/throughput.py --seconds 10 --repeat 5 --backend vxlan --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from harness import RUN_ID, Host, Lab, read_env_file, sh, wait_for  # noqa: E402

GOALS = {"vxlan": 0.90, "host-gw": 0.95}
NETWORK = "10.42.0.0/16"


def iperf(client_ns: str, server_ns: str, server_ip: str, seconds: float,
          streams: int) -> float:
    """One iperf3 TCP run; returns received bits per second."""
    port = str(random.randrange(20000, 30000))
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", port],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def connect() -> dict[str, Any] | None:
            proc = sh("iperf3", "-c", server_ip, "-p", port, "-t", str(seconds), "-P",
                      str(streams), "-J", ns=client_ns, check=False, timeout=seconds + 30)
            try:
                doc = json.loads(proc.stdout)
            except ValueError:
                doc = {}
            if proc.returncode != 0 or "sum_received" not in doc.get("end", {}):
                print(f"  iperf3 retry: {doc.get('error') or proc.stderr.strip()}",
                      file=sys.stderr)
                return None  # the server is not listening yet
            return doc  # type: ignore[no-any-return]

        result = wait_for(connect, timeout=seconds + 40, interval=0.1, what="iperf3 run")
        return float(result["end"]["sum_received"]["bits_per_second"])
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def measure_backend(backend: str, seconds: float, repeat: int, streams: int,
                    tmp: Path) -> dict[str, Any]:
    lab = Lab(tmp / backend, tag="bt")
    try:
        etcd = lab.start_etcd()
        etcd.put("/coreos.com/network/config",
                 json.dumps({"Network": NETWORK, "Backend": {"Type": backend}}))
        hosts: list[Host] = [lab.add_host(), lab.add_host()]
        for h in hosts:
            lab.start_agent(h)
        for h in hosts:
            wait_for(lambda h=h: h.subnet_file.exists(), timeout=60, what=f"{h.name} lease")
        pods = [lab.add_pod(h, bridge=f"nb{RUN_ID}") for h in hosts]
        wait_for(lambda: pods[0].ping(pods[1].ip), timeout=30, interval=0.2,
                 what="pod-to-pod connectivity")
        under, over = [], []
        for _ in range(repeat):  # interleaved, so drift in machine load hits both alike
            under.append(iperf(hosts[0].name, hosts[1].name, hosts[1].ip, seconds, streams))
            over.append(iperf(pods[0].name, pods[1].name, pods[1].ip, seconds, streams))
        mtu = read_env_file(hosts[0].subnet_file)["FLANNEL_MTU"]
        peer = IPv4Interface(read_env_file(hosts[1].subnet_file)["FLANNEL_SUBNET"]).network
        route = sh("ip", "route", "show", str(peer), ns=hosts[0].name).stdout.strip()
        return {
            "backend": backend, "pod_mtu": int(mtu), "route": route,
            "underlay_bps": statistics.median(under), "overlay_bps": statistics.median(over),
            "underlay_runs": under, "overlay_runs": over,
            "ratio": statistics.median(over) / statistics.median(under),
            "goal": GOALS[backend],
        }
    finally:
        lab.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", action="append", choices=sorted(GOALS),
                    help="backend to measure (repeatable; default: all)")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of one iperf3 run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per path (median reported)")
    ap.add_argument("--streams", type=int, default=1, help="parallel TCP streams (-P)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    for tool in ("iperf3", "etcd", "etcdctl", "ip"):
        if shutil.which(tool) is None:
            print(f"throughput: {tool} not found", file=sys.stderr)
            return 2
    results = []
    with tempfile.TemporaryDirectory(prefix=f"na-bench-{RUN_ID}-") as tmp:
        for backend in args.backend or sorted(GOALS, reverse=True):
            t0 = time.monotonic()
            r = measure_backend(backend, args.seconds, args.repeat, args.streams, Path(tmp))
            r["wall_s"] = round(time.monotonic() - t0, 1)
            results.append(r)
            print(f"{backend}: route {r['route']!r}; runs (Gbit/s) underlay "
                  f"{[round(x / 1e9, 2) for x in r['underlay_runs']]} pod-pod "
                  f"{[round(x / 1e9, 2) for x in r['overlay_runs']]}", flush=True)
    print(f"{'backend':9} {'pod MTU':>7} {'underlay Gbit/s':>16} {'pod-pod Gbit/s':>15} "
          f"{'ratio':>6} {'goal':>6}")
    ok = True
    for r in results:
        met = r["ratio"] >= r["goal"]
        ok &= met
        print(f"{r['backend']:9} {r['pod_mtu']:>7} {r['underlay_bps'] / 1e9:>16.2f} "
              f"{r['overlay_bps'] / 1e9:>15.2f} {r['ratio']:>6.2f} {r['goal']:>6.2f}"
              f"{'' if met else '  (below goal)'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
