"""All etcd access: one module, so the client library can be swapped (see DESIGN.md).

Wraps ``etcd-sdk-python`` (``import pyetcd``: python-etcd3's API with protobuf code generated
for current protobuf, so messages decode in C: a listing of 5,000 leases takes ~20 ms instead of
~85 ms with etcd3 0.12, whose generated code forced the pure-Python protobuf) and adds what it
lacks (shared/reference/etcd.md §3.5): endpoint rotation on connection errors,
re-authentication on an expired token, a refusal of user/password without TLS, a keepalive
call that reports lease loss, and a prefix watch that resumes from the last revision + 1 and
re-lists after compaction.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import pyetcd
import pyetcd.events as etcd_events
import pyetcd.exceptions as etcd_exc

from netagent.store import (  # re-exported: the registry's callers import them here
    BACKOFF_MAX,
    BACKOFF_START,
    KeyValue,
    RegistryError,
    RegistryStats,
    Store,
    WatchEvent,
    WatchResync,
)

log = logging.getLogger("netagent.registry")

_default_excepthook = threading.excepthook


def _quiet_closed_watch(args: threading.ExceptHookArgs) -> None:
    """The client's watch thread dies with ValueError when we close its channel; expected."""
    name = args.thread.name if args.thread is not None else ""
    if name.startswith("pyetcd_watch_") and isinstance(args.exc_value, ValueError):
        return
    _default_excepthook(args)


threading.excepthook = _quiet_closed_watch

T = TypeVar("T")

__all__ = ["BACKOFF_MAX", "BACKOFF_START", "KeyValue", "Registry", "RegistryConfigError",
           "RegistryError", "RegistryStats", "Store", "WatchEvent", "WatchResync", "EtcdSettings"]

DEFAULT_ENDPOINTS = ("http://127.0.0.1:4001", "http://127.0.0.1:2379")


