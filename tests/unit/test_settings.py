"""Settings precedence: flag > NETAGENT_* > FLANNELD_* > --config YAML > default."""

from __future__ import annotations

import argparse

import pytest

from netagent.settings import SettingsError, add_flags, load_settings


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_flags(p)
    return p.parse_args(list(argv))


def test_defaults_are_flannels() -> None:
    s = load_settings(parse(), {})
    assert s.etcd_endpoints == ("http://127.0.0.1:4001", "http://127.0.0.1:2379")
    assert s.etcd_prefix == "/coreos.com/network"
    assert s.subnet_file == "/run/flannel/subnet.env"
    assert s.subnet_lease_renew_margin == 60 and s.subnet_lease_ttl == 86400
    assert s.ip_masq is False and s.healthz_ip == "0.0.0.0" and s.healthz_port == 0


def test_precedence() -> None:
    yaml_text = "etcd-prefix: /from/file\nsubnet_file: /file/subnet.env\nip-masq: true\n" \
                "iface: [eth7]\nhealthz-port: 1\n"
    env = {"FLANNELD_ETCD_PREFIX": "/from/flanneld", "NETAGENT_SUBNET_FILE": "/na/subnet.env",
           "FLANNELD_SUBNET_FILE": "/fl/subnet.env", "FLANNELD_HEALTHZ_PORT": "",
           "FLANNELD_ETCD_ENDPOINTS": "http://a:1,http://b:2"}
    s = load_settings(parse("--healthz-port", "8081"), env, yaml_text)
    assert s.etcd_prefix == "/from/flanneld"  # env over file
    assert s.subnet_file == "/na/subnet.env"  # NETAGENT_ over FLANNELD_
    assert s.ip_masq is True and s.iface == ("eth7",)  # file over default
    assert s.healthz_port == 8081  # flag over everything; empty env ignored
    assert s.etcd_endpoints == ("http://a:1", "http://b:2")
    s = load_settings(parse("--etcd-prefix", "/flag", "--iface", "eth1", "--iface", "10.0.0.1",
                            "--ip-masq"), env, yaml_text)
    assert s.etcd_prefix == "/flag" and s.iface == ("eth1", "10.0.0.1") and s.ip_masq


@pytest.mark.parametrize(
    "argv, env, text, words",
    [
        (("--subnet-lease-renew-margin", "0"), {}, None, "renew-margin"),
        (("--subnet-lease-renew-margin", "1440"), {}, None, "renew-margin"),
        ((), {"FLANNELD_HEALTHZ_PORT": "eighty"}, None, "FLANNELD_HEALTHZ_PORT"),
        ((), {"NETAGENT_IP_MASQ": "sometimes"}, None, "NETAGENT_IP_MASQ"),
        ((), {}, "nonsense-key: 1\n", "unknown setting"),
        ((), {}, "[1, 2]\n", "mapping"),
        ((), {}, "a: [\n", "not valid YAML"),
    ],
)
def test_bad_settings_name_their_source(argv: tuple[str, ...], env: dict[str, str],
                                        text: str | None, words: str) -> None:
    with pytest.raises(SettingsError, match=words):
        load_settings(parse(*argv), env, text)
