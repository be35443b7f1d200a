"""The bgp backend's kernel access (``kernelroutes``) in a real namespace: it finds and removes
only proto-bird routes strictly inside the Network (a blackhole too), never another proto's
route at the same destination, never the Network itself or anything outside it."""

from __future__ import annotations

import json
import os
import sys

from support.harness import REPO, RUN_ID, need_root, netns, sh

SCRIPT = """
import json, sys
from ipaddress import IPv4Network
from netagent.backends.bgp.kernelroutes import bird_routes, remove_bird_routes
net = IPv4Network("10.45.0.0/16")
before = [(str(n), m, t) for n, m, t in bird_routes(net)]
gone = remove_bird_routes(net) if sys.argv[1] == "remove" else 0
print(json.dumps({"before": before, "gone": gone}))
"""


def _run(ns: str, what: str) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = sh(sys.executable, "-c", SCRIPT, what, ns=ns, env=env).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def test_finds_and_removes_only_bird_routes_inside_the_network() -> None:
    need_root()
    with netns(f"na{RUN_ID}-bgpkr") as ns:
        sh("ip", "link", "add", "d0", "type", "bridge", ns=ns)
        sh("ip", "addr", "add", "10.9.0.1/24", "dev", "d0", ns=ns)
        sh("ip", "link", "set", "d0", "up", ns=ns)
        add = [
            ("10.45.1.0/24", "via", "10.9.0.2", "proto", "bird", "metric", "32"),  # ours
            ("blackhole", "10.45.2.0/24", "proto", "bird", "metric", "32"),  # ours (own subnet)
            ("10.45.1.0/24", "via", "10.9.0.3", "proto", "111"),  # netagent's, same dst
            ("10.45.0.0/16", "via", "10.9.0.2", "proto", "bird"),  # the Network itself
            ("10.46.0.0/24", "via", "10.9.0.2", "proto", "bird"),  # outside
            ("10.45.3.0/24", "via", "10.9.0.2", "proto", "static"),  # someone else's
        ]
        for args in add:
            sh("ip", "route", "add", *args, ns=ns)
        seen = _run(ns, "look")
        assert sorted(map(tuple, seen["before"])) == [  # type: ignore[call-overload]
            ("10.45.1.0/24", 32, "unicast"), ("10.45.2.0/24", 32, "blackhole")]
        assert _run(ns, "remove")["gone"] == 2
        left = sh("ip", "-4", "route", "show", ns=ns).stdout
        assert "10.45.1.0/24 via 10.9.0.3 dev d0 proto 111" in left, left
        assert "10.45.0.0/16 via 10.9.0.2 dev d0 proto bird" in left
        assert "10.46.0.0/24 via 10.9.0.2 dev d0 proto bird" in left
        assert "10.45.3.0/24 via 10.9.0.2 dev d0 proto static" in left
        assert "10.45.2.0/24" not in left and "metric 32" not in left
        assert _run(ns, "remove")["gone"] == 0
