"""flanneld's iptables and logging flags, and its one-dash flag spelling, without root:
``--iptables-forward-rules`` (on by default, as in flannel: FORWARD ACCEPT rules even without
``--ip-masq``), ``--ip-masq-fully-random-disable``, ``--iptables-resync``, ``-v``,
``--iface-can-reach``; a chain of ours that is no longer wanted is deleted in the same batch."""

from __future__ import annotations

import argparse
from ipaddress import IPv4Network

import pytest

from netagent.cli import build_parser
from netagent.daemon import SAFETY_NET_INTERVAL, full_compare_interval
from netagent.masq import FWD_HOOK, NAT_HOOK, Installed, missing, render_rules, restore_text
from netagent.settings import SettingsError, add_flags, load_settings, long_dash

NET, SUB = IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24")


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_flags(p)
    return p.parse_args(long_dash(argv))


def test_defaults_match_flanneld() -> None:
    s = load_settings(parse(), {})
    assert s.iptables_forward_rules is True and s.ip_masq is False
    assert s.ip_masq_fully_random_disable is False and s.iptables_resync == 5
    assert s.v == 0 and s.effective_log_level == "info"
    assert s.iptables  # forward rules alone are iptables work


def test_flanneld_spellings_one_dash_equals_and_environment() -> None:
    s = load_settings(parse("-iptables-forward-rules=false", "-ip-masq", "-iface=eth1",
                            "-v=2", "--iptables-resync", "7", "-iface-can-reach=10.0.0.9"), {})
    assert (s.iptables_forward_rules, s.ip_masq, s.iface, s.v, s.iptables_resync) == (
        False, True, ("eth1",), 2, 7)
    assert s.effective_log_level == "debug" and s.iface_can_reach == "10.0.0.9"
    s = load_settings(parse(), {"FLANNELD_IPTABLES_FORWARD_RULES": "false",
                                "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE": "true",
                                "FLANNELD_V": "1"})
    assert not s.iptables_forward_rules and s.ip_masq_fully_random_disable and s.v == 1
    assert not s.iptables  # neither masquerade nor forward rules: iptables is never run
    # only known flags are rewritten: a short option and a value stay as they are
    assert long_dash(["-h", "-x", "-iface", "-eth0"]) == ["-h", "-x", "--iface", "-eth0"]


def test_bad_values_name_the_flag() -> None:
    with pytest.raises(SettingsError, match="iptables-resync"):
        load_settings(parse("--iptables-resync", "0"), {})
    with pytest.raises(SettingsError, match="FLANNELD_IPTABLES_FORWARD_RULES"):
        load_settings(parse(), {"FLANNELD_IPTABLES_FORWARD_RULES": "maybe"})


def test_run_accepts_a_flanneld_command_line() -> None:
    from netagent import cli

    parser = build_parser()
    argv = ["run", *long_dash(["-etcd-endpoints=http://10.0.0.1:2379", "-iface=eth1",
                               "-ip-masq", "-iptables-forward-rules=true", "-v=0"])]
    args = parser.parse_args(argv)
    assert args.func is cli.cmd_run and args.etcd_endpoints == ["http://10.0.0.1:2379"]
    assert args.iptables_forward_rules == "true" and args.v == "0"
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "-version"])
    assert exc.value.code == 0


def test_forward_rules_alone_have_no_nat_chain() -> None:
    want = render_rules(NET, SUB, masquerade=False)
    assert want.nat == () and len(want.forward) == 2 and want.hooks == {"filter": FWD_HOOK}
    text = restore_text(want, Installed(None, None, 0, 0))
    assert "*nat" not in text and FWD_HOOK in text and text.count("COMMIT") == 1
    assert missing(want, Installed(None, want.forward, 0, 1)) == []


def test_a_chain_no_longer_wanted_is_deleted_in_the_same_batch() -> None:
    full = render_rules(NET, SUB)
    have = Installed(full.nat, full.forward, 1, 1)
    fwd_only = render_rules(NET, SUB, masquerade=False)
    assert missing(fwd_only, have) == ["nat FLANNEL-POSTRTG present but --ip-masq is off"]
    text = restore_text(fwd_only, have)
    assert text.splitlines() == [
        "*nat", "-D" + NAT_HOOK[2:], "-F FLANNEL-POSTRTG", "-X FLANNEL-POSTRTG", "COMMIT",
        "*filter", ":FLANNEL-FWD - [0:0]", "-F FLANNEL-FWD", *fwd_only.forward, "COMMIT"]
    masq_only = render_rules(NET, SUB, forward=False)
    assert missing(masq_only, have) == [
        "filter FLANNEL-FWD present but --iptables-forward-rules is off"]
    assert "-X FLANNEL-FWD" in restore_text(masq_only, have)
    # nothing of ours left over and nothing wanted of that chain: no batch part for it
    assert "*filter" not in restore_text(masq_only, Installed(full.nat, None, 1, 0))


def test_fully_random_disable_drops_the_option() -> None:
    assert all("--random-fully" not in r for r in render_rules(NET, SUB, random_fully=False).nat)
    assert sum("--random-fully" in r for r in render_rules(NET, SUB).nat) == 2


def test_repair_interval_set_tells_an_operators_value_from_the_default() -> None:
    """The daemon stretches only a default --repair-interval (see daemon.full_compare_interval);
    a value from the flag, the environment or the config file is the operator's and is kept."""
    assert load_settings(parse(), {}).repair_interval_set is False
    assert load_settings(parse(), {}).repair_interval == 10.0
    s = load_settings(parse("--repair-interval", "2"), {})
    assert s.repair_interval_set is True and s.repair_interval == 2.0
    assert load_settings(parse(), {"NETAGENT_REPAIR_INTERVAL": "3"}).repair_interval_set is True
    assert load_settings(parse(), {}, "repair-interval: 4\n").repair_interval_set is True
    assert load_settings(parse("--ip-masq"), {}, "ip-masq: true\n").repair_interval_set is False


def test_full_compare_interval_keeps_operator_values_and_stretches_only_the_default() -> None:
    assert full_compare_interval(10.0, False, True) == SAFETY_NET_INTERVAL
    assert full_compare_interval(10.0, False, False) == 10.0
    assert full_compare_interval(2.0, True, True) == 2.0
    assert full_compare_interval(600.0, False, True) == 600.0  # never shortened
