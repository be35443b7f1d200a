#!/usr/bin/env python3
"""Pod-to-pod iperf3 throughput over vxlan and host-gw, against the underlay, with real agents.

For each backend: a fresh lab (underlay bridge, etcd, two namespace hosts running
``netagent run``, one pod namespace per host and per attachment), then iperf3 TCP

* underlay: host 1 → host 2 over ``eth0`` (the baseline the goals are relative to),
* overlay:  pod on host 1 → pod on host 2 (through the agent's routes), once per attachment,

each ``--repeat`` times in rounds (one run of every path per round, in a shuffled order, so
drift in machine load hits all paths alike), median reported. The machine is shared: each run
waits for it to be idle first, and a run during which other processes used CPU in user space
is repeated (``--retry-disturbed``). Goals (project issue 3): vxlan
≥ 0.90×, host-gw ≥ 0.95× of the underlay. Needs root, etcd and iperf3; everything lives in
run-unique namespaces.

Pod attachments (``--attach``, side by side in one lab):

* ``bridge``: veth into a bridge holding the subnet's gateway, what the CNI plugin does;
* ``routed``: veth with no bridge (Calico style): ``/32`` on the pod, a ``/32`` route to the pod
  on the host end, static neighbours both ways, the gateway address on no device;
* ``cni-bridge``, ``cni-routed``: the pod attached by the real CNI plugin (``cni/plugin.py``,
  installed as ``netagent install-cni --client python`` installs it, run in the host namespace
  as a runtime runs it) with ``"mode": "bridge"`` (the default) or ``"mode": "routed"``, the
  conf otherwise ``install-cni``'s default (hairpin on) without ipMasq; the figures then
  come from the product rather than a set-up by hand. The bridge is the same one the
  ``bridge`` attachment uses, so all four can share a lab;
* ``+gro`` after any: GRO on both ends of the pair's veths (veth NAPI in recent kernels);
  ``+mtuN`` after ``routed``: that pod MTU instead of ``FLANNEL_MTU`` (to separate vxlan's
  smaller MTU from its encapsulation cost on host-gw).

Every iperf3 option (``--cc``, ``--pin``, ``--zerocopy``, ``--streams``) applies to the underlay
and the pod runs alike, so the comparison stays the same single TCP stream between the same two
"hosts". The congestion control used is printed: this kernel's default may not be Linux's
usual ``cubic``.

    sudo python3 bench/throughput.py                # both backends, 3 × 5 s each
    sudo python3 bench/throughput.py --seconds 10 --repeat 5 --backend vxlan --json out.json
    sudo python3 bench/throughput.py --attach bridge,routed --cc cubic --pin 0,1
    sudo python3 bench/throughput.py --seconds 5 --repeat 5 --attach cni-bridge,cni-routed
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
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from support.cni import install_plugin, run_plugin  # noqa: E402
from support.harness import RUN_ID, Host, Lab, Pod, add_netns, read_env_file, sh, wait_for  # noqa: E402

GOALS = {"vxlan": 0.90, "host-gw": 0.95}
NETWORK = "10.42.0.0/16"
ATTACH_KINDS = ("bridge", "routed", "cni-bridge", "cni-routed")
#: a machine below this share of busy CPU (all CPUs, over one second) counts as idle
IDLE_BUSY_PCT = 8.0
#: user-space CPU (all CPUs added) above which a run counts as disturbed: iperf3 itself uses
#: ~3 %, the data path is kernel time, so more is someone else's work on the shared machine
DISTURBED_USER_PCT = 10.0


# --------------------------------------------------------------------------- CPU accounting


def cpu_times() -> dict[str, list[int]]:
    """/proc/stat per CPU: user, nice, system, idle, iowait, irq, softirq (clock ticks)."""
    out: dict[str, list[int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu"):
                fields = line.split()
                out[fields[0]] = [int(x) for x in fields[1:8]]
    return out


def cpu_split(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, Any]:
    """Per CPU % user/system/softirq/idle between two samples, and the busy total in % of one
    CPU (so 2 CPUs fully busy = 200)."""
    per: dict[str, dict[str, float]] = {}
    busy = 0.0
    for cpu in sorted(k for k in after if k != "cpu"):
        d = [b - a for a, b in zip(before[cpu], after[cpu], strict=True)]
        total = sum(d) or 1
        row = {"user": 100 * (d[0] + d[1]) / total, "sys": 100 * (d[2] + d[5]) / total,
               "softirq": 100 * d[6] / total, "idle": 100 * (d[3] + d[4]) / total}
        per[cpu] = {k: round(v, 1) for k, v in row.items()}
        busy += 100 - row["idle"]
    user = sum(row["user"] for row in per.values())
    return {"per_cpu": per, "busy_pct": round(busy, 1), "user_pct": round(user, 1)}


def wait_idle(limit: float) -> float:
    """Wait up to `limit` s until the machine is idle over one second (other people's work
    runs on it); returns the busy % of the last sample (the caller reports a busy start)."""
    deadline = time.monotonic() + limit
    while True:
        a = cpu_times()["cpu"]
        time.sleep(1.0)
        b = cpu_times()["cpu"]
        d = [y - x for x, y in zip(a, b, strict=True)]
        busy = 100 * (sum(d) - d[3] - d[4]) / (sum(d) or 1)
        if busy < IDLE_BUSY_PCT or time.monotonic() >= deadline:
            return busy


# --------------------------------------------------------------------------- pods


def add_routed_pod(lab: Lab, host: Host, k: int, *, gro: bool = False, mtu: str = "") -> Pod:
    """A pod on a veth routed by the host, no bridge (how Calico attaches pods).

    The pod has its address as /32 and a default route via the subnet's gateway address,
    which sits on no device: a permanent neighbour entry maps it to the host end's MAC (no
    ARP, no proxy ARP). The host has a /32 route to the pod on the host end and a permanent
    neighbour for it. The host keeps forwarding on, as for the bridge.
    """
    env = read_env_file(host.subnet_file)
    gw = env["FLANNEL_SUBNET"].split("/")[0]
    mtu = mtu or env.get("FLANNEL_MTU", "1500")
    name = f"{lab.tag}-r{host.index}{k}"
    add_netns(name)
    lab._made.append(name)  # removed with the lab
    hv = f"rv{k}"
    sh("ip", "link", "add", hv, "mtu", mtu, "type", "veth", "peer", "name", "eth0", "mtu", mtu,
       "netns", name, ns=host.name)
    sh("ip", "link", "set", hv, "up", ns=host.name)
    base, last = gw.rsplit(".", 1)
    ip = f"{base}.{int(last) + 99 + k}"
    sh("ip", "addr", "add", f"{ip}/32", "dev", "eth0", ns=name)
    sh("ip", "link", "set", "eth0", "up", ns=name)
    host_mac = _mac(host.name, hv)
    pod_mac = _mac(name, "eth0")
    sh("ip", "route", "add", gw, "dev", "eth0", "scope", "link", ns=name)
    sh("ip", "route", "add", "default", "via", gw, "dev", "eth0", ns=name)
    sh("ip", "neigh", "replace", gw, "lladdr", host_mac, "dev", "eth0", "nud", "permanent",
       ns=name)
    sh("ip", "route", "add", f"{ip}/32", "dev", hv, "scope", "link", ns=host.name)
    sh("ip", "neigh", "replace", ip, "lladdr", pod_mac, "dev", hv, "nud", "permanent",
       ns=host.name)
    pod = Pod(name, ip, host)
    lab.pods.append(pod)
    if gro:
        set_veth_gro(host.name, hv, name)
    return pod


def add_cni_pod(lab: Lab, host: Host, mode: str, plugin: str) -> tuple[Pod, str]:
    """A pod attached by the CNI plugin itself (ADD as a runtime calls it, in the host's
    namespace); (the pod, its host veth). Removed with the lab: the pod namespace takes the
    veth pair, and with it the routed mode's routes and neighbours."""
    k = 1 + sum(1 for p in lab.pods if p.host is host and f"-c{mode[0]}" in p.name)
    name = f"{lab.tag}-c{mode[0]}{host.index}{k}"
    add_netns(name)
    lab._made.append(name)
    conf = {"cniVersion": "1.0.0", "name": "nabench", "type": "netagent", "mode": mode,
            "bridge": f"nb{RUN_ID}", "subnetFile": str(host.subnet_file),
            "dataDir": str(lab.tmp / host.name / "cni-ipam"), "hairpinMode": True,
            "isDefaultGateway": True, "ipMasq": False, "subnetFileWait": 0}
    call = run_plugin(plugin, "ADD", conf, host_ns=host.name, cid=name,
                      netns=f"/run/netns/{name}", path=str(Path(plugin).parent))
    if call.rc != 0 or not isinstance(call.json, dict):
        raise RuntimeError(f"CNI ADD ({mode}) on {host.name} failed: {call}")
    res = call.json
    ip = str(res["ips"][0]["address"]).split("/")[0]
    host_veth = next(str(i["name"]) for i in res["interfaces"]
                     if not i.get("sandbox") and i["name"] != f"nb{RUN_ID}")
    pod = Pod(name, ip, host)
    lab.pods.append(pod)
    return pod, host_veth


