"""The bgp backend's pure parts: options (errors name the field), bird.conf rendering, and the
parser of BIRD 2's `show protocols [all]` (fixtures captured from BIRD 2.0.12)."""

from __future__ import annotations

import json
import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from netagent.backends.bgp.backend import health_from_protocols
from netagent.backends.bgp.birdc import parse_show_protocols, reply_lines
from netagent.backends.bgp.render import lease_backend_data, render_bird_conf
from netagent.config import BgpOptions, ConfigError, parse_network_config
from netagent.lease import Lease, LeaseAttrs, PeerId

DATA = Path(__file__).parent / "data"
NET = IPv4Network("10.1.0.0/16")
OWN = IPv4Network("10.1.3.0/24")
ME = IPv4Address("10.0.0.11")


def cfg(**backend: Any) -> BgpOptions:
    doc = {"Network": str(NET), "Backend": {"Type": "bgp", **backend}}
    opts = parse_network_config(json.dumps(doc)).backend.options
    assert isinstance(opts, BgpOptions)
    return opts


def lease(subnet: str, ip: str, btype: str = "bgp", data: str = '{"ASNumber":64512}') -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(ip), backend_type=btype,
                                                 backend_data=data))


def peers(*items: Lease) -> dict[PeerId, Lease]:
    return {x.subnet: x for x in items if x.subnet is not None}


def render(opts: BgpOptions, p: dict[PeerId, Lease]) -> Any:
    return render_bird_conf(opts, network=NET, own_subnet=OWN, router_id=ME, source=ME,
                            iface="eth0", peers=p)


# --------------------------------------------------------------------------- options


def test_defaults_are_calicos() -> None:
    opts = cfg()
    assert (opts.as_number, opts.node_mesh, opts.peers, opts.hold_time,
            opts.graceful_restart_time) == (64512, True, (), 90, 120)


def test_peer_keys_case_insensitive_and_multihop_forms() -> None:
    opts = cfg(asnumber=65010, peers=[{"ip": "10.0.0.254", "asnumber": 65000, "Multihop": True},
                                      {"IP": "10.9.0.1", "ASNumber": 65001, "Multihop": 3,
                                       "Port": 1790, "Password": "s3cret", "Passive": True}])
    assert opts.as_number == 65010
    assert [(p.multihop, p.port, p.password, p.passive) for p in opts.peers] == [
        (64, 179, "", False), (3, 1790, "s3cret", True)]


@pytest.mark.parametrize(("backend", "field"), [
    ({"Peers": [{"IP": "10.0.0.1", "ASNumber": 1}, {"IP": "10.0.0.300", "ASNumber": 2}]},
     "Backend.Peers[1].IP"),
    ({"Peers": [{"ASNumber": 65000}]}, "Backend.Peers[0].IP"),
    ({"Peers": [{"IP": "10.0.0.1"}]}, "Backend.Peers[0].ASNumber"),
    ({"Peers": [{"IP": "10.0.0.1", "ASNumber": "65000"}]}, "Backend.Peers[0].ASNumber"),
    ({"Peers": [{"IP": "10.0.0.1", "ASNumber": 0}]}, "Backend.Peers[0].ASNumber"),
    ({"Peers": [{"IP": "10.0.0.1", "ASNumber": 1, "Pasword": "x"}]}, "Backend.Peers[0].Pasword"),
    ({"Peers": [{"IP": "10.0.0.1", "ASNumber": 1, "Port": 70000}]}, "Backend.Peers[0].Port"),
    ({"Peers": [{"IP": "10.0.0.1", "ASNumber": 1, "Password": 'a"b'}]},
     "Backend.Peers[0].Password"),
    ({"Peers": [{"IP": "10.0.0.1", "ASNumber": 1}, {"IP": "10.0.0.1", "ASNumber": 2}]},
     "Backend.Peers[1].IP"),
    ({"Peers": ["10.0.0.1"]}, "Backend.Peers[0]"),
    ({"Peers": {"IP": "10.0.0.1"}}, "Backend.Peers"),
    ({"ASNumber": 23456}, "Backend.ASNumber"),
    ({"ASNumber": True}, "Backend.ASNumber"),
    ({"HoldTime": 2}, "Backend.HoldTime"),
    ({"NodeMesh": "yes"}, "Backend.NodeMesh"),
    ({"NodeMesh": False}, "Backend.NodeMesh"),
    ({"BIRDSocket": "bird.ctl"}, "Backend.BIRDSocket"),
])
def test_malformed_options_name_the_field(backend: dict[str, Any], field: str) -> None:
    doc = {"Network": str(NET), "Backend": {"Type": "bgp", **backend}}
    with pytest.raises(ConfigError) as err:
        parse_network_config(json.dumps(doc))
    assert err.value.field == field, str(err.value)


def test_lease_backend_data_is_compact_json() -> None:
    assert lease_backend_data(cfg(ASNumber=65001)) == '{"ASNumber":65001}'


# --------------------------------------------------------------------------- render


