#!/usr/bin/env python3
"""`make demo`: flannel's set-up on one machine. A local etcd, 3 namespace hosts each running
the real agent, then on each host `netagent docker-opts` and a real dockerd started with those
options (one per host), a busybox container per host, and a container x container ping matrix.
Where Docker cannot run, the demo says why and uses bare namespace pods instead. Everything
lives in namespaces named for this run and is removed at the end (also on Ctrl-C).

    python3 contrib/demo.py [--backend vxlan|host-gw|udp|alloc] [--hosts N]
                            [--pods auto|docker|netns] [--keep SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.docker import Dockerd, busybox_tar, docker_opts, docker_unavailable  # noqa: E402
from support.harness import RUN_ID, Host, Lab, Pod, read_env_file, wait_for  # noqa: E402

PREFIX = "/coreos.com/network"

#: (label, address, ping(address) -> bool) for each pod or container
Endpoint = tuple[str, str, Callable[[str], bool]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="vxlan")
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--pods", choices=("auto", "docker", "netns"), default="auto",
                    help="docker: a container per host under a real dockerd; netns: bare "
                         "namespace pods; auto (default): docker when it can run here")
    ap.add_argument("--keep", type=float, default=0, help="seconds to keep the lab running")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("the demo needs root (network namespaces)", file=sys.stderr)
        return 1
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="netagent-demo-") as tmp:
        lab = Lab(Path(tmp), tag="d")
        daemons: list[Dockerd] = []
        try:
            return run(lab, daemons, args)
        finally:
            for d in daemons:
                d.stop()
            lab.close()
            print(f"cleaned up: {'dockerds, ' if daemons else ''}namespaces, etcd and agents "
                  f"removed ({time.monotonic() - started:.0f} s in all)")


def run(lab: Lab, daemons: list[Dockerd], args: argparse.Namespace) -> int:
    etcd = lab.start_etcd()
    config = {"Network": "172.16.0.0/16", "SubnetLen": 24, "SubnetMin": "172.16.1.0",
              "SubnetMax": "172.16.10.0", "Backend": {"Type": args.backend}}
    print(f"$ etcdctl put {PREFIX}/config '{json.dumps(config)}'")
    etcd.put(f"{PREFIX}/config", json.dumps(config))
    hosts = [lab.add_host() for _ in range(args.hosts)]
    # --ip-masq: the agent masquerades traffic leaving the overlay, so Docker gets
    # --ip-masq=false and containers keep their addresses between hosts
    for h in hosts:
        lab.start_agent(h, "--ip-masq")
    for h in hosts:
        wait_for(h.subnet_file.exists, 30, what=f"{h.name} subnet.env")
    print(f"\n{len(hosts)} hosts, each running `netagent run --ip-masq` in its own network "
          "namespace:")
    for h in hosts:
        env = read_env_file(h.subnet_file)
        print(f"  {h.name:<16} underlay {h.ip:<15} subnet {env['FLANNEL_SUBNET']:<16} "
              f"mtu {env['FLANNEL_MTU']}")
    print(f"\n$ etcdctl get --prefix {PREFIX}/subnets")
    for k, v in sorted(etcd.get_prefix(f"{PREFIX}/subnets/").items()):
        print(f"  {k}\n    {v}")
    if args.backend == "alloc":
        return 0
    endpoints: list[Endpoint] = []
    if args.pods != "netns":
        why = docker_unavailable()
        if why is None:
            try:
                endpoints = docker_containers(lab, hosts, daemons)
            except (RuntimeError, AssertionError, subprocess.SubprocessError) as exc:
                why = f"dockerd did not run here: {str(exc).strip().splitlines()[-1][:300]}"
                # docker0 holds the subnet's gateway address the pods' bridge needs
                for d in daemons:
                    d.stop()
                    d.host.run("ip", "link", "del", "docker0", check=False)
                daemons.clear()
        if why is not None:
            if args.pods == "docker":
                print(f"\n{why}", file=sys.stderr)
                return 1
            print(f"\nno Docker: {why}; falling back to namespace pods")
    kind = "container"
    if not endpoints:
        kind = "pod"
        for h in hosts:
            pod = lab.add_pod(h)

            def ping(target: str, pod: Pod = pod) -> bool:
                return pod.ping(target, count=2, wait=1)

            endpoints.append((pod.name, pod.ip, ping))
    return ping_matrix(endpoints, kind, args)


def docker_containers(lab: Lab, hosts: Sequence[Host], daemons: list[Dockerd]) -> list[Endpoint]:
    """flannel's Docker flow on every host: docker-opts (mk-docker-opts.sh) → dockerd with
    $DOCKER_OPTS → a busybox container."""
    print("\non each host: netagent docker-opts (mk-docker-opts.sh), then dockerd $DOCKER_OPTS")
    for h in hosts:
        opts, _ = docker_opts(h)
        print(f"  {h.name:<16} DOCKER_OPTS=\"{' '.join(opts)}\"")
        daemons.append(Dockerd(h, lab.tmp / f"{h.name}-docker", opts))
    for d in daemons:
        d.start()
    tar = busybox_tar(lab.tmp)
    endpoints: list[Endpoint] = []
    for d in daemons:
        d.wait_ready()
        d.import_image(tar)
        name = d.run_container(f"na{RUN_ID}-c{d.host.index}")
        ip = d.inspect(name, "{{.NetworkSettings.IPAddress}}")
        version = d.cli("version", "-f", "{{.Server.Version}}").stdout.strip()
        print(f"  {d.host.name:<16} dockerd {version}: container {name} at {ip}")

        def ping(target: str, d: Dockerd = d, name: str = name) -> bool:
            return d.cli("exec", name, "ping", "-c", "2", "-i", "0.2", "-W", "1", target,
                         check=False).returncode == 0

        endpoints.append((name, ip, ping))
    return endpoints


def ping_matrix(endpoints: Sequence[Endpoint], kind: str, args: argparse.Namespace) -> int:
    # give the agents a moment to program every peer (they converge within milliseconds)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if all(ping(ip) for _, _, ping in endpoints for _, ip, _ in endpoints):
            break
        time.sleep(0.5)
    print(f"\nping matrix over {args.backend}, {kind} to {kind} (row pings column):")
    width = max(len(ip) for _, ip, _ in endpoints) + 2
    print(" " * width + "".join(f"{ip:>{width}}" for _, ip, _ in endpoints))
    failures = 0
    for _, src, ping in endpoints:
        cells = []
        for _, dst, _ in endpoints:
            ok = ping(dst)
            failures += 0 if ok else 1
            cells.append(f"{'ok' if ok else 'FAIL':>{width}}")
        print(f"{src:<{width}}" + "".join(cells))
    if args.keep:
        print(f"\nkeeping the lab for {args.keep:.0f} s")
        time.sleep(args.keep)
    print(f"\nall {kind}s reach each other" if not failures else f"\n{failures} pings failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