def _mac(ns: str, dev: str) -> str:
    return str(json.loads(sh("ip", "-j", "link", "show", dev, ns=ns).stdout)[0]["address"])


def set_veth_gro(host_ns: str, host_veth: str, pod_ns: str) -> None:
    """GRO on both ends of a pod's veth pair (in kernels ≥ 5.13 this also turns on the veth's
    NAPI receive path)."""
    sh("ethtool", "-K", host_veth, "gro", "on", ns=host_ns)
    sh("ethtool", "-K", "eth0", "gro", "on", ns=pod_ns)


def add_pods(lab: Lab, hosts: list[Host], attach: str, plugin: str = "") -> list[Pod]:
    kind, *mods = attach.split("+")
    gro = "gro" in mods
    mtu = next((m[3:] for m in mods if m.startswith("mtu")), "")
    if kind.startswith("cni-"):
        made = [add_cni_pod(lab, h, kind[4:], plugin) for h in hosts]
        if gro:
            for p, veth in made:
                set_veth_gro(p.host.name, veth, p.name)
        return [p for p, _ in made]
    if kind == "routed":
        k = 1 + sum(1 for p in lab.pods if p.host is hosts[0] and "-r" in p.name)
        return [add_routed_pod(lab, h, k, gro=gro, mtu=mtu) for h in hosts]
    if mtu:
        raise ValueError("+mtu is only for routed pods (the bridge pods share one bridge)")
    pods = [lab.add_pod(h, bridge=f"nb{RUN_ID}") for h in hosts]
    if gro:
        for p in pods:
            veth = _bridge_port_of(p)
            set_veth_gro(p.host.name, veth, p.name)
    return pods