def test_mesh_from_bgp_leases_only_with_passive_above_us() -> None:
    p = peers(lease("10.1.1.0/24", "10.0.0.10"), lease("10.1.2.0/24", "10.0.0.12"),
              lease("10.1.4.0/24", "10.0.0.13", btype="vxlan", data=""))
    conf = render(cfg(), p)
    names = {n.name: n for n in conf.neighbors}
    assert set(names) == {"Mesh_10_0_0_10", "Mesh_10_0_0_12"}
    assert not names["Mesh_10_0_0_10"].passive and names["Mesh_10_0_0_12"].passive
    assert "not bgp" in conf.skipped[IPv4Network("10.1.4.0/24")]
    assert "neighbor 10.0.0.12 as 64512;\n  passive on;" in conf.text
    assert "route 10.1.3.0/24 blackhole;" in conf.text
    # imports and kernel export: strictly inside the Network, never our own subnet
    assert "net ~ [ 10.1.0.0/16{17,32} ] && net != NETAGENT_OWN" in conf.text
    assert "define NETAGENT_OWN = 10.1.3.0/24;" in conf.text


def test_render_is_independent_of_lease_order() -> None:
    a, b = lease("10.1.1.0/24", "10.0.0.10"), lease("10.1.2.0/24", "10.0.0.12")
    assert render(cfg(), peers(a, b)).text == render(cfg(), peers(b, a)).text


def test_bad_mesh_leases_are_skipped_with_a_reason() -> None:
    p = peers(lease("10.1.1.0/24", str(ME)), lease("10.1.2.0/24", "10.0.0.12", data='[1]'),
              lease("10.1.5.0/24", "10.0.0.15", data='{"ASNumber":"x"}'))
    conf = render(cfg(), p)
    assert conf.neighbors == ()
    assert "our own PublicIP" in conf.skipped[IPv4Network("10.1.1.0/24")]
    assert "not a JSON object" in conf.skipped[IPv4Network("10.1.2.0/24")]
    assert "not an AS number" in conf.skipped[IPv4Network("10.1.5.0/24")]


def test_global_peers_and_no_mesh() -> None:
    opts = cfg(NodeMesh=False, Password="meshpw",
               Peers=[{"IP": "10.0.0.254", "ASNumber": 65000, "Multihop": 2,
                       "Password": "torpw"}])
    conf = render(opts, peers(lease("10.1.1.0/24", "10.0.0.10")))
    assert [n.name for n in conf.neighbors] == ["Global_10_0_0_254"]
    assert "neighbor 10.0.0.254 as 65000;\n  multihop 2;\n  password \"torpw\";" in conf.text
    assert "meshpw" not in conf.text


def test_a_mesh_host_that_is_also_a_global_peer_peers_once() -> None:
    opts = cfg(Peers=[{"IP": "10.0.0.10", "ASNumber": 64512}])
    conf = render(opts, peers(lease("10.1.1.0/24", "10.0.0.10")))
    assert [n.name for n in conf.neighbors] == ["Global_10_0_0_10"]


@pytest.mark.skipif(shutil.which("bird") is None, reason="needs BIRD 2 (bird -p)")
def test_rendered_file_passes_bird_p(tmp_path: Path) -> None:
    """BIRD itself accepts what we render, mesh + global peers + passwords (bird -p parses
    only: no root, no socket)."""
    opts = cfg(HoldTime=3, Password="pw", Peers=[
        {"IP": "10.0.0.254", "ASNumber": 65000, "Multihop": 2, "Port": 1790, "Passive": True}])
    conf = render(opts, peers(lease("10.1.1.0/24", "10.0.0.10"),
                              lease("10.1.2.0/24", "10.0.0.12")))
    path = tmp_path / "bird.conf"
    path.write_text(conf.text)
    proc = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True,
                          timeout=10)
    assert proc.returncode == 0, proc.stderr + conf.text


# --------------------------------------------------------------------------- birdc parser


def test_parse_show_protocols_all_from_bird_2_0_12() -> None:
    rows = parse_show_protocols((DATA / "bird2_show_protocols_all.txt").read_text())
    assert [r.name for r in rows] == ["device1", "netagent_direct", "netagent_kernel",
                                      "netagent_own", "Mesh_10_77_0_2"]
    mesh = rows[-1]
    assert (mesh.proto, mesh.state, mesh.bgp_state, mesh.neighbor, mesh.neighbor_as,
            mesh.routes_imported, mesh.routes_exported, mesh.established) == (
        "BGP", "up", "Established", "10.77.0.2", 64512, 1, 1, True)
    assert rows[2].routes_exported == 1 and not rows[2].established


def test_parse_show_protocols_short_form() -> None:
    rows = parse_show_protocols((DATA / "bird2_show_protocols.txt").read_text())
    assert [(r.name, r.info) for r in rows][-1] == ("Mesh_10_77_0_2", "Established")
    assert rows[-1].established and rows[-1].neighbor == ""


