"""The etcd registry against a real etcd 3.4 (Debian etcd-server) on 127.0.0.1."""

from __future__ import annotations

import threading
import time

import pytest
from support.harness import Etcd, free_port, need_etcd

from netagent.registry import (
    EtcdSettings,
    Registry,
    RegistryConfigError,
    RegistryError,
    WatchEvent,
    WatchResync,
)

pytestmark = pytest.mark.privileged


def registry(server: Etcd, **kw: object) -> Registry:
    return Registry(EtcdSettings(endpoints=(server.endpoint,), **kw))  # type: ignore[arg-type]


def test_create_if_absent_returns_holder_and_leaves_no_orphan_lease(etcd: Etcd) -> None:
    reg = registry(etcd)
    ok, lease_id, _ = reg.create("/t/a", "one", ttl=60)
    assert ok and lease_id
    ok2, lease2, holder = reg.create("/t/a", "two", ttl=60)
    assert not ok2 and lease2 == 0 and holder is not None and holder.value == b"one"
    leases = etcd.ctl("lease", "list").stdout
    assert leases.count("\n") == 2, leases  # header line + our one lease: the loser was revoked
    ok3, lease3, _ = reg.create("/t/r", "reserved", ttl=None)
    assert ok3 and lease3 == 0
    kv = reg.get("/t/r")
    assert kv is not None and kv.lease_id == 0
    reg.close()


def test_keepalive_reports_loss(etcd: Etcd) -> None:
    reg = registry(etcd)
    ok, lease_id, _ = reg.create("/t/k", "v", ttl=30)
    assert reg.keepalive(lease_id) == 30
    reg.revoke(lease_id)
    assert reg.keepalive(lease_id) == 0
    assert reg.get("/t/k") is None
    reg.close()


def test_watch_resumes_after_outage_without_missing_changes(etcd: Etcd) -> None:
    reg = registry(etcd)
    reg.put("/w/a", "1")
    _, rev = reg.list_prefix("/w/")
    stop = threading.Event()
    seen: list[WatchEvent | WatchResync] = []

    def run() -> None:
        for ev in reg.watch_prefix("/w/", rev + 1, stop):
            seen.append(ev)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    etcd.put("/w/b", "2")
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e.key for e in seen if isinstance(e, WatchEvent)] == ["/w/b"]
    # outage: stop etcd, restart it on the same ports and data; write meanwhile via etcdctl
    etcd.stop()
    time.sleep(1.0)
    etcd.start()
    etcd.put("/w/c", "3")
    etcd.ctl("del", "/w/a")
    deadline = time.monotonic() + 20
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    t.join(5)
    kinds = [(e.kind, e.key) for e in seen if isinstance(e, WatchEvent)]
    assert kinds == [("put", "/w/b"), ("put", "/w/c"), ("delete", "/w/a")]
    assert reg.stats.watch_reconnects >= 1
    reg.close()


def test_watch_relists_after_compaction(etcd: Etcd) -> None:
    reg = registry(etcd)
    reg.put("/c/a", "1")
    _, rev = reg.list_prefix("/c/")
    for i in range(5):
        reg.put("/c/b", str(i))
    reg.delete("/c/a")
    _, now = reg.list_prefix("/c/")
    reg.compact(now)
    stop = threading.Event()
    got: list[WatchEvent | WatchResync] = []
    for item in reg.watch_prefix("/c/", rev + 1, stop):
        got.append(item)
        break
    stop.set()
    assert isinstance(got[0], WatchResync)
    assert {kv.key: kv.value for kv in got[0].items} == {"/c/b": b"4"}
    assert got[0].revision >= now
    reg.close()


def test_failover_to_second_endpoint(etcd: Etcd) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    reg = Registry(EtcdSettings(endpoints=(dead, etcd.endpoint), timeout=2))
    reg.put("/f/x", "1")
    kv = reg.get("/f/x")
    assert kv is not None and kv.value == b"1"
    assert reg.stats.failovers >= 1
    reg.close()


def test_unreachable_etcd_is_a_clear_error() -> None:
    need_etcd()
    reg = Registry(EtcdSettings(endpoints=(f"http://127.0.0.1:{free_port()}",), timeout=1))
    with pytest.raises(RegistryError) as err:
        reg.get("/x")
    assert err.value.kind in ("unavailable", "timeout")
    assert "127.0.0.1" in str(err.value)
    reg.close()


def test_password_over_plaintext_is_refused() -> None:
    with pytest.raises(RegistryConfigError, match="plaintext"):
        Registry(EtcdSettings(endpoints=("http://127.0.0.1:2379",), username="u", password="p"))
    with pytest.raises(RegistryConfigError, match="together"):
        Registry(EtcdSettings(endpoints=("https://127.0.0.1:2379",), certfile="/x"))
    with pytest.raises(RegistryConfigError, match="not an http"):
        Registry(EtcdSettings(endpoints=("ftp://x:1",)))


def test_v2_store_is_found_for_the_missing_config_message() -> None:
    server = Etcd(enable_v2=True).start()
    try:
        server.ctl("set", "/coreos.com/network/config", '{"Network":"10.5.0.0/16"}', api=2)
        reg = registry(server)
        assert reg.get("/coreos.com/network/config") is None
        assert reg.find_v2_value("/coreos.com/network/config") == '{"Network":"10.5.0.0/16"}'
        from netagent.daemon import missing_config_message

        msg = missing_config_message(reg)
        assert "v2 store has it" in msg and "netagent migrate-v2" in msg
        reg.close()
    finally:
        server.cleanup()
