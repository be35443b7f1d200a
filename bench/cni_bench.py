#!/usr/bin/env python3
"""CNI latency: netagent's plugin vs Debian's ``bridge`` + ``host-local``, same subnet, one run.

Usage (root): ``python3 bench/cni_bench.py [--runs 50] [--startup] [--stack v4|dual]``

Each run creates a pod namespace, runs ADD, then DEL, for each variant in turn (interleaved, the
order rotating, so drift of the machine hits all alike); each variant gets its own bridge in a
bench "host" namespace that this process enters with setns(2), so no ``ip netns exec`` overhead
is timed. All are launched exactly as a runtime does (exec with CNI env + stdin). Variants:
``ours`` is what ``install_cni`` installs: the C client (``cni/client.c``) handing the call to
the CNI server (``cni/server.py``, started here in the bench host namespace, as systemd would
start it on the host); ``launcher`` is the Python launcher alone (``python3 -IS``, what the
client falls back to without a server); ``ref`` is Debian's plugins. Prints p50/p90 in ms and
ratios to ``ref`` (goal: ours ADD p50 ≤ 1.5x). ``--startup`` also prints start-up costs.
``--stack dual`` gives both plugins an IPv6 /64 too (subnet.env IPv6 lines; host-local a second
range set): the reference bridge then waits for IPv6 DAD to settle (~1 s), so that ratio
measures a different thing, not the 1.5x goal.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from netagent.cni.fast import setns  # noqa: E402
from netagent.cni.install import install_cni  # noqa: E402

REF = "/usr/lib/cni"


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _startup(launcher: str, client: str, n: int = 30) -> None:
    py = sys.executable
    cases = [
        ("python3 -c pass (site-packages)", [py, "-c", "pass"]),
        ("python3 -I -S -c pass", [py, "-I", "-S", "-c", "pass"]),
        ("python3 -I -S -c 'import json'", [py, "-I", "-S", "-c", "import json"]),
        ("python3 -I -S -c 'import subprocess'", [py, "-I", "-S", "-c", "import subprocess"]),
        ("python3 -I -c 'from pyroute2 import IPRoute'",
         [py, "-I", "-c", "from pyroute2 import IPRoute"]),
        ("plugin start-up imports (-IS)",
         [py, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
          "import netagent.cni.plugin, netagent.cni.verbs, netagent.cni.link, netagent.cni.ipam, "
          "netagent.cni.ipamdisk, netagent.cni.subnet"]),
        ("plugin VERSION via launcher", [launcher]),
        ("plugin VERSION via C client + server", [client]),
        ("ip link show lo", ["ip", "link", "show", "lo"]),
    ]
    print(f"start-up, mean of {n} execs (ms):")
    for label, cmd in cases:
        env = dict(os.environ, CNI_COMMAND="VERSION")
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=env,
                           check=False)
            times.append((time.perf_counter() - t0) * 1000)
        print(f"  {label:48s} {statistics.mean(times):7.1f}  (p50 {_pct(times, .5):.1f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--startup", action="store_true", help="also measure start-up costs")
    ap.add_argument("--stack", choices=("v4", "dual"), default="v4",
                    help="address families in subnet.env (default v4)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (namespaces, bridges)")
    if not os.path.exists(f"{REF}/bridge"):
        raise SystemExit("needs Debian's containernetworking-plugins in /usr/lib/cni")
    tag = f"{os.getpid() % 100000:05d}"
    host_ns = f"nabench{tag}"
    tmp = Path(tempfile.mkdtemp(prefix="na-cni-bench-"))
    sock = tmp / "run" / "cni.sock"
    try:
        exe, launcher = install_cni(str(tmp / "bin"), str(tmp / "net.d"), client="c",
                                    socket_path=str(sock))[:2]
    except RuntimeError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"cannot build the C client: {e}") from None
    a, c = random.randrange(100, 199), random.randrange(1, 250)
    v6 = (f"FLANNEL_IPV6_NETWORK=fd6e:{a:x}::/56\nFLANNEL_IPV6_SUBNET=fd6e:{a:x}:0:{c:x}::1/64\n"
          if args.stack == "dual" else "")
    (tmp / "subnet.env").write_text(f"FLANNEL_NETWORK=10.{a}.0.0/16\nFLANNEL_SUBNET=10.{a}.{c}.1/24"
                                    f"\n{v6}FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    ranges = [[{"subnet": f"10.{a}.{c}.0/24"}]]
    if args.stack == "dual":
        ranges.append([{"subnet": f"fd6e:{a:x}:0:{c:x}::/64"}])
    ours = {"cniVersion": "1.0.0", "name": f"nabench{tag}", "type": "netagent",
            "bridge": f"nab{tag}a", "subnetFile": str(tmp / "subnet.env"),
            "dataDir": str(tmp / "ours"), "ipMasq": False, "isDefaultGateway": True}
    solo = dict(ours, bridge=f"nab{tag}c", dataDir=str(tmp / "solo"))
    ref = {"cniVersion": "1.0.0", "name": f"nabench{tag}", "type": "bridge",
           "bridge": f"nab{tag}b", "isGateway": True, "isDefaultGateway": True,
           "ipMasq": False, "mtu": 1450,
           "ipam": {"type": "host-local", "ranges": ranges, "dataDir": str(tmp / "ref")}}
    subprocess.run(["ip", "netns", "add", host_ns], check=True)
    pods: list[str] = []
    root_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    host_fd = os.open(f"/run/netns/{host_ns}", os.O_RDONLY)
    variants = [("ours", exe, ours, "eth0"), ("launcher", launcher, solo, "eth2"),
                ("ref", f"{REF}/bridge", ref, "eth1")]  # never share an ifname
    times: dict[str, list[float]] = {f"{v[0]} {verb}": [] for verb in ("ADD", "DEL")
                                     for v in variants}
    server: subprocess.Popen[bytes] | None = None
    try:
        setns(host_fd)  # children (the plugins, the server) inherit the bench host namespace
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        server = subprocess.Popen([launcher, "--server", "--socket", str(sock)],
                                  stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not sock.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the CNI server did not start")
            time.sleep(0.02)
        if args.startup:
            _startup(launcher, exe)
        cni_path = f"{Path(exe).parent}:{REF}"
        for i in range(args.runs + 1):  # run 0 warms caches (bridge creation) and is dropped
            pod = f"{host_ns}p{i}"
            subprocess.run(["ip", "netns", "add", pod], check=True)
            pods.append(pod)
            netns = f"/run/netns/{pod}"
            order = variants[i % 3:] + variants[:i % 3]
            for label, plugin, conf, env_if in order:
                cid = f"{label}{i}"
                t_add = _call_if(plugin, "ADD", conf, cid, netns, cni_path, env_if)
                t_del = _call_if(plugin, "DEL", conf, cid, netns, cni_path, env_if)
                if i:
                    times[f"{label} ADD"].append(t_add)
                    times[f"{label} DEL"].append(t_del)
            subprocess.run(["ip", "netns", "del", pod], check=True)
            pods.remove(pod)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        setns(root_fd)
        for pod in pods:
            subprocess.run(["ip", "netns", "del", pod], check=False)
        subprocess.run(["ip", "netns", "del", host_ns], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"CNI latency over {args.runs} runs (ms), same /24{' + /64' if v6 else ''}, "
          f"bench host netns, {os.cpu_count()} CPUs:")
    print("  ours = C client + CNI server; launcher = Python launcher alone; ref = bridge + "
          "host-local")
    print(f"  {'':14s} {'p50':>7s} {'p90':>7s}")
    for key, vals in times.items():
        print(f"  {key:14s} {_pct(vals, .5):7.1f} {_pct(vals, .9):7.1f}")
    for label in ("ours", "launcher"):
        for verb in ("ADD", "DEL"):
            o, r = times[f"{label} {verb}"], times[f"ref {verb}"]
            print(f"  ratio {label}/ref {verb}: p50 {_pct(o, .5) / _pct(r, .5):.2f}x  "
                  f"p90 {_pct(o, .9) / _pct(r, .9):.2f}x")
    goal = _pct(times["ours ADD"], .5) / _pct(times["ref ADD"], .5)
    print(f"goal ADD p50 <= 1.5x reference: {'met' if goal <= 1.5 else 'NOT met'} ({goal:.2f}x)")
    return 0


def _call_if(exe: str, command: str, conf: dict[str, object], cid: str, netns: str,
             cni_path: str, ifname: str) -> float:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
           "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
           "CNI_IFNAME": ifname, "CNI_PATH": cni_path}
    data = json.dumps(conf).encode()
    t0 = time.perf_counter()
    proc = subprocess.run([exe], input=data, capture_output=True, env=env, check=False)
    dt = (time.perf_counter() - t0) * 1000
    if proc.returncode != 0:
        raise SystemExit(f"{exe} {command} failed: {proc.stdout.decode()} {proc.stderr.decode()}")
    return dt


if __name__ == "__main__":
    sys.exit(main())