def test_reply_codes_tell_errors() -> None:
    text = ("0001 BIRD 2.0.12 ready.\n0002-Reading configuration from /x\n"
            "8002 /x:1:11 syntax error, unexpected CF_SYM_UNDEFINED\n")
    assert reply_lines(text) == [(2, "Reading configuration from /x"),
                                 (8002, "/x:1:11 syntax error, unexpected CF_SYM_UNDEFINED")]


def test_health_sessions_and_gauges() -> None:
    rows = parse_show_protocols((DATA / "bird2_show_protocols_all.txt").read_text())
    h = health_from_protocols(rows, socket="/run/x.ctl")
    assert h.ok and h.info["bgp_sessions_up"] == "1/1" and h.info["bird_socket"] == "/run/x.ctl"
    (session,) = h.info["sessions"]  # type: ignore[misc]
    assert session["peer"] == "10.77.0.2" and session["routes_received"] == 1
    up = {g.name: g.value for g in h.gauges}
    assert up == {"bgp_session_up": 1.0, "bgp_routes_received": 1.0}
    bad = health_from_protocols(rows, problem="new bird.conf rejected")
    assert not bad.ok and bad.detail == "new bird.conf rejected" and bad.info["sessions"]


def test_ipv6_with_bgp_is_refused_before_anything_runs() -> None:
    """The backend is IPv4 only: the daemon's runnability check refuses it (at start: the
    agent waits and says why; live: the running config stays) instead of failing later."""
    from netagent.backends import check_runnable

    doc = {"Network": str(NET), "EnableIPv6": True, "IPv6Network": "fd10::/48",
           "Backend": {"Type": "bgp"}}
    assert "IPv4 only" in check_runnable(parse_network_config(json.dumps(doc)))
    assert check_runnable(parse_network_config(json.dumps(
        {"Network": str(NET), "Backend": {"Type": "bgp"}}))) == ""


@pytest.mark.skipif(shutil.which("bird") is None, reason="needs BIRD 2 (bird -p)")
def test_idle_file_for_an_external_bird_passes_bird_p(tmp_path: Path) -> None:
    from netagent.backends.bgp.render import render_idle_conf

    path = tmp_path / "idle.conf"
    path.write_text(render_idle_conf(ME))
    proc = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True,
                          timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert "protocol bgp" not in path.read_text() and "protocol kernel" not in path.read_text()


def test_control_socket_path_fits_a_unix_socket() -> None:
    """A long state dir (sun_path holds 107 bytes) moves the socket under /run/netagent, to a
    name derived from the state dir: the same after a restart, different per state dir."""
    from netagent.backends.bgp.supervisor import default_socket

    short = default_socket(Path("/var/lib/netagent"))
    assert short == "/var/lib/netagent/bird.ctl"
    deep = Path("/tmp/" + "d" * 120)
    a, b = default_socket(deep), default_socket(deep / "x")
    assert a.startswith("/run/netagent/bird-") and len(a.encode()) <= 107
    assert a == default_socket(deep) and a != b


# --------------------------------------------------------------------------- backend glue


@pytest.mark.skipif(shutil.which("bird") is None or shutil.which("birdc") is None,
                    reason="needs BIRD 2 (bird -p, birdc)")
def test_silent_external_bird_is_reported_and_the_checked_file_kept(tmp_path: Path) -> None:
    """No root and no BIRD running: with BIRDSocket naming a socket nobody serves, sync writes
    the checked file, reports the failure (failed=1, health not ok naming the socket) and
    never starts a BIRD; the poller thread (reads only) says the same and stops on shutdown."""
    from netagent.backends.base import HostFacts
    from netagent.backends.bgp.backend import BgpBackend

    sock = str(tmp_path / "nobody.ctl")
    doc = {"Network": str(NET), "Backend": {"Type": "bgp", "BIRDSocket": sock}}
    config = parse_network_config(json.dumps(doc))
    host = HostFacts(iface="eth0", iface_index=2, iface_mtu=1500, iface_addr=ME, public_ip=ME,
                     state_dir=tmp_path / "state")
    backend = BgpBackend(config, host)
    contribution = backend.prepare()
    assert (contribution.backend_type, contribution.backend_data, contribution.mtu) == (
        "bgp", '{"ASNumber":64512}', 1500)
    backend.activate(Lease(OWN, LeaseAttrs(ME, backend_type="bgp")))
    try:
        report = backend.sync(peers(lease("10.1.1.0/24", "10.0.0.10")), None)
        assert report.failed == 1 and report.entries == {"bgp_peer": 1}
        health = backend.health()
        assert not health.ok and f"no BIRD answers on {sock}" in health.detail
        conf = (tmp_path / "state" / "bird.conf").read_text()
        assert "Mesh_10_0_0_10" in conf  # bird -p accepted it; it waits for that BIRD
        assert not Path(sock).exists()
    finally:
        backend.shutdown()
    assert backend._poller is None
    # a failed live switch prepares the old instance again: it polls again
    backend.prepare()
    try:
        assert backend._poller is not None and backend._poller.is_alive()
    finally:
        backend.shutdown()
