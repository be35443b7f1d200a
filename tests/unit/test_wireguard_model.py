"""The wireguard backend's pure parts: options, keys and the key file, render, merge, diff and
the two text forms (UAPI, wg). The device itself is exercised in tests/e2e/test_wireguard.py."""

from __future__ import annotations

import base64
import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from pathlib import Path

import pytest

from netagent.backends.base import HostFacts
from netagent.backends.wireguard.backend import DeviceSpec, WireguardBackend
from netagent.backends.wireguard.keys import KeyFileError, load_private_key
from netagent.backends.wireguard.model import (
    WgChange,
    WgPeer,
    WgState,
    diff_device,
    generate_private_key,
    lease_data,
    merge_by_key,
    parse_key,
    parse_uapi_get,
    parse_wg_dump,
    public_key,
    render_wg_peers,
    uapi_set_text,
    wg_set_argv,
)
from netagent.config import ConfigError, WireguardOptions, parse_network_config
from netagent.lease import Lease, LeaseAttrs

K1 = base64.b64encode(bytes(range(32))).decode()
K2 = base64.b64encode(bytes(range(1, 33))).decode()
K3 = base64.b64encode(bytes(range(2, 34))).decode()
PSK = base64.b64encode(b"p" * 32).decode()


def cfg(backend: dict[str, object], **extra: object) -> str:
    return json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": "wireguard", **backend},
                       **extra})


# --------------------------------------------------------------------------- options


def test_options_defaults_are_flannels() -> None:
    assert parse_network_config(cfg({})).backend.options == WireguardOptions(
        listen_port=51820, listen_port_v6=51821, mtu=0, psk="", persistent_keepalive=0,
        mode="separate")


def test_options_read_case_insensitively_and_psk_is_canonical() -> None:
    o = parse_network_config(cfg({"listenport": 4000, "LISTENPORTV6": 4001, "psk": PSK + "\n",
                                  "PersistentKeepaliveInterval": 25, "mode": "Separate",
                                  "MTU": 1400})).backend.options
    assert (o.listen_port, o.listen_port_v6, o.psk, o.persistent_keepalive, o.mode, o.mtu) == (
        4000, 4001, PSK, 25, "separate", 1400)