def split_cpus(hosts: list[Host]) -> None:
    """RPS on each host's ``eth0``: what host i receives is processed on CPU i-1, as if each
    "host" were a machine of its own. Without it the whole receive path of both hosts runs in
    softirq on the CPU of whoever transmitted (veth hands packets over on the sender's CPU).
    Applies to the underlay and the pods alike."""
    ncpu = os.cpu_count() or 1
    for i, h in enumerate(hosts):
        mask = f"{1 << (i % ncpu):x}"
        queues = sh("ls", "/sys/class/net/eth0/queues", ns=h.name).stdout.split()
        for q in (q for q in queues if q.startswith("rx-")):
            sh("sh", "-c", f"echo {mask} > /sys/class/net/eth0/queues/{q}/rps_cpus", ns=h.name)


def _bridge_port_of(pod: Pod) -> str:
    """The host end of a bridge pod's veth (its peer index is the pod's eth0 link)."""
    link = json.loads(sh("ip", "-j", "link", "show", "eth0", ns=pod.name).stdout)[0]
    peer = int(link["link_index"])
    for dev in json.loads(sh("ip", "-j", "link", "show", ns=pod.host.name).stdout):
        if dev["ifindex"] == peer:
            return str(dev["ifname"])
    raise RuntimeError(f"no host end for {pod.name}")


def parse_attach(text: str) -> list[str]:
    out = []
    for item in text.split(","):
        kind, *mods = item.strip().split("+")
        mtus = [m for m in mods if m.startswith("mtu") and m[3:].isdigit()]
        bad = [m for m in mods if m != "gro" and m not in mtus]
        if kind not in ATTACH_KINDS or bad or (kind != "routed" and mtus):
            raise argparse.ArgumentTypeError(
                f"{item!r}: want one of {', '.join(ATTACH_KINDS)}, optionally +gro "
                "(and for routed +mtuN)")
        out.append(item.strip())
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError("an attachment is listed twice")
    return out


def parse_feature(text: str) -> tuple[str, str, str]:
    dev, _, rest = text.partition(":")
    feature, _, value = rest.partition(":")
    if not dev or not feature or value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: want DEV:FEATURE:on|off")
    return dev, feature, value


# --------------------------------------------------------------------------- iperf3