class RegistryConfigError(RegistryError):
    """The etcd settings themselves are wrong (retrying will not help)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "config")


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[str, ...] = DEFAULT_ENDPOINTS
    prefix: str = "/coreos.com/network"
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""
    username: str = ""
    password: str = ""
    timeout: float = 5.0

    @property
    def tls(self) -> bool:
        return any(urlsplit(e).scheme == "https" for e in self.endpoints) or bool(
            self.certfile or self.keyfile or self.cafile
        )

    def validate(self) -> None:
        if not self.endpoints:
            raise RegistryConfigError("no etcd endpoint given (--etcd-endpoints)")
        for ep in self.endpoints:
            parts = urlsplit(ep if "://" in ep else f"http://{ep}")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise RegistryConfigError(f"etcd endpoint {ep!r} is not an http(s)://host:port URL")
        if bool(self.certfile) != bool(self.keyfile):
            raise RegistryConfigError(
                "--etcd-certfile and --etcd-keyfile must be given together"
            )
        if (self.username or self.password) and not self.tls:
            raise RegistryConfigError(
                "refusing to send the etcd user name and password over plaintext: use https:// "
                "endpoints with --etcd-cafile (gRPC will not send call credentials without TLS)"
            )
        if bool(self.username) != bool(self.password):
            raise RegistryConfigError("--etcd-username and --etcd-password must be given together")
        for name, path in (("cafile", self.cafile), ("certfile", self.certfile),
                           ("keyfile", self.keyfile)):
            if path and not os.path.isfile(path):
                raise RegistryConfigError(f"--etcd-{name} {path}: no such file")


def _tls_problem(detail: str) -> str:
    """A clear sentence for a TLS handshake failure hidden in a gRPC UNAVAILABLE, or "".

    The client turns every UNAVAILABLE into a bare ConnectionFailedError; the gRPC error it chains
    says what really happened (measured with grpcio 1.85.3 against etcd 3.4.23, tests/e2e/test_tls_etcd.py).
    """
    if "CERTIFICATE_VERIFY_FAILED" in detail:
        return ("TLS handshake failed: etcd's server certificate is not signed by the CA in "
                "--etcd-cafile (CERTIFICATE_VERIFY_FAILED)")
    if "Peer name" in detail and "not in peer certificate" in detail:
        return ("TLS handshake failed: the endpoint's host name or IP is not in etcd's server "
                "certificate (subjectAltName)")
    if "TSI_DATA_CORRUPTED" in detail or "BAD_CERTIFICATE" in detail or \
            "CERTIFICATE_REQUIRED" in detail:
        return ("TLS handshake failed: etcd rejected our client certificate or requires one "
                "(--etcd-certfile/--etcd-keyfile, signed by the CA etcd trusts)")
    if "handshake failed" in detail.lower() or "WRONG_VERSION_NUMBER" in detail:
        return f"TLS handshake failed (is the endpoint really https://?): {detail}"
    return ""


def _grpc_detail(exc: BaseException) -> str:
    for inner in (exc.__cause__, exc.__context__):
        if inner is not None and hasattr(inner, "details"):
            try:
                return str(inner.details() or "")
            except Exception:  # noqa: BLE001 - best effort
                return ""
    return ""


def _classify(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, etcd_exc.ConnectionTimeoutError):
        return "timeout", "etcd did not answer in time"
    if isinstance(exc, etcd_exc.ConnectionFailedError):
        detail = _grpc_detail(exc)
        tls = _tls_problem(detail)
        if tls:
            return "tls", tls
        last = detail.rsplit("last error: ", 1)[-1] if detail else ""
        return "unavailable", f"cannot reach etcd ({last})" if last else "cannot reach etcd"
    if isinstance(exc, etcd_exc.PreconditionFailedError):  # the client hides the gRPC detail
        detail = _grpc_detail(exc)
        if "lease already exists" in detail:
            return "exists", f"etcd: {detail}"
        return "other", f"etcd refused a precondition: {detail}"
    if isinstance(exc, etcd_exc.RevisionCompactedError):
        return "compacted", "revision compacted"
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.INVALID_ARGUMENT and "authentication failed" in str(detail):
            return "auth", ("etcd rejected the user name or password (--etcd-username/"
                            f"--etcd-password): {detail}")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return "auth", f"etcd rejected our credentials: {detail}"
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return "permission", f"etcd denied access: {detail}"
        if code in (grpc.StatusCode.UNAVAILABLE,):
            tls = _tls_problem(str(detail))
            if tls:
                return "tls", tls
            return "unavailable", f"cannot reach etcd: {detail}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "timeout", "etcd did not answer in time"
        if code == grpc.StatusCode.NOT_FOUND:
            return "notfound", f"etcd: {detail}"
        if code == grpc.StatusCode.FAILED_PRECONDITION and "lease already exists" in str(detail):
            return "exists", f"etcd: {detail}"
        return "other", f"etcd error {code}: {detail}"
    if isinstance(exc, ValueError) and "closed channel" in str(exc):
        return "unavailable", "connection closed"
    if isinstance(exc, ValueError) and "failed node" in str(exc):
        # the client marks its endpoint failed after UNAVAILABLE, DEADLINE_EXCEEDED or
        # INTERNAL and then refuses every call on it: only a new client helps
        return "unavailable", "the connection failed earlier"
    if isinstance(exc, ssl.SSLError | OSError):
        return "tls", f"cannot set up TLS: {exc}"
    return "other", f"{type(exc).__name__}: {exc}"


class Registry:
    """Thread-safe facade over one etcd client; rotates endpoints on connection failure."""

    def __init__(self, settings: EtcdSettings) -> None:
        settings.validate()
        self.settings = settings
        self.prefix = settings.prefix.rstrip("/")
        self.stats = RegistryStats()
        self._lock = threading.RLock()
        self._client: Any = None
        self._index = 0
        self._closed = False

    # ------------------------------------------------------------------ connection

    @property
    def endpoint(self) -> str:
        return self.settings.endpoints[self._index % len(self.settings.endpoints)]

    def _connect(self) -> Any:
        ep = self.endpoint
        parts = urlsplit(ep if "://" in ep else f"http://{ep}")
        s = self.settings
        kwargs: dict[str, Any] = {"timeout": s.timeout}
        if s.tls:
            ca = s.cafile or ssl.get_default_verify_paths().cafile or \
                "/etc/ssl/certs/ca-certificates.crt"
            kwargs["ca_cert"] = ca
            if s.certfile:
                kwargs["cert_cert"] = s.certfile
                kwargs["cert_key"] = s.keyfile
        if s.username:
            kwargs["user"] = s.username
            kwargs["password"] = s.password
        try:
            host = parts.hostname or ""
            # gRPC wants an IPv6 literal in brackets ("[fd00::1]:2379"); urlsplit strips them
            return pyetcd.client(f"[{host}]" if ":" in host else host, parts.port or 2379,
                                **kwargs)
        except Exception as exc:  # auth happens at construction
            kind, msg = _classify(exc)
            self.stats.count(kind)
            raise RegistryError(f"{ep}: {msg}", kind) from None

    def client(self) -> Any:
        with self._lock:
            if self._closed:
                raise RegistryError("registry closed", "closed")
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _drop(self, rotate: bool) -> None:
        with self._lock:
            old, self._client = self._client, None
            if rotate and len(self.settings.endpoints) > 1:
                self._index += 1
                self.stats.failovers += 1
                log.warning("switching to etcd endpoint %s", self.endpoint)
        if old is not None:
            try:
                old.close()
            except Exception:  # noqa: BLE001 - closing a broken channel
                pass

    def call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run `fn(client)`; on connection loss try each other endpoint once; re-auth once."""
        attempts = max(1, len(self.settings.endpoints)) + 1
        last: RegistryError | None = None
        reauthed = False
        for _ in range(attempts):
            try:
                return fn(self.client())
            except RegistryError as exc:
                last = exc
                if exc.kind in ("unavailable", "timeout", "tls"):
                    self._drop(rotate=True)
                    continue
                raise
            except Exception as exc:  # noqa: BLE001 - mapped below
                kind, msg = _classify(exc)
                self.stats.count(kind)
                last = RegistryError(f"{what}: {msg} ({self.endpoint})", kind)
                if kind == "auth" and self.settings.username and not reauthed:
                    reauthed = True
                    self._drop(rotate=False)
                    continue
                if kind in ("unavailable", "timeout", "tls"):
                    # tls too: one member with a bad certificate must not stop the others
                    self._drop(rotate=True)
                    continue
                if isinstance(exc, etcd_exc.InternalServerError):
                    self._drop(rotate=False)  # the client marked its endpoint failed (300 s)
                raise last from None
        assert last is not None
        raise last

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._drop(rotate=False)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ keys

    def key(self, suffix: str) -> str:
        return f"{self.prefix}/{suffix.lstrip('/')}"

    def get(self, key: str) -> KeyValue | None:
        def op(c: Any) -> KeyValue | None:
            value, meta = c.get(key)
            if meta is None:
                return None
            return KeyValue(key, value, meta.lease_id, meta.mod_revision)

        return self.call(f"get {key}", op)

    def put(self, key: str, value: bytes | str, lease_id: int = 0) -> None:
        self.call(f"put {key}", lambda c: c.put(key, value, lease=lease_id or None))

    def delete(self, key: str) -> bool:
        return bool(self.call(f"delete {key}", lambda c: c.delete(key)))

    def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under `prefix` and the store revision of that read (one range request)."""

        def op(c: Any) -> tuple[list[KeyValue], int]:
            resp = c.get_prefix_response(prefix)
            items = [
                KeyValue(kv.key.decode(), kv.value, kv.lease, kv.mod_revision) for kv in resp.kvs
            ]
            return items, int(resp.header.revision)

        return self.call(f"list {prefix}", op)

    def create(
        self, key: str, value: bytes | str, ttl: int | None, lease_id: int = 0
    ) -> tuple[bool, int, KeyValue | None]:
        """Create `key` only if absent, on etcd lease `lease_id` or a fresh one of `ttl` seconds
        (ttl None and no lease_id = a reservation).

        Returns (created, lease_id, existing). On failure a lease granted here is revoked so
        no orphan lease is left behind (the lease manager grants its own, with an ID it writes
        down first, so even a crash here leaves nothing it cannot revoke later).
        """
        given = lease_id
        # granted outside the retried transaction: `call` re-runs `op` after a lost answer, and
        # a grant inside it leaked one etcd lease per retry (issue 19 item 8)
        fresh = self.grant(ttl) if not given and ttl is not None else 0

        def op(c: Any) -> tuple[bool, int, KeyValue | None]:
            lease_id = given or fresh
            ok, responses = c.transaction(
                compare=[c.transactions.version(key) == 0],
                success=[c.transactions.put(key, value, lease=lease_id or None)],
                failure=[c.transactions.get(key)],
            )
            if ok:
                return True, lease_id, None
            existing = None
            if responses and responses[0]:
                v, meta = responses[0][0]
                existing = KeyValue(key, v, meta.lease_id, meta.mod_revision)
            if lease_id and existing is not None and existing.lease_id == lease_id:
                # our first transaction landed and only its answer was lost: the retry sees our put
                return True, lease_id, None
            if lease_id and not given:
                c.revoke_lease(lease_id)
            return False, 0, existing

        try:
            return self.call(f"create {key}", op)
        except RegistryError:
            if fresh:  # the caller learns of no lease: none may stay behind (best effort)
                try:
                    self.revoke(fresh)
                except RegistryError:
                    log.warning("could not revoke etcd lease %016x after a failed create; it "
                                "expires in %s s", fresh, ttl)
            raise

    def grant(self, ttl: int, lease_id: int = 0) -> int:
        """A new etcd lease of `ttl` seconds, with the ID `lease_id` when given (0: etcd picks).

        With a chosen ID a retried grant whose first answer was lost is recognised ("lease
        already exists" can only be our own earlier attempt: IDs are 63 random bits), so no
        lease is granted that we do not know the ID of."""

        def op(c: Any) -> int:
            try:
                return int(c.lease(ttl, lease_id=lease_id or None).id)
            except Exception as exc:
                if lease_id and _classify(exc)[0] == "exists":
                    return lease_id
                raise

        return self.call("grant lease", op)

    def revoke(self, lease_id: int) -> None:
        """Revoke an etcd lease (and delete its keys); a lease already gone is not an error."""

        def op(c: Any) -> None:
            try:
                c.revoke_lease(lease_id)
            except Exception as exc:
                if _classify(exc)[0] != "notfound":
                    raise

        self.call("revoke lease", op)

    def keepalive(self, lease_id: int) -> int:
        """Send one keepalive; returns the new TTL (0 means the lease is gone)."""

        def op(c: Any) -> int:
            responses = list(c.refresh_lease(lease_id))
            return int(responses[0].TTL) if responses else 0

        return self.call("keepalive", op)

    def revision(self) -> int:
        """etcd's current revision (the header of a one-key read)."""
        return int(self.call("revision", lambda c: c.get_response(self.prefix + "/config")
                             .header.revision))

    def lease_ttl(self, lease_id: int) -> int:
        """Seconds left on an etcd lease (-1 when it no longer exists)."""
        return int(self.call("lease ttl", lambda c: c.get_lease_info(lease_id).TTL))

    def lease_ttls(self, lease_ids: list[int]) -> dict[int, int]:
        return {lid: self.lease_ttl(lid) for lid in set(lease_ids) if lid}

    def compact(self, revision: int) -> None:
        self.call("compact", lambda c: c.compact(revision, physical=True))

    # ------------------------------------------------------------------ v2 store

    def find_v2_value(self, key: str) -> str | None:
        """The value of `key` in etcd's separate v2 store, if the server has one (else None)."""
        for ep in self.settings.endpoints:
            url = f"{ep.rstrip('/')}/v2/keys{key}"
            ctx = None
            if url.startswith("https"):
                ctx = ssl.create_default_context(cafile=self.settings.cafile or None)
                if self.settings.certfile:
                    ctx.load_cert_chain(self.settings.certfile, self.settings.keyfile)
            try:
                with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:  # noqa: S310
                    doc = json.loads(resp.read())
                value = doc.get("node", {}).get("value")
                return str(value) if value is not None else None
            except (urllib.error.URLError, OSError, ValueError):
                continue
        return None

    # ------------------------------------------------------------------ watch

    def watch_prefix(
        self,
        prefix: str,
        start_revision: int,
        stop: threading.Event,
    ) -> Iterator[WatchEvent | WatchResync]:
        """Yield changes under `prefix` from `start_revision`, forever, until `stop` is set.

        Resumes at last revision + 1 after any error, backing off 100 ms → 5 s; after a
        compaction it re-lists the prefix and yields a :class:`WatchResync`.
        """
        rev = start_revision
        backoff = BACKOFF_START
        check_revision = False
        while not stop.is_set():
            items: queue.Queue[Any] = queue.Queue()
            watch_id = None
            client = None
            try:
                client = self.client()
                if check_revision:
                    # etcd restored from an older snapshot (or a new data dir) answers a watch
                    # from a revision in its future by waiting for it: every change until then
                    # would be missed. Seen after reconnecting: re-list instead (issue 19 item 2a)
                    check_revision = False
                    now = self.revision()
                    if now < rev - 1:
                        log.warning("etcd's revision went back from %d to %d (restored from a "
                                    "backup or a new data dir?): re-listing %s", rev - 1, now,
                                    prefix)
                        listed, at = self.list_prefix(prefix)
                        yield WatchResync(tuple(listed), at)
                        rev = at + 1
                watch_id = client.add_watch_prefix_callback(
                    prefix, items.put, start_revision=rev
                )
                backoff = BACKOFF_START
                while not stop.is_set():
                    try:
                        resp = items.get(timeout=0.5)
                    except queue.Empty:
                        continue
                    if resp is None:  # the stream ended without an error (server closed it)
                        raise etcd_exc.ConnectionFailedError()
                    if isinstance(resp, BaseException):
                        raise resp
                    for ev in resp.events:
                        kind = "put" if isinstance(ev, etcd_events.PutEvent) else "delete"
                        yield WatchEvent(kind, ev.key.decode(), ev.value if kind == "put" else b"",
                                         int(ev._event.kv.lease), int(ev.mod_revision))
                        rev = max(rev, int(ev.mod_revision) + 1)
                    rev = max(rev, int(resp.header.revision) + 1)
            except etcd_exc.RevisionCompactedError as exc:
                self.stats.count("compacted")
                log.warning("watch on %s: revision %d compacted (at %d), re-listing", prefix, rev,
                            exc.compacted_revision)
                try:
                    listed, at = self.list_prefix(prefix)
                except RegistryError as lexc:
                    log.warning("re-list failed: %s", lexc)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                yield WatchResync(tuple(listed), at)
                rev = at + 1
            except Exception as exc:  # noqa: BLE001 - every failure means: resume later
                if stop.is_set():
                    break
                kind, msg = _classify(exc)
                self.stats.count(kind)
                self.stats.watch_reconnects += 1
                log.warning("watch on %s broke (%s); resuming at revision %d in %.1f s",
                            prefix, msg, rev, backoff)
                check_revision = True
                if kind in ("unavailable", "timeout", "tls", "other", "auth"):
                    self._drop(rotate=kind in ("unavailable", "timeout", "tls"))
                stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            finally:
                if watch_id is not None and client is not None:
                    try:
                        client.cancel_watch(watch_id)
                    except Exception:  # noqa: BLE001 - channel may be gone already
                        pass


def _registry_is_a_store(registry: Registry) -> Store:
    """mypy checks here that Registry satisfies the Store protocol (never called)."""
    return registry
