#!/usr/bin/env python3
"""`make demo`: a local etcd, 3 namespace hosts running the real agent, one pod per host, and
a pod x pod ping matrix. Everything lives in namespaces named for this run and is removed at
the end (also on Ctrl-C).

    python3 contrib/demo.py [--backend vxlan|host-gw|udp|alloc] [--hosts N] [--keep SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

from support.harness import Lab, read_env_file, wait_for  # noqa: E402

PREFIX = "/coreos.com/network"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="vxlan")
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--keep", type=float, default=0, help="seconds to keep the lab running")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("the demo needs root (network namespaces)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="netagent-demo-") as tmp:
        lab = Lab(Path(tmp), tag="d")
        try:
            return run(lab, args)
        finally:
            lab.close()
            print("cleaned up: namespaces, etcd and agents removed")


def run(lab: Lab, args: argparse.Namespace) -> int:
    etcd = lab.start_etcd()
    config = {"Network": "172.16.0.0/16", "SubnetLen": 24, "SubnetMin": "172.16.1.0",
              "SubnetMax": "172.16.10.0", "Backend": {"Type": args.backend}}
    print(f"$ etcdctl put {PREFIX}/config '{json.dumps(config)}'")
    etcd.put(f"{PREFIX}/config", json.dumps(config))
    hosts = [lab.add_host() for _ in range(args.hosts)]
    for h in hosts:
        lab.start_agent(h)
    for h in hosts:
        wait_for(h.subnet_file.exists, 30, what=f"{h.name} subnet.env")
    print(f"\n{len(hosts)} hosts, each running `netagent run` in its own network namespace:")
    for h in hosts:
        env = read_env_file(h.subnet_file)
        print(f"  {h.name:<16} underlay {h.ip:<15} subnet {env['FLANNEL_SUBNET']:<16} "
              f"mtu {env['FLANNEL_MTU']}")
    print(f"\n$ etcdctl get --prefix {PREFIX}/subnets")
    for k, v in sorted(etcd.get_prefix(f"{PREFIX}/subnets/").items()):
        print(f"  {k}\n    {v}")
    if args.backend == "alloc":
        return 0
    pods = [lab.add_pod(h) for h in hosts]
    # give the agents a moment to program every peer (they converge within milliseconds)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if all(p.ping(q.ip) for p in pods for q in pods if p is not q):
            break
        time.sleep(0.5)
    print(f"\nping matrix over {args.backend} (row pings column):")
    width = max(len(p.ip) for p in pods) + 2
    print(" " * width + "".join(f"{q.ip:>{width}}" for q in pods))
    failures = 0
    for p in pods:
        cells = []
        for q in pods:
            ok = p.ping(q.ip, count=2, wait=1)
            failures += 0 if ok else 1
            cells.append(f"{'ok' if ok else 'FAIL':>{width}}")
        print(f"{p.ip:<{width}}" + "".join(cells))
    if args.keep:
        print(f"\nkeeping the lab for {args.keep:.0f} s: try `ip netns exec {pods[0].name} ping "
              f"{pods[-1].ip}`")
        time.sleep(args.keep)
    print("\nall pods reach each other" if not failures else f"\n{failures} pings failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