def iperf(client_ns: str, server_ns: str, server_ip: str, seconds: float,
          streams: int, extra: list[str] | None = None) -> dict[str, Any]:
    """One iperf3 TCP run: received bits per second, retransmits, CPU split over the run."""
    port = str(random.randrange(20000, 30000))
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", port],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def connect() -> dict[str, Any] | None:
            before = cpu_times()
            proc = sh("iperf3", "-c", server_ip, "-p", port, "-t", str(seconds), "-P",
                      str(streams), "-J", *(extra or []), ns=client_ns, check=False,
                      timeout=seconds + 30)
            after = cpu_times()
            try:
                doc = json.loads(proc.stdout)
            except ValueError:
                doc = {}
            if proc.returncode != 0 or "sum_received" not in doc.get("end", {}):
                print(f"  iperf3 retry: {doc.get('error') or proc.stderr.strip()}",
                      file=sys.stderr)
                return None  # the server is not listening yet
            end = doc["end"]
            return {"bps": float(end["sum_received"]["bits_per_second"]),
                    "retransmits": int(end["sum_sent"].get("retransmits", 0)),
                    "cc": end.get("sender_tcp_congestion", "?"),
                    "cpu": cpu_split(before, after)}

        return wait_for(connect, timeout=seconds + 40, interval=0.1,  # type: ignore[no-any-return]
                        what="iperf3 run")
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


# --------------------------------------------------------------------------- bench


def measure_backend(backend: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
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
        if args.split_cpus:
            split_cpus(hosts)
        for dev, feature, value in args.host_feature:
            for h in hosts:
                sh("ethtool", "-K", dev, feature, value, ns=h.name)
        pairs: dict[str, tuple[str, str, str]] = {
            "underlay": (hosts[0].name, hosts[1].name, hosts[1].ip)}
        for attach in args.attach:
            pods = add_pods(lab, hosts, attach, args.cni_plugin)
            wait_for(lambda pods=pods: pods[0].ping(pods[1].ip), timeout=30, interval=0.2,
                     what=f"pod-to-pod connectivity ({attach})")
            pairs[attach] = (pods[0].name, pods[1].name, pods[1].ip)
        extra = iperf_extra(args)
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in pairs}
        for i in range(args.repeat):
            order = list(pairs)
            random.shuffle(order)
            for path in order:
                for attempt in range(args.retry_disturbed + 1):
                    busy_before = wait_idle(args.idle_wait) if args.idle_wait > 0 else 0.0
                    r = iperf(*pairs[path], args.seconds, args.streams, extra)
                    r["busy_before_pct"] = round(busy_before, 1)
                    r["disturbed"] = r["cpu"]["user_pct"] > DISTURBED_USER_PCT
                    r["attempt"] = attempt + 1
                    if args.verbose:
                        print(f"  {backend} round {i + 1} {path:12} {r['bps'] / 1e9:6.2f} Gbit/s"
                              f" retr {r['retransmits']:6d} busy {r['cpu']['busy_pct']:5.1f} %"
                              f" user {r['cpu']['user_pct']:4.1f} % (before {busy_before:4.1f} %)"
                              f"{' disturbed' if r['disturbed'] else ''}", flush=True)
                    if not r["disturbed"]:
                        break
                runs[path].append(r)
        mtu = read_env_file(hosts[0].subnet_file)["FLANNEL_MTU"]
        peer = IPv4Interface(read_env_file(hosts[1].subnet_file)["FLANNEL_SUBNET"]).network
        route = sh("ip", "route", "show", str(peer), ns=hosts[0].name).stdout.strip()
        med = {p: statistics.median(r["bps"] for r in rs) for p, rs in runs.items()}
        cost = {p: statistics.median(r["cpu"]["busy_pct"] / (r["bps"] / 1e9) for r in rs)
                for p, rs in runs.items()}
        first = args.attach[0]
        return {
            "backend": backend, "pod_mtu": int(mtu), "route": route,
            "cc": runs["underlay"][0]["cc"], "iperf_extra": extra,
            "split_cpus": args.split_cpus,
            "host_features": [":".join(f) for f in args.host_feature],
            "underlay_bps": med["underlay"], "overlay_bps": med[first],
            "underlay_runs": [r["bps"] for r in runs["underlay"]],
            "overlay_runs": [r["bps"] for r in runs[first]],
            "ratio": med[first] / med["underlay"],
            "attachments": {a: {"bps": med[a], "ratio": med[a] / med["underlay"],
                                "cpu_pct_per_gbit": cost[a]} for a in args.attach},
            "underlay_cpu_pct_per_gbit": cost["underlay"],
            "runs": runs,
            "goal": GOALS[backend],
        }
    finally:
        lab.close()


