"""The operator commands against a real etcd on loopback (no namespaces needed): config get/set,
leases, migrate-v2 against a server with the v2 API enabled, and --help examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.harness import Etcd

from netagent.cli import build_parser, main

PREFIX = "/coreos.com/network"
GOOD = '{"Network":"10.20.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}'


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_every_command_help_shows_an_example() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():  # type: ignore[union-attr]
        assert "example:" in p.format_help(), name
        for a in p._actions:
            if getattr(a, "choices", None) and a.dest == "config_command":
                for cname, cp in a.choices.items():
                    assert "example:" in cp.format_help(), f"config {cname}"


@pytest.mark.privileged
def test_config_set_validates_and_get_reads(etcd: Etcd, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    ep = ("--etcd-endpoints", etcd.endpoint)
    bad = tmp_path / "bad.json"
    bad.write_text('{"Network":"10.20.0.0/16","SubnetLen":31}')
    rc, _, err = run(capsys, "config", "set", str(bad), *ep)
    assert rc == 1 and "SubnetLen" in err and "nothing written" in err
    assert etcd.get(f"{PREFIX}/config") is None
    good = tmp_path / "good.json"
    good.write_text(GOOD + "\n")
    rc, out, _ = run(capsys, "config", "set", str(good), *ep)
    assert rc == 0 and "network 10.20.0.0/16" in out
    assert etcd.get(f"{PREFIX}/config") == GOOD
    # a bad config after a good one leaves the good one
    rc, _, _ = run(capsys, "config", "set", str(bad), *ep)
    assert rc == 1 and etcd.get(f"{PREFIX}/config") == GOOD
    rc, out, _ = run(capsys, "config", "get", "--json", *ep)
    assert rc == 0 and json.loads(out) == json.loads(GOOD)
    # plain etcdctl put keeps working and is what `get` shows
    etcd.put(f"{PREFIX}/config", '{"Network":"10.21.0.0/16"}')
    rc, out, _ = run(capsys, "config", "get", *ep)
    assert rc == 0 and out.strip() == '{"Network":"10.21.0.0/16"}'


@pytest.mark.privileged
def test_leases_json_matches_etcd(etcd: Etcd, capsys: pytest.CaptureFixture[str]) -> None:
    lease_hex = etcd.ctl("lease", "grant", "300").stdout.split()[1]
    etcd.ctl("put", "--lease", lease_hex, f"{PREFIX}/subnets/10.20.1.0-24",
             '{"PublicIP":"192.0.2.1","BackendType":"host-gw"}')
    etcd.put(f"{PREFIX}/subnets/10.20.2.0-24", '{"PublicIP":"192.0.2.2"}')  # reservation
    etcd.put(f"{PREFIX}/subnets/10.20.3.0-24", "not json")
    rc, out, _ = run(capsys, "leases", "--json", "--etcd-endpoints", etcd.endpoint)
    assert rc == 0
    rows = {r["key"].rsplit("/", 1)[1]: r for r in json.loads(out)["leases"]}
    assert set(rows) == {"10.20.1.0-24", "10.20.2.0-24", "10.20.3.0-24"}
    leased = rows["10.20.1.0-24"]
    assert leased["lease_id"] == lease_hex and not leased["reserved"]
    assert 290 <= leased["ttl"] <= 300 and leased["backend"] == "host-gw"
    assert leased["public_ip"] == "192.0.2.1" and leased["subnet"] == "10.20.1.0/24"
    assert rows["10.20.2.0-24"]["reserved"] and rows["10.20.2.0-24"]["ttl"] is None
    assert rows["10.20.3.0-24"]["error"]
    rc, out, _ = run(capsys, "leases", "--etcd-endpoints", etcd.endpoint)
    assert "reserved" in out and "MALFORMED" in out and "3 leases (2 reserved)" in out


@pytest.mark.privileged
def test_migrate_v2_copies_and_refuses_to_overwrite(capsys: pytest.CaptureFixture[str]) -> None:
    server = Etcd(enable_v2=True).start()
    try:
        ep = ("--etcd-endpoints", server.endpoint)
        rc, _, err = run(capsys, "migrate-v2", *ep)
        assert rc == 1 and "no /coreos.com/network/config in the etcd v2 store" in err
        server.ctl("set", f"{PREFIX}/config", GOOD, api=2)
        assert server.get(f"{PREFIX}/config") is None  # v3 cannot see it
        rc, out, _ = run(capsys, "migrate-v2", *ep)
        assert rc == 0 and "copied" in out
        assert server.get(f"{PREFIX}/config") == GOOD
        rc, out, _ = run(capsys, "migrate-v2", *ep)
        assert rc == 0 and "nothing to do" in out
        other = '{"Network":"10.99.0.0/16"}'
        server.put(f"{PREFIX}/config", other)
        rc, _, err = run(capsys, "migrate-v2", *ep)
        assert rc == 1 and "--force" in err
        assert server.get(f"{PREFIX}/config") == other
        rc, _, _ = run(capsys, "migrate-v2", "--force", *ep)
        assert rc == 0 and server.get(f"{PREFIX}/config") == GOOD
    finally:
        server.cleanup()
