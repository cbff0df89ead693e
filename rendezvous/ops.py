"""What operators and their tools read: health, readiness, Prometheus metrics, JSON logs.

``rendezvous serve --ops-port N`` serves, on its own port (loopback by default: put it
behind whatever scrapes it, never on the clients' address):

- ``/healthz``: 200 while the process serves (liveness: restart it if this fails);
- ``/readyz``: 200 when it should be given clients: not draining, its database answers,
  its bus (in a cluster) is connected; else 503 and why (take it out of the rotation);
- ``/metrics``: the hub's counters (``p2pim_<name>_total``) and gauges (connections,
  sessions, users here and elsewhere, nodes seen, the offline store's rows and bytes,
  bus and database state), in Prometheus' text format, labelled with the node.

The database is asked at most once per :data:`DB_CHECK_S` (readiness) and the store's
size once per :data:`STORE_SIZE_S`: a scraper cannot make this node busy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web

from .db import StoreUnavailable

if TYPE_CHECKING:
    from .server import RendezvousServer

DB_CHECK_S = 1.0
STORE_SIZE_S = 30.0


class Ops:
    def __init__(self, server: RendezvousServer, node: str) -> None:
        self.server = server
        self.hub = server.hub
        self.node = node
        self._runner: web.AppRunner | None = None
        self._db_ok = (0.0, False, "")
        self._store_size = (0.0, 0, 0)

    async def start(self, host: str, port: int) -> int:
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/readyz", self._ready)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- checks ---------------------------------------------------------------------------

    def db_ok(self) -> tuple[bool, str]:
        at, ok, why = self._db_ok
        now = time.monotonic()
        if now - at >= DB_CHECK_S:
            try:
                self.hub.db.conn.execute("SELECT 1").fetchone()
                ok, why = True, ""
            except StoreUnavailable as exc:
                ok, why = False, str(exc)
            self._db_ok = (now, ok, why)
        return ok, why

    def not_ready(self) -> list[str]:
        why = []
        if self.server.draining:
            why.append("draining")
        ok, detail = self.db_ok()
        if not ok:
            why.append(f"database: {detail}")
        bus = self.server.bus
        if bus is not None and not bus.connected:
            why.append("bus: not connected")
        return why

    def store_size(self) -> tuple[int, int]:
        at, rows, size = self._store_size
        now = time.monotonic()
        if now - at >= STORE_SIZE_S:
            with contextlib.suppress(StoreUnavailable):  # away: the last figures stand
                rows, size = self.hub.db.store_size()
            self._store_size = (now, rows, size)
        return rows, size

    # -- endpoints -------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _ready(self, request: web.Request) -> web.Response:
        why = self.not_ready()
        if why:
            return web.Response(status=503, text="not ready: " + "; ".join(why) + "\n")
        return web.Response(text="ready\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics(), content_type="text/plain", charset="utf-8")

    def metrics(self) -> str:
        label = f'{{node="{_escape(self.node)}"}}'
        lines: list[str] = []

        def one(name: str, kind: str, value: float, help_: str) -> None:
            lines.extend(
                (
                    f"# HELP p2pim_{name} {help_}",
                    f"# TYPE p2pim_{name} {kind}",
                    f"p2pim_{name}{label} {value:g}",
                )
            )

        for name, value in self.hub.counters.as_dict().items():
            one(f"{name}_total", "counter", value, f"rendezvous counter {name}")
        hub, cluster, bus = self.hub, self.hub.cluster, self.server.bus
        rows, size = self.store_size()
        one("connections", "gauge", self.server.connection_count, "open WebSocket connections")
        one("sessions", "gauge", sum(len(x) for x in hub.online.values()), "logged-in sessions on this node")
        one("users_here", "gauge", len(hub.online), "users with a session on this node")
        one("users_elsewhere", "gauge", len(cluster.users) if cluster else 0, "users on other nodes")
        one("nodes_seen", "gauge", len(cluster.nodes) if cluster else 0, "other nodes heard from")
        one("offline_rows", "gauge", rows, "envelopes in the offline store (all nodes')")
        one("offline_bytes", "gauge", size, "bytes of envelopes in the offline store")
        one("bus_connected", "gauge", int(bus.connected) if bus else 0, "1 if the bus is connected")
        one("bus_dropped_total", "counter", bus.dropped if bus else 0, "bus messages lost (bus away)")
        one("db_up", "gauge", int(self.db_ok()[0]), "1 if the database answers")
        one("draining", "gauge", int(self.server.draining), "1 while draining")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class JsonFormatter(logging.Formatter):
    """One JSON object a line (``--log-format json``): time, level, logger, node, message."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "node": self.node,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)