def iperf_extra(args: argparse.Namespace) -> list[str]:
    extra: list[str] = []
    if args.cc:
        extra += ["-C", args.cc]
    if args.pin:
        extra += ["-A", args.pin]
    if args.zerocopy:
        extra.append("-Z")
    return extra


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", action="append", choices=sorted(GOALS),
                    help="backend to measure (repeatable; default: all)")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of one iperf3 run")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (median reported)")
    ap.add_argument("--streams", type=int, default=1, help="parallel TCP streams (-P)")
    ap.add_argument("--attach", type=parse_attach, default=["bridge"],
                    help="pod attachments measured side by side, comma-separated: bridge, "
                         "routed (set up by hand), cni-bridge, cni-routed (by the CNI "
                         "plugin), each optionally +gro (default: bridge; the first one is "
                         "the one checked against the goal)")
    ap.add_argument("--cc", help="TCP congestion control for every run, both paths (iperf3 "
                                 "-C; default: the kernel's default)")
    ap.add_argument("--pin", metavar="C,S",
                    help="CPU of the iperf3 client and server for every run (iperf3 -A)")
    ap.add_argument("--zerocopy", action="store_true", help="iperf3 -Z (sendfile)")
    ap.add_argument("--host-feature", type=parse_feature, action="append", default=[],
                    metavar="DEV:FEATURE:on|off",
                    help="ethtool -K DEV FEATURE on|off in both hosts before measuring "
                         "(repeatable), e.g. flannel.1:gro:off")
    ap.add_argument("--split-cpus", action="store_true",
                    help="RPS on each host's eth0 to a CPU of its own (models two machines)")
    ap.add_argument("--idle-wait", type=float, default=60.0, metavar="S",
                    help="before each run, wait up to S s for the machine to be idle "
                         f"(< {IDLE_BUSY_PCT:.0f} %% busy over 1 s; 0: do not wait)")
    ap.add_argument("--retry-disturbed", type=int, default=2, metavar="N",
                    help="repeat a run up to N times when other processes used more than "
                         f"{DISTURBED_USER_PCT:.0f} %% CPU in user space during it (the last "
                         "attempt is kept either way)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every run")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    for tool in ("iperf3", "etcd", "etcdctl", "ip", "ethtool"):
        if shutil.which(tool) is None:
            print(f"throughput: {tool} not found", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("throughput: needs root", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix=f"na-bench-{RUN_ID}-") as tmp:
        args.cni_plugin = ""
        if any(a.startswith("cni-") for a in args.attach):
            args.cni_plugin = install_plugin(Path(tmp) / "cni", client="python")[0]
        for backend in args.backend or sorted(GOALS, reverse=True):
            t0 = time.monotonic()
            r = measure_backend(backend, args, Path(tmp))
            r["wall_s"] = round(time.monotonic() - t0, 1)
            results.append(r)
            print(f"{backend}: route {r['route']!r}; congestion control {r['cc']}; iperf3 "
                  f"{' '.join(r['iperf_extra']) or '(defaults)'}; runs (Gbit/s):", flush=True)
            for path, rs in r["runs"].items():
                bad = sum(1 for x in rs if x["disturbed"])
                print(f"  {path:14} {[round(x['bps'] / 1e9, 2) for x in rs]}"
                      f"{f'  ({bad} disturbed by other load)' if bad else ''}", flush=True)
    print(f"{'backend':9} {'pod MTU':>7} {'attach':14} {'underlay Gbit/s':>16} "
          f"{'pod-pod Gbit/s':>15} {'ratio':>6} {'goal':>6} {'CPU %/Gbit u/p':>15}")
    ok = True
    for r in results:
        for i, (attach, a) in enumerate(r["attachments"].items()):
            met = a["ratio"] >= r["goal"]
            if i == 0:
                ok &= met
            print(f"{r['backend']:9} {r['pod_mtu']:>7} {attach:14} "
                  f"{r['underlay_bps'] / 1e9:>16.2f} {a['bps'] / 1e9:>15.2f} {a['ratio']:>6.2f} "
                  f"{r['goal']:>6.2f} {r['underlay_cpu_pct_per_gbit']:>7.1f}/"
                  f"{a['cpu_pct_per_gbit']:<7.1f}{'' if met else ' (below goal)'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
