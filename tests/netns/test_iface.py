"""Interface selection: the pure choosers (IPv4 pinned as it is, IPv6 for IPv6-only networks),
their wiring to the kernel read, and one privileged namespace test of the raw netlink read on a
host with IPv6 and no IPv4 at all."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest
from support.harness import RUN_ID, add_netns, del_netns, need_root, sh

import netagent.kernel.host
from netagent.iface import (
    Iface,
    IfaceError,
    Reach,
    choose_iface,
    choose_iface6,
    find_iface,
    find_iface6,
    list_ifaces,
)
from netagent.kernel import HostInterface, host_interfaces

A6 = IPv6Address("2001:db8:1::10")
A6b = IPv6Address("2001:db8:1::11")
B6 = IPv6Address("2001:db8:2::20")
C6 = IPv6Address("fd00:3::30")

LO = Iface("lo", 1, 65536, (IPv4Address("127.0.0.1"),))
ETH0 = Iface("eth0", 2, 1500, (IPv4Address("10.0.0.2"),), (A6, A6b))
ETH1 = Iface("eth1", 3, 9000, (), (B6,))
V4ONLY = Iface("eth2", 4, 1500, (IPv4Address("10.9.0.2"),))  # no global IPv6
WG = Iface("wg0", 5, 1420, (), (C6,))
IFACES = (LO, ETH0, ETH1, V4ONLY, WG)


def pick6(*args: Any, **kw: Any) -> tuple[str, IPv6Address, IPv6Address]:
    iface, addr, public = choose_iface6(IFACES, *args, **kw)
    return iface.name, addr, public


# --------------------------------------------------------------------------- choose_iface6


def test_default_route_interface_and_its_first_global_address() -> None:
    assert pick6(default6_index=2) == ("eth0", A6, A6)
    assert pick6(default6_index=3) == ("eth1", B6, B6)


def test_no_default_route_says_what_to_do() -> None:
    with pytest.raises(IfaceError, match=r"no IPv6 default route; use --iface or --public-ipv6"):
        choose_iface6(IFACES)
    # an index no link has (the link vanished between the dumps) is no default route either
    with pytest.raises(IfaceError, match=r"no IPv6 default route"):
        choose_iface6(IFACES, default6_index=99)


def test_default_route_interface_without_global_address() -> None:
    with pytest.raises(IfaceError, match=r"^interface eth2 has no global IPv6 address$"):
        choose_iface6(IFACES, default6_index=4)


def test_iface_name() -> None:
    assert pick6(["eth1"], default6_index=2) == ("eth1", B6, B6)


def test_iface_address_returns_that_address_not_the_first() -> None:
    assert pick6(["2001:db8:1::11"]) == ("eth0", A6b, A6b)
    # any spelling of the address
    assert pick6(["2001:0db8:0001:0000:0000:0000:0000:0011"]) == ("eth0", A6b, A6b)


def test_iface_entries_tried_in_order_skipping_unusable_ones() -> None:
    assert pick6(["nosuch", "eth2", "10.0.0.2", "fe80::1", "2001:db8::99", "wg0", "eth0"]) \
        == ("wg0", C6, C6)
    assert pick6(["eth1", "eth0"]) == ("eth1", B6, B6)


def test_iface_no_entry_usable_lists_every_reason() -> None:
    with pytest.raises(IfaceError) as exc:
        choose_iface6(IFACES, ["nosuch", "eth2", "10.0.0.2", "fe80::1", "2001:db8::99"],
                      default6_index=2)
    msg = str(exc.value)
    assert msg.startswith("none of --iface nosuch, eth2, 10.0.0.2, fe80::1, 2001:db8::99 ")
    for part in ("no interface nosuch", "interface eth2 has no global IPv6 address",
                 "10.0.0.2 is an IPv4 address", "fe80::1 is link-local",
                 "no interface has the global IPv6 address 2001:db8::99"):
        assert part in msg


def test_iface_flag_wins_over_regex_and_public_ipv6() -> None:
    assert pick6(["eth1"], ["^wg"], "2001:db8:1::10") == ("eth1", B6, A6)


def test_regex_on_addresses_before_names() -> None:
    # "eth" names eth0 first, but the address hit on wg0 comes first
    assert pick6(regexes=["fd00:|eth"]) == ("wg0", C6, C6)
    # the address that matched, not the interface's first
    assert pick6(regexes=[r"::11$"]) == ("eth0", A6b, A6b)


def test_regex_on_names_skips_interfaces_without_global_address() -> None:
    assert pick6(regexes=["^eth[12]$"]) == ("eth1", B6, B6)
    assert pick6(regexes=["^wg"]) == ("wg0", C6, C6)


def test_regexes_tried_in_order() -> None:
    assert pick6(regexes=["^nomatch", "^eth2$", "^wg"]) == ("wg0", C6, C6)


def test_regex_does_not_match_ipv4_addresses() -> None:
    rx = r"10\.9\."
    with pytest.raises(IfaceError, match=re.escape(f"no interface matches --iface-regex {rx} ")):
        choose_iface6(IFACES, regexes=[rx])


def test_regex_nothing_usable() -> None:
    with pytest.raises(IfaceError) as exc:
        choose_iface6(IFACES, regexes=["^eth2$", "^nomatch"], default6_index=2)
    msg = str(exc.value)
    assert msg.startswith("no interface matches --iface-regex ^eth2$, ^nomatch for IPv6")
    assert "interface eth2 has no global IPv6 address" in msg
    assert "'^nomatch' matches no global IPv6 address" in msg


def test_bad_regex() -> None:
    with pytest.raises(IfaceError, match=r"--iface-regex '\(' is not a valid regex"):
        choose_iface6(IFACES, regexes=["("])


def test_public_ipv6_selects_its_owner() -> None:
    assert pick6(public_ipv6="2001:db8:2::20", default6_index=2) == ("eth1", B6, B6)


def test_public_ipv6_not_on_any_interface_is_advertised_from_the_default_one() -> None:
    nat = IPv6Address("2001:db8:ffff::1")
    assert pick6(public_ipv6=str(nat), default6_index=2) == ("eth0", A6, nat)
    assert pick6(["eth1"], public_ipv6=str(nat)) == ("eth1", B6, nat)
    assert pick6(regexes=["^wg"], public_ipv6=str(nat)) == ("wg0", C6, nat)


def test_public_ipv6_not_owned_and_no_default_route() -> None:
    with pytest.raises(IfaceError, match=r"no interface has --public-ipv6 2001:db8:ffff::1, "
                                         r"and no IPv6 default route"):
        choose_iface6(IFACES, public_ipv6="2001:db8:ffff::1")


@pytest.mark.parametrize("text", ["10.0.0.1", "not-an-ip", "2001:db8::/64", "2001:db8::zz"])
def test_bad_public_ipv6(text: str) -> None:
    with pytest.raises(IfaceError, match=rf"--public-ipv6 '{text}' is not an IPv6 address"):
        choose_iface6(IFACES, ["eth0"], public_ipv6=text)


def test_no_interfaces_at_all() -> None:
    with pytest.raises(IfaceError, match="no IPv6 default route"):
        choose_iface6((), default6_index=2)


# ------------------------------------------------------------- choose_iface (IPv4), pinned


def test_ipv4_choice_unchanged() -> None:
    assert choose_iface(IFACES, default_index=2) == (ETH0, IPv4Address("10.0.0.2"),
                                                     IPv4Address("10.0.0.2"))
    assert choose_iface(IFACES, ["10.9.0.2"])[0] == V4ONLY
    assert choose_iface(IFACES, regexes=[r"^10\.9"])[0] == V4ONLY
    assert choose_iface(IFACES, public_ip="10.9.0.2", default_index=2)[0] == V4ONLY
    with pytest.raises(IfaceError, match="no IPv4 default route"):
        choose_iface(IFACES)
    with pytest.raises(IfaceError, match="interface eth1 has no IPv4 address"):
        choose_iface(IFACES, ["eth1"])


# ------------------------------------------------------------- wiring to the kernel read

LINKS = [HostInterface(i.name, i.index, i.mtu, i.addrs, i.addrs6) for i in IFACES]


@pytest.fixture
def fake_host(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """host_interfaces() answering from LINKS: IPv4 default via eth2, IPv6 default via eth1."""
    seen: list[str | None] = []

    def fake(netns: str | None = None) -> tuple[list[HostInterface], int | None, int | None]:
        seen.append(netns)
        return LINKS, 4, 3

    monkeypatch.setattr(netagent.kernel.host, "host_interfaces", fake)
    return seen


def test_list_ifaces_names_both_default_routes(fake_host: list[str | None]) -> None:
    host = list_ifaces(netns="elsewhere")
    assert host.ifaces == IFACES
    assert (host.default_index, host.default6_index) == (4, 3)
    assert fake_host == ["elsewhere"]


def test_find_iface_uses_the_ipv4_default_route(fake_host: list[str | None]) -> None:
    iface, addr, public = find_iface([], [], "")
    assert (iface, addr, public) == (V4ONLY, IPv4Address("10.9.0.2"), IPv4Address("10.9.0.2"))
    assert fake_host == [None]


def test_find_iface6_uses_the_ipv6_default_route(fake_host: list[str | None]) -> None:
    assert find_iface6([], [], "") == (ETH1, B6, B6)
    assert find_iface6([], [], "2001:db8:ffff::1") == (ETH1, B6, IPv6Address("2001:db8:ffff::1"))


def test_find_iface6_flags_never_fall_back_to_the_default_route(
        fake_host: list[str | None]) -> None:
    assert find_iface6(["wg0"], [], "") == (WG, C6, C6)
    with pytest.raises(IfaceError, match="none of --iface eth2"):
        find_iface6(["eth2"], [], "")
    with pytest.raises(IfaceError, match="no interface matches --iface-regex"):
        find_iface6([], ["^nomatch"], "")


# --------------------------------------------------------------------------- privileged


@dataclass
class V6Host:
    ns: str
    uplink: str
    uplink_index: int
    other: str
    other_index: int


@pytest.fixture
def v6host() -> Iterator[V6Host]:
    """A namespace with IPv6 and no IPv4 beyond lo: veth "uplink" with a global address and the
    main-table default route, and its peer "other" carrying the decoys (a worse-metric default,
    a better one in another table, an unreachable default)."""
    need_root()
    name = f"na{RUN_ID}if{secrets.token_hex(3)}"
    up, other = f"i{RUN_ID}a", f"i{RUN_ID}b"
    add_netns(name)
    try:
        def ip(*args: str) -> Any:
            return sh("ip", *args, ns=name)

        ip("link", "add", up, "type", "veth", "peer", "name", other)
        ip("link", "set", up, "up")
        ip("link", "set", other, "up")
        ip("-6", "addr", "add", "2001:db8:77::1/64", "dev", up, "nodad")
        ip("-6", "addr", "add", "2001:db8:77::2/64", "dev", up, "nodad")
        ip("-6", "addr", "add", "2001:db8:78::1/64", "dev", other, "nodad")
        # decoys first, so "the first default route in the dump" would be wrong
        ip("-6", "route", "add", "default", "via", "2001:db8:78::fe", "dev", other,
           "metric", "2048")
        ip("-6", "route", "add", "default", "via", "2001:db8:78::fe", "dev", other,
           "table", "100", "metric", "1")
        ip("-6", "route", "add", "unreachable", "default", "metric", "2")
        ip("-6", "route", "add", "default", "via", "2001:db8:77::fe", "dev", up, "metric", "10")
        index = {link["ifname"]: link["ifindex"]
                 for link in json.loads(ip("-j", "link", "show").stdout)}
        yield V6Host(name, up, index[up], other, index[other])
    finally:
        del_netns(name)


@pytest.mark.privileged
def test_host_interfaces_ipv6_only_namespace(v6host: V6Host) -> None:
    links, default4, default6 = host_interfaces(netns=v6host.ns)
    by_name = {link.name: link for link in links}
    assert default4 is None
    assert default6 == v6host.uplink_index
    up = by_name[v6host.uplink]
    assert up.index == v6host.uplink_index
    assert up.addrs == ()
    # global addresses only (no fe80::), in the kernel's order
    assert set(up.addrs6) == {IPv6Address("2001:db8:77::1"), IPv6Address("2001:db8:77::2")}
    assert by_name[v6host.other].addrs6 == (IPv6Address("2001:db8:78::1"),)
    assert by_name["lo"].addrs6 == ()  # ::1 is host scope

    iface, addr, public = find_iface6([], [], "", netns=v6host.ns)
    assert iface.name == v6host.uplink and addr in up.addrs6 and public == addr
    iface, addr, _ = find_iface6([v6host.other], [], "", netns=v6host.ns)
    assert (iface.name, addr) == (v6host.other, IPv6Address("2001:db8:78::1"))


@pytest.mark.privileged
def test_host_interfaces_ipv6_default_route_gone(v6host: V6Host) -> None:
    sh("ip", "-6", "route", "del", "default", "dev", v6host.uplink, "metric", "10", ns=v6host.ns)
    _, default4, default6 = host_interfaces(netns=v6host.ns)
    assert (default4, default6) == (None, v6host.other_index)  # the metric-2048 one remains
    sh("ip", "-6", "route", "del", "default", "dev", v6host.other, "metric", "2048",
       ns=v6host.ns)
    _, default4, default6 = host_interfaces(netns=v6host.ns)
    assert (default4, default6) == (None, None)
    with pytest.raises(IfaceError, match="no IPv6 default route"):
        find_iface6([], [], "", netns=v6host.ns)


# --------------------------------------------------------------------------- --iface-can-reach


def test_can_reach_picks_the_route_interface_and_its_source() -> None:
    reach = Reach("2001:db8:2::99", 3, B6)  # the route leaves through eth1, source B6
    assert pick6(reach=reach) == ("eth1", B6, B6)
    # a source that is not the interface's (or of the other family): its first address
    assert pick6(reach=Reach("x", 2, IPv4Address("10.0.0.2"))) == ("eth0", A6, A6)
    assert pick6(reach=Reach("x", 2, A6b))[1] == A6b
    # the IPv4 choice: an IPv6 target picks the interface, its IPv4 address is used
    iface, addr, public = choose_iface(IFACES, reach=Reach("2001:db8:9::1", 2, A6),
                                       default_index=4)
    assert (iface.name, addr, public) == ("eth0", IPv4Address("10.0.0.2"),
                                          IPv4Address("10.0.0.2"))


def test_can_reach_comes_after_iface_regex_and_public_ip_and_before_the_default() -> None:
    reach = Reach("t", 3, B6)
    assert pick6(["wg0"], reach=reach)[0] == "wg0"
    assert pick6([], ["^fd00:"], reach=reach)[0] == "wg0"
    assert pick6(public_ipv6=str(C6), reach=reach)[0] == "wg0"
    assert pick6(default6_index=2, reach=reach)[0] == "eth1"
    iface, _, _ = choose_iface(IFACES, public_ip="10.9.0.2", reach=Reach("t", 2, None))
    assert iface.name == "eth2"


def test_can_reach_errors_say_what_is_wrong() -> None:
    with pytest.raises(IfaceError, match="--iface-can-reach 192.0.2.9: no route to it"):
        choose_iface(IFACES, reach=Reach("192.0.2.9", None), default_index=2)
    with pytest.raises(IfaceError, match=r"index 42\) is gone"):
        pick6(reach=Reach("t", 42, None))
    with pytest.raises(IfaceError, match="through eth1, which has no IPv4 address"):
        choose_iface(IFACES, reach=Reach("t", 3, B6))
    with pytest.raises(IfaceError, match="through eth2, which has no global IPv6 address"):
        pick6(reach=Reach("t", 4, None))
    with pytest.raises(IfaceError, match="'eth0' is not an IP address"):
        find_iface([], [], "", can_reach="eth0")


def test_can_reach_an_address_of_this_host_is_not_lo() -> None:
    """`ip route get <own address>` answers "local ... dev lo": lo and 127.0.0.1 must not
    become the underlay; the error names the interface that has the address."""
    with pytest.raises(IfaceError, match=r"--iface-can-reach 10\.0\.0\.2: that is an address "
                                         r"of this host .*through lo\); to use eth0, pass "
                                         r"--iface eth0$"):
        choose_iface(IFACES, reach=Reach("10.0.0.2", 1, IPv4Address("10.0.0.2")),
                     default_index=2)
    with pytest.raises(IfaceError, match=r"through lo\); to use eth1, pass --iface eth1$"):
        pick6(reach=Reach("2001:0db8:2:0::20", 1, B6), default6_index=2)
    with pytest.raises(IfaceError, match=r"local, through lo\)$"):
        choose_iface(IFACES, reach=Reach("127.0.0.5", 1, None))


@pytest.mark.privileged
def test_can_reach_asks_the_kernel(v6host: V6Host) -> None:
    """Both families in the namespace; the target is routed through "other" (not the default
    route's interface), with a preferred source that is not the interface's first address."""
    ns = v6host.ns
    sh("ip", "addr", "add", "10.77.0.1/24", "dev", v6host.uplink, ns=ns)
    sh("ip", "route", "add", "default", "via", "10.77.0.254", ns=ns)
    sh("ip", "addr", "add", "10.78.0.1/24", "dev", v6host.other, ns=ns)
    sh("ip", "addr", "add", "10.78.0.2/24", "dev", v6host.other, ns=ns)
    sh("ip", "route", "add", "198.51.100.0/24", "via", "10.78.0.254", "src", "10.78.0.2",
       ns=ns)
    sh("ip", "-6", "addr", "add", "2001:db8:78::2/64", "dev", v6host.other, "nodad", ns=ns)
    sh("ip", "-6", "route", "add", "2001:db8:99::/64", "via", "2001:db8:78::fe", "src",
       "2001:db8:78::2", ns=ns)
    iface, addr, public = find_iface([], [], "", netns=ns)
    assert iface.name == v6host.uplink  # the default route without the flag
    iface, addr, public = find_iface([], [], "", netns=ns, can_reach="198.51.100.7")
    assert (iface.name, addr, public) == (v6host.other, IPv4Address("10.78.0.2"),
                                          IPv4Address("10.78.0.2"))
    iface6, addr6, _ = find_iface6([], [], "", netns=ns, can_reach="2001:db8:99::5")
    assert (iface6.name, addr6) == (v6host.other, IPv6Address("2001:db8:78::2"))
    # the other family's target picks the interface; its first address of the family is used
    iface, addr, _ = find_iface([], [], "", netns=ns, can_reach="2001:db8:99::5")
    assert (iface.name, addr) == (v6host.other, IPv4Address("10.78.0.1"))
    iface6, addr6, _ = find_iface6([], [], "", netns=ns, can_reach="198.51.100.7")
    assert iface6.name == v6host.other and addr6 == iface6.addrs6[0]  # the kernel's order
    assert len(iface6.addrs6) == 2
    # an address of this host: the kernel's route is local, through lo
    with pytest.raises(IfaceError, match=f"pass --iface {v6host.other}$"):
        find_iface([], [], "", netns=ns, can_reach="10.78.0.2")
    # --iface wins; an unreachable target is an error, not the default route
    assert find_iface([v6host.uplink], [], "", netns=ns, can_reach="198.51.100.7")[0].name \
        == v6host.uplink
    sh("ip", "route", "add", "unreachable", "203.0.113.0/24", ns=ns)
    with pytest.raises(IfaceError, match="no route to it"):
        find_iface([], [], "", netns=ns, can_reach="203.0.113.1")