@pytest.mark.parametrize(("backend", "field", "words"), [
    ({"PSK": "bm90LWEta2V5"}, "Backend.PSK", "32 bytes"),
    ({"PSK": "not base64!"}, "Backend.PSK", "base64"),
    ({"PSK": 12}, "Backend.PSK", "string"),
    ({"ListenPort": 0}, "Backend.ListenPort", "between 1 and 65535"),
    ({"ListenPortV6": 70000}, "Backend.ListenPortV6", "between 1 and 65535"),
    ({"ListenPort": "51820"}, "Backend.ListenPort", "whole number"),
    ({"PersistentKeepaliveInterval": -1}, "Backend.PersistentKeepaliveInterval", "between"),
    ({"Mode": "both"}, "Backend.Mode", "separate, auto, ipv4, ipv6"),
    ({"Mode": 4}, "Backend.Mode", "unknown mode"),
])
def test_bad_options_are_refused_naming_the_field(backend: dict[str, object], field: str,
                                                  words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_network_config(cfg(backend))
    assert err.value.field == field and words in str(err.value)


# --------------------------------------------------------------------------- keys


def test_public_key_matches_rfc7748_vector() -> None:
    """RFC 7748 §6.1 (Alice): the X25519 public key of a fixed private key."""
    priv = base64.b64encode(bytes.fromhex(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")).decode()
    assert base64.b64decode(public_key(priv)).hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def test_generated_keys_are_clamped() -> None:
    raw = base64.b64decode(generate_private_key(bytes([255] * 32)))
    assert raw[0] & 7 == 0 and raw[31] & 128 == 0 and raw[31] & 64


@pytest.mark.parametrize("bad", ["", "abc", "A" * 44, base64.b64encode(b"x" * 31).decode(), 5])
def test_parse_key_refuses_non_keys(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_key(bad)


def test_key_file_created_in_state_dir_0400_and_stable(tmp_path: Path) -> None:
    a = load_private_key(tmp_path, env={}, flannel_file=tmp_path / "absent")
    assert a.how == "created" and a.path == tmp_path / "wgkey"
    assert oct(a.path.stat().st_mode & 0o777) == "0o400"
    b = load_private_key(tmp_path, env={}, flannel_file=tmp_path / "absent")
    assert (b.private_key, b.how) == (a.private_key, "read")


def test_flannel_key_is_taken_over(tmp_path: Path) -> None:
    flannel = tmp_path / "run-flannel-wgkey"
    flannel.write_text(K1 + "\n")
    state = tmp_path / "state"
    got = load_private_key(state, env={}, flannel_file=flannel)
    assert got.private_key == K1 and "taken over" in got.how
    assert (state / "wgkey").read_text().strip() == K1
    flannel.unlink()  # a reboot: /run is gone, the state dir keeps the key
    assert load_private_key(state, env={}, flannel_file=flannel).private_key == K1


def test_wireguard_key_file_env_is_honoured(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "key"
    got = load_private_key(tmp_path / "state", env={"WIREGUARD_KEY_FILE": str(path)},
                           flannel_file=tmp_path / "absent")
    assert got.path == path and got.how == "created" and not (tmp_path / "state").exists()


def test_malformed_key_file_is_an_error_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "wgkey").write_text("garbage\n")
    with pytest.raises(KeyFileError, match="does not hold a key"):
        load_private_key(tmp_path, env={}, flannel_file=tmp_path / "absent")
    assert (tmp_path / "wgkey").read_text() == "garbage\n"


# --------------------------------------------------------------------------- render


def lease(subnet: str, ip: str, data: dict[str, object] | str | None = None,
          btype: str = "wireguard", v6: tuple[str, str, dict[str, object]] | None = None,
          rev: int = 0) -> Lease:
    bd = data if isinstance(data, str) else json.dumps(data, separators=(",", ":")) if data \
        else ""
    attrs = LeaseAttrs(IPv4Address(ip), IPv6Address(v6[1]) if v6 else None, btype, bd,
                       json.dumps(v6[2]) if v6 else "")
    return Lease(IPv4Network(subnet), attrs, IPv6Network(v6[0]) if v6 else None, 1,
                 mod_revision=rev)


def test_render_endpoint_allowed_ips_and_default_port() -> None:
    leases = {
        IPv4Network("10.5.1.0/24"): lease("10.5.1.0/24", "192.0.2.1",
                                          {"PublicKey": K1, "Port": 4000}),
        IPv4Network("10.5.2.0/24"): lease("10.5.2.0/24", "192.0.2.2", {"PublicKey": K2}),
        IPv4Network("10.5.3.0/24"): lease("10.5.3.0/24", "192.0.2.3",
                                          {"PublicKey": K3, "Port": 0}),
    }
    r = render_wg_peers(leases, family=4, own_public_key="", default_port=51820, psk=PSK,
                        keepalive=25)
    assert not r.skipped
    got = {str(i): (p.endpoint, sorted(map(str, p.allowed_ips)), p.preshared_key, p.keepalive)
           for i, p in r.peers.items()}
    assert got == {
        "10.5.1.0/24": ("192.0.2.1:4000", ["10.5.1.0/24"], PSK, 25),
        "10.5.2.0/24": ("192.0.2.2:51820", ["10.5.2.0/24"], PSK, 25),
        "10.5.3.0/24": ("192.0.2.3:51820", ["10.5.3.0/24"], PSK, 25),
    }


def test_render_ipv6_side() -> None:
    lz = lease("10.5.1.0/24", "192.0.2.1", {"PublicKey": K1, "Port": 51820},
               v6=("fd00:5:1::/64", "2001:db8::1", {"PublicKey": K1, "Port": 51821}))
    r = render_wg_peers({lz.ident: lz}, family=6, own_public_key="", default_port=51821)
    (p,) = r.peers.values()
    assert p.endpoint == "[2001:db8::1]:51821" and p.allowed_ips == {ip_network("fd00:5:1::/64")}


@pytest.mark.parametrize(("lz", "why"), [
    (lease("10.5.1.0/24", "192.0.2.1", {"PublicKey": "not!a!key"}), "PublicKey is malformed"),
    (lease("10.5.1.0/24", "192.0.2.1", {"Port": 1}), "PublicKey is malformed"),
    (lease("10.5.1.0/24", "192.0.2.1", "{not json"), "not valid JSON"),
    (lease("10.5.1.0/24", "192.0.2.1", {"PublicKey": K1}, btype="vxlan"), "not wireguard"),
    (lease("10.5.1.0/24", "192.0.2.1", {"PublicKey": K1, "Port": "x"}), "not a port"),
    (lease("10.5.1.0/24", "192.0.2.9", {"PublicKey": K2}), "our own PublicKey"),
    (lease("10.5.1.0/24", "192.0.2.200", {"PublicKey": K1}), "our own public address"),
])
def test_render_skips_unusable_leases_with_the_reason(lz: Lease, why: str) -> None:
    r = render_wg_peers({lz.ident: lz}, family=4, own_public_key=K2, default_port=51820,
                        own_ip=IPv4Address("192.0.2.200"))
    assert not r.peers and why in r.skipped[lz.ident]


def test_merge_by_key_joins_a_hosts_old_and_new_lease() -> None:
    old = WgPeer(K1, "192.0.2.1:51820", frozenset({ip_network("10.5.1.0/24")}))
    new = WgPeer(K1, "192.0.2.7:51820", frozenset({ip_network("10.5.9.0/24")}))
    other = WgPeer(K2, "192.0.2.2:51820", frozenset({ip_network("10.5.2.0/24")}))
    ids = [ip_network("10.5.1.0/24"), ip_network("10.5.9.0/24"), ip_network("10.5.2.0/24")]
    got = merge_by_key(dict(zip(ids, (old, new, other), strict=True)),
                       {ids[0]: 5, ids[1]: 9, ids[2]: 1})
    assert got[K1].endpoint == "192.0.2.7:51820"
    assert got[K1].allowed_ips == {ids[0], ids[1]} and got[K2] == other


# --------------------------------------------------------------------------- diff + text


def peer(key: str, n: int, port: int = 51820, psk: str = "") -> WgPeer:
    return WgPeer(key, f"192.0.2.{n}:{port}", frozenset({ip_network(f"10.5.{n}.0/24")}), psk)


def test_diff_of_equal_state_is_empty_and_writes_nothing() -> None:
    peers = {K1: peer(K1, 1), K2: peer(K2, 2)}
    change = diff_device(WgState(K3, 51820, peers), K3, 51820, dict(peers))
    assert change.empty and change == WgChange()


def test_diff_adds_removes_and_updates_only_what_differs() -> None:
    have = WgState(K3, 40000, {K1: peer(K1, 1), K2: peer(K2, 2)})
    want = {K1: peer(K1, 1, port=4000), K3: peer(K3, 3)}
    c = diff_device(have, K3, 51820, want)
    assert (c.private_key, c.listen_port, c.remove) == (None, 51820, (K2,))
    assert c.add == (peer(K3, 3),)
    assert c.update == ((peer(K1, 1, port=4000), frozenset({"endpoint"})),)
    hexk = base64.b64decode
    assert uapi_set_text(c) == "\n".join([
        "set=1", "listen_port=51820",
        f"public_key={hexk(K2).hex()}", "remove=true",
        f"public_key={hexk(K3).hex()}", f"preshared_key={bytes(32).hex()}",
        "endpoint=192.0.2.3:51820", "persistent_keepalive_interval=0",
        "replace_allowed_ips=true", "allowed_ip=10.5.3.0/24",
        f"public_key={hexk(K1).hex()}", "update_only=true", "endpoint=192.0.2.1:4000",
    ]) + "\n\n"


def test_uapi_get_round_trip_through_diff() -> None:
    """What a device reports after our write compares equal to what we wanted."""
    text = "\n".join([
        f"private_key={base64.b64decode(K3).hex()}", "listen_port=51820",
        f"public_key={base64.b64decode(K1).hex()}", f"preshared_key={bytes(32).hex()}",
        "protocol_version=1", "endpoint=192.0.2.1:51820", "last_handshake_time_sec=5",
        "tx_bytes=100", "rx_bytes=200", "persistent_keepalive_interval=0",
        "allowed_ip=10.5.1.0/24",
        f"public_key={base64.b64decode(K2).hex()}", f"preshared_key={base64.b64decode(PSK).hex()}",
        "endpoint=192.0.2.2:51820", "persistent_keepalive_interval=25",
        "allowed_ip=10.5.2.0/24", "errno=0", "", ""])
    st = parse_uapi_get(text)
    assert st.private_key == K3 and st.listen_port == 51820
    assert st.peers[K1] == peer(K1, 1)
    assert st.peers[K2] == WgPeer(K2, "192.0.2.2:51820", frozenset({ip_network("10.5.2.0/24")}),
                                  PSK, 25)
    assert diff_device(st, K3, 51820, {K1: peer(K1, 1), K2: st.peers[K2]}).empty


def test_uapi_errno_is_an_error() -> None:
    with pytest.raises(ValueError, match="errno=1"):
        parse_uapi_get("errno=1\n\n")


def test_wg_dump_and_argv_for_the_kernel_path() -> None:
    dump = "\n".join([f"{K3}\t{public_key(K3)}\t51820\toff",
                      f"{K1}\t(none)\t192.0.2.1:51820\t10.5.1.0/24\t0\t0\t0\toff",
                      f"{K2}\t{PSK}\t(none)\t(none)\t0\t0\t0\t25"])
    st = parse_wg_dump(dump)
    assert st.private_key == K3 and st.peers[K1] == peer(K1, 1)
    assert st.peers[K2] == WgPeer(K2, "", frozenset(), PSK, 25)
    c = diff_device(st, K3, 51820, {K1: peer(K1, 1, psk=PSK)})
    assert wg_set_argv("flannel-wg", c, private_key_file="/k", psk_file="/p") == [
        "wg", "set", "flannel-wg", "peer", K2, "remove",
        "peer", K1, "preshared-key", "/p"]


def test_lease_data_is_flannels_bytes() -> None:
    assert lease_data(K1, 51820) == f'{{"PublicKey":"{K1}","Port":51820}}'


# --------------------------------------------------------------------------- backend render


class _Link:
    def __init__(self) -> None:
        self.spec = DeviceSpec("flannel-wg", 4, 51820, 1420, IPv4Network("10.5.0.0/16"))


def test_malformed_key_keeps_the_peers_last_good_entry_until_its_lease_goes(
        tmp_path: Path) -> None:
    host = HostFacts("eth0", 2, 1500, IPv4Address("192.0.2.9"), IPv4Address("192.0.2.9"),
                     tmp_path)
    be = WireguardBackend(parse_network_config(cfg({})), host)
    be.public_key = K3
    link = _Link()
    good = lease("10.5.1.0/24", "192.0.2.1", {"PublicKey": K1})
    ident = good.ident
    first = be._desired(link, {ident: good})  # type: ignore[arg-type]
    assert list(first) == [K1]
    bad = lease("10.5.1.0/24", "192.0.2.1", {"PublicKey": "???"})
    kept = be._desired(link, {ident: bad})  # type: ignore[arg-type]
    assert kept == first
    assert "keeps serving" in be._skipped[(4, ident)]
    assert be._desired(link, {}) == {}  # type: ignore[arg-type]
    assert be._desired(link, {ident: bad}) == {}  # type: ignore[arg-type]  no stale memory


def test_health_reports_a_dead_wireguard_go(tmp_path: Path) -> None:
    """``ok`` False, with the exit status, once the process is gone (the next sync restarts
    it); the implementation is named in info and as a labelled gauge."""
    import subprocess

    from netagent.backends.wireguard.backend import USERSPACE, WgLink
    from netagent.backends.wireguard.keys import KeySource

    host = HostFacts("eth0", 2, 1500, IPv4Address("192.0.2.9"), IPv4Address("192.0.2.9"),
                     tmp_path)
    be = WireguardBackend(parse_network_config(cfg({})), host)
    link = WgLink(_Link().spec, None, tmp_path, KeySource(K3, tmp_path / "k", "read"),  # type: ignore[arg-type]
                  "", tmp_path)
    link.implementation = USERSPACE
    link.proc.child = subprocess.Popen(["sleep", "30"])
    be.links = [link]
    try:
        h = be.health()
        assert h.ok and h.info["implementation"] == "wireguard-go"
        assert ("implementation", "wireguard-go") in [g.labels[0] for g in h.gauges]
    finally:
        link.proc.child.kill()
        link.proc.child.wait()
    h = be.health()
    assert not h.ok and "exited with status -9" in h.detail
    assert [g.value for g in h.gauges if g.name == "wireguard_up"] == [0.0]


@pytest.mark.parametrize(("extra", "mode"), [
    ({"EnableIPv6": True, "IPv6Network": "fd00:5::/48"}, "ipv4"),
    ({"EnableIPv6": True, "IPv6Network": "fd00:5::/48"}, "auto"),
    ({}, "ipv6"),
])
def test_single_device_modes_are_refused_naming_the_field_before_anything_changes(
        tmp_path: Path, extra: dict[str, object], mode: str) -> None:
    """The runnability check (start: wait and report; live: keep the running config) refuses
    them before any backend object exists, so nothing is written."""
    from netagent.backends import check_runnable

    why = check_runnable(parse_network_config(cfg({"Mode": mode}, **extra)))
    assert why.startswith("Backend.Mode:") and "separate" in why


def test_ipv4_and_auto_modes_on_an_ipv4_network_are_separate() -> None:
    from netagent.backends import check_runnable

    for mode in ("auto", "ipv4"):
        c = parse_network_config(cfg({"Mode": mode}))
        be = WireguardBackend(c, HostFacts("eth0", 2, 1500, IPv4Address("192.0.2.9"),
                                           IPv4Address("192.0.2.9"), Path("/nonexistent")))
        assert check_runnable(c) == ""
        assert [s.name for s in be._specs()] == ["flannel-wg"]


class _FakeDevice:
    """A device client that refuses any write touching ``bad_key`` (all of that write)."""

    def __init__(self, bad_key: str) -> None:
        self.state = WgState(K3, 51820, {})
        self.bad = bad_key
        self.sets = 0

    def get(self) -> WgState:
        return self.state

    def set(self, change: WgChange) -> None:
        from netagent.backends.wireguard.model import UapiError

        self.sets += 1
        if any(p.public_key == self.bad for p in change.add):
            raise UapiError("errno=22")
        peers = {k: v for k, v in self.state.peers.items() if k not in change.remove}
        peers.update({p.public_key: p for p in change.add})
        self.state = WgState(change.private_key or self.state.private_key,
                             change.listen_port or self.state.listen_port, peers)


def test_a_peer_the_device_refuses_does_not_hold_back_the_others(tmp_path: Path) -> None:
    from netagent.backends.wireguard.backend import WgLink
    from netagent.backends.wireguard.keys import KeySource
    from netagent.backends.wireguard.model import UapiError

    link = WgLink(_Link().spec, None, tmp_path, KeySource(K3, tmp_path / "k", "read"),  # type: ignore[arg-type]
                  "", tmp_path)
    dev = _FakeDevice(bad_key=K2)
    link.client = dev
    want = {K1: peer(K1, 1), K2: peer(K2, 2)}
    with pytest.raises(UapiError, match="1 peer"):
        link.write_peers(want)
    assert list(dev.state.peers) == [K1] and link.peers == 1
    assert dev.sets == 1 + 2  # all at once, then each peer (the device part had no change)


def test_wireguard_go_adopted_by_its_socket_alone_is_watched_through_it(tmp_path: Path) -> None:
    """No PID recorded (state dir wiped), but the socket answers: adopted, alive while the
    socket answers, dead with a reason once it stops."""
    import socket

    from netagent.backends.wireguard.wggo import WireguardGo

    proc = WireguardGo("flannel-wg", tmp_path / "state", sock_dir=tmp_path)
    assert not proc.adopt()  # nothing there
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp_path / "flannel-wg.sock"))
    srv.listen(4)
    try:
        assert proc.adopt() and proc.pid == 0 and proc.alive()
    finally:
        srv.close()
    assert not proc.alive() and "no longer answers" in proc.death


class _LinkKernel:
    """Just enough of the Kernel protocol for WgLink.ensure: one link by name, MTU writes."""

    def __init__(self, kind: str | None) -> None:
        from netagent.kernel import LinkInfo

        self.info = None if kind is None else LinkInfo(7, "flannel-wg", kind, "", 1420, True)
        self.mtu_writes: list[int] = []
        self.deleted: list[int] = []

    def link(self, name: str) -> object:
        return self.info

    def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None,
                 mac: str | None = None) -> None:
        if mtu is not None:
            self.mtu_writes.append(mtu)

    def delete_link(self, index: int) -> None:
        self.deleted.append(index)
        self.info = None


def _link_for(kernel: _LinkKernel, tmp_path: Path) -> object:
    from netagent.backends.wireguard.backend import WgLink
    from netagent.backends.wireguard.keys import KeySource

    spec = DeviceSpec("flannel-wg", 4, 51820, 1420, IPv4Network("10.5.0.0/16"))
    return WgLink(spec, kernel, tmp_path, KeySource(K3, tmp_path / "wgkey", "read"),  # type: ignore[arg-type]
                  "", tmp_path)


def test_a_kernel_device_is_adopted_as_is_with_the_wg_client(tmp_path: Path) -> None:
    """A host taken over from flannel: its kernel ``flannel-wg`` is kept (no delete, no
    re-create, MTU already right) and driven through ``wg`` (generic netlink)."""
    from netagent.backends.wireguard.client import WgToolClient

    k = _LinkKernel("wireguard")
    link = _link_for(k, tmp_path)
    assert link.ensure() is True  # type: ignore[attr-defined]
    assert link.implementation == "kernel" and isinstance(link.client, WgToolClient)  # type: ignore[attr-defined]
    assert link.alive() and not k.deleted and not k.mtu_writes  # type: ignore[attr-defined]
    assert link.ensure() is False  # type: ignore[attr-defined]  same index: nothing re-created


def test_the_kernel_module_is_preferred_when_it_creates_the_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from netagent.backends.wireguard import kernelio

    k = _LinkKernel(None)
    made: list[str] = []

    def create(name: str) -> str:
        made.append(name)
        k.info = _LinkKernel("wireguard").info
        return ""

    monkeypatch.setattr(kernelio, "create_kernel_wireguard", create)
    monkeypatch.delenv("NETAGENT_WIREGUARD_IMPLEMENTATION", raising=False)
    link = _link_for(k, tmp_path)
    assert link.ensure() is True and made == ["flannel-wg"]  # type: ignore[attr-defined]
    assert link.implementation == "kernel"  # type: ignore[attr-defined]


def test_forcing_the_kernel_module_without_it_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from netagent.backends.wireguard import kernelio
    from netagent.backends.wireguard.backend import WireguardError

    monkeypatch.setattr(kernelio, "create_kernel_wireguard",
                        lambda name: "Error: Unknown device type.")
    monkeypatch.setenv("NETAGENT_WIREGUARD_IMPLEMENTATION", "kernel")
    with pytest.raises(WireguardError, match="Unknown device type.*=kernel"):
        _link_for(_LinkKernel(None), tmp_path).ensure()  # type: ignore[attr-defined]


def test_a_foreign_link_of_our_name_is_replaced(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """flannel does the same: a ``flannel-wg`` that is not a WireGuard device is deleted."""
    from netagent.backends.wireguard import kernelio

    k = _LinkKernel("vxlan")

    def create(name: str) -> str:
        k.info = _LinkKernel("wireguard").info
        return ""

    monkeypatch.setattr(kernelio, "create_kernel_wireguard", create)
    monkeypatch.delenv("NETAGENT_WIREGUARD_IMPLEMENTATION", raising=False)
    link = _link_for(k, tmp_path)
    link.ensure()  # type: ignore[attr-defined]
    assert k.deleted == [7] and link.implementation == "kernel"  # type: ignore[attr-defined]
