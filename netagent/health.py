"""Health and metrics over HTTP, and the systemd watchdog.

``GET /healthz`` answers 200 whenever the process serves requests (liveness); ``GET /readyz``
answers 200 only when every readiness condition holds (lease held, subnet.env written, backend
programmed, masquerade rules in place with ``--ip-masq``) and 503 with the unmet conditions
otherwise; ``GET /metrics`` is the Prometheus text format. flannel's answer texts are kept so
probes written for flanneld keep working (flannel-compat.md §16).

The server runs in its own threads and only *reads* daemon state through callables; it never
writes it (single-writer design, DESIGN.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("netagent.health")

Readiness = Callable[[], Mapping[str, bool]]


class _Handler(BaseHTTPRequestHandler):
    server: HealthServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, b"flanneld is running\n")
        elif path == "/readyz":
            checks = dict(self.server.readiness())
            unmet = [k for k, ok in checks.items() if not ok]
            if checks and not unmet:
                self._send(200, b"flanneld is ready\n")
            else:
                self._send(503, ("flanneld is not ready yet: waiting for "
                                 + ", ".join(unmet or ["start-up"]) + "\n").encode())
        elif path == "/metrics" and self.server.metrics is not None:
            try:
                body = self.server.metrics()
            except Exception:  # noqa: BLE001 - a scrape must not kill the server thread
                log.exception("rendering metrics failed")
                self._send(500, b"metrics failed\n")
                return
            self._send(200, body, "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._send(404, b"not found\n")

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("%s " + format, self.address_string(), *args)


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, readiness: Readiness,
                 metrics: Callable[[], bytes] | None) -> None:
        super().__init__((host, port), _Handler)
        self.readiness = readiness
        self.metrics = metrics
        self._thread: threading.Thread | None = None

    def start(self) -> HealthServer:
        self._thread = threading.Thread(target=self.serve_forever, name="netagent-http",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def start_servers(ip: str, healthz_port: int, metrics_port: int, readiness: Readiness,
                  metrics: Callable[[], bytes] | None) -> list[HealthServer]:
    """One server per distinct non-zero port; each answers all three paths.

    Both listen on ``--healthz-ip``: one flag for "which address does the agent expose".
    """
    servers = []
    for port in sorted({p for p in (healthz_port, metrics_port) if p}):
        srv = HealthServer(ip, port, readiness, metrics).start()
        log.info("serving /healthz /readyz /metrics on %s:%d", ip, port)
        servers.append(srv)
    return servers


# --------------------------------------------------------------------------- watchdog


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between pings systemd expects (half of WATCHDOG_USEC), or None when off.

    sd_watchdog_enabled(3) semantics: WATCHDOG_PID, when set, must be our PID.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6 / 2


class Watchdog:
    """Sends WATCHDOG=1 while `alive()` says the main loop is making progress.

    A separate thread, so long start-up waits (config not yet in etcd) do not get us killed;
    `alive()` turns false when the main loop stops turning, and then we stop pinging and let
    systemd restart us — which is the point of a watchdog.
    """

    def __init__(self, interval: float, alive: Callable[[], bool],
                 notify: Callable[[str], object], stop: threading.Event) -> None:
        self.interval = interval
        self.alive = alive
        self.notify = notify
        self.stop = stop
        self.pings = 0
        self._thread = threading.Thread(target=self._run, name="netagent-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.alive():
                self.notify("WATCHDOG=1")
                self.pings += 1
            else:
                log.error("main loop has not turned for %.1f s; no watchdog ping", 2 * self.interval)
            self.stop.wait(self.interval)


class Heartbeat:
    """The main loop beats; the watchdog asks whether the last beat is recent enough."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.last = time.monotonic()
        self.running = False

    def beat(self) -> None:
        self.last = time.monotonic()
        self.running = True

    def alive(self) -> bool:
        return not self.running or time.monotonic() - self.last < self.limit
