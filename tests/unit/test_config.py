"""Network config parsing: flannel's defaults, and each mistake rejected naming the field."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netagent.config import ConfigError, parse_network_config


@pytest.mark.parametrize(
    "raw, sublen, smin, smax, count",
    [
        ('{"Network":"10.5.0.0/16"}', 24, "10.5.1.0", "10.5.255.0", 255),
        ('{"Network":"10.5.0.0/24"}', 26, "10.5.0.64", "10.5.0.192", 3),
        ('{"Network":"10.5.0.0/28"}', 30, "10.5.0.4", "10.5.0.12", 3),
        ('{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0",'
         '"SubnetMax":"10.99.0.0"}', 20, "10.10.0.0", "10.99.0.0", 1425),
    ],
)
def test_flannel_worked_examples(raw: str, sublen: int, smin: str, smax: str, count: int) -> None:
    cfg = parse_network_config(raw)
    assert cfg.subnet_len == sublen
    assert cfg.subnet_min == IPv4Address(smin)
    assert cfg.subnet_max == IPv4Address(smax)
    assert len(cfg.candidate_subnets()) == count


def test_keys_are_case_insensitive_and_unknown_keys_ignored() -> None:
    cfg = parse_network_config(
        '{"network":"172.16.0.0/16","SUBNETLEN":24,"subnetmin":"172.16.1.0",'
        '"SubnetMax":"172.16.10.0","backend":{"type":"VXLAN","vni":7,"directrouting":true},'
        '"Comment":"x"}'
    )
    assert cfg.network == IPv4Network("172.16.0.0/16")
    assert cfg.backend.type == "vxlan" and cfg.backend.vni == 7 and cfg.backend.direct_routing
    assert len(cfg.candidate_subnets()) == 10
    assert cfg.extra == ("Comment",)


def test_absent_backend_defaults_to_vxlan_and_says_so() -> None:
    cfg = parse_network_config('{"Network":"10.5.0.0/16"}')
    assert cfg.backend.type == "vxlan" and cfg.backend_defaulted
    assert cfg.backend.vni == 1 and cfg.backend.port == 0


@pytest.mark.parametrize(
    "raw, field, words",
    [
        ("{not json", "(json)", "not valid JSON"),
        ("[1,2]", "(json)", "JSON object"),
        ('{"SubnetLen":24}', "Network", "missing"),
        ('{"Network":"banana"}', "Network", "not a CIDR"),
        ('{"Network":"10.5.0.0/33"}', "Network", "not a CIDR"),
        ('{"Network":"fc00::/64"}', "Network", "not an IPv4"),
        ('{"Network":"10.5.0.0/29"}', "Network", "too small"),
        ('{"Network":"10.5.0.0/16","SubnetLen":31}', "SubnetLen", "at most /30"),
        ('{"Network":"10.5.0.0/16","SubnetLen":17}', "SubnetLen", "fewer than four"),
        ('{"Network":"10.5.0.0/16","SubnetLen":"24"}', "SubnetLen", "whole number"),
        ('{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.7"}', "SubnetMin", "boundary"),
        ('{"Network":"10.5.0.0/16","SubnetMin":"10.6.1.0"}', "SubnetMin", "not in the range"),
        ('{"Network":"10.5.0.0/16","SubnetMax":"10.5.3.128"}', "SubnetMax", "boundary"),
        ('{"Network":"10.5.0.0/16","SubnetMin":"10.5.9.0","SubnetMax":"10.5.3.0"}',
         "SubnetMin", "above SubnetMax"),
        ('{"Network":"10.5.0.0/16","Backend":{"Type":"carrier-pigeon"}}', "Backend.Type",
         "unknown backend"),
        ('{"Network":"10.5.0.0/16","Backend":{}}', "Backend.Type", "missing"),
        ('{"Network":"10.5.0.0/16","Backend":"vxlan"}', "Backend", "JSON object"),
        ('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":-1}}', "Backend.VNI",
         "between"),
        ('{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Port":70000}}', "Backend.Port",
         "between"),
        ('{"Network":"10.5.0.0/16","EnableIPv4":"yes"}', "EnableIPv4", "true or false"),
        ('{"EnableIPv4":false}', "EnableIPv4", "disabled"),
        ('{"Network":"10.5.0.0/16","EnableIPv6":true}', "IPv6Network", "missing"),
    ],
)
def test_each_mistake_names_its_field(raw: str, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_network_config(raw)
    assert err.value.field == field
    assert words in err.value.reason
    assert str(err.value).startswith(f"{field}: ")


def test_ipv6_defaults() -> None:
    cfg = parse_network_config(
        '{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}'
    )
    assert cfg.ipv6_subnet_len == 64
    assert str(cfg.ipv6_subnet_min) == "fc00:0:0:1::"


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(
    st.sampled_from(["Network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend", "EnableIPv4",
                     "network", "EnableIPv6", "IPv6Network"]),
    st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.text(max_size=20),
              st.sampled_from(["10.5.0.0/16", "10.5.1.0", "10.5.0.0/30", "fc00::/64",
                               "10.5.7.128"]),
              st.dictionaries(st.sampled_from(["Type", "VNI", "Port"]),
                              st.one_of(st.text(max_size=8), st.integers(-2, 70000)))),
))
def test_generated_configs_parse_or_fail_cleanly(doc: dict[str, object]) -> None:
    import json

    try:
        cfg = parse_network_config(json.dumps(doc))
    except ConfigError as exc:
        assert exc.field and exc.reason
        return
    if cfg.enable_ipv4:
        subnets = cfg.candidate_subnets()
        assert subnets and all(cfg.contains_subnet(s) for s in subnets)
        assert all(s.subnet_of(cfg.network) for s in subnets)  # type: ignore[arg-type]
