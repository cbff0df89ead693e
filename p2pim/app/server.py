"""The app's web server: one page and its WebSocket, on 127.0.0.1 only, for one browser
tab that knows this run's token.

Who may drive the client: only a page that holds the per-run token (32 random bytes,
in the URL the app opens, never written anywhere). Every request must carry it (query
``t`` or header ``X-P2PIM-Token``, compared in constant time); the ``Host`` header must be
this server's own address (``127.0.0.1:PORT`` or ``localhost:PORT``), which defeats DNS
rebinding (a hostile page whose name now points at 127.0.0.1 sends its own Host); the
WebSocket's ``Origin`` must be this server; no CORS header is ever sent, so another
origin's script cannot read an answer. The page itself carries a Content-Security-Policy
that allows only its own inline script (by nonce) and its own WebSocket, and may not be
framed.

The page's HTML, CSS and JS are files in ``static/``, inlined into the one page at start:
nothing is fetched from anywhere else, no build step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from .bridge import AppError, Bridge

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_UPLOAD = 4 * 1024**3  # a dropped file (the transfer has no limit of its own below this)
MAX_WS_MESSAGE = 64 * 1024  # one request from the page
MAX_WORKING = 16  # requests of one page being answered at once


class AppServer:
    def __init__(self, bridge: Bridge, host: str = "127.0.0.1") -> None:
        """``bridge.uploads``: where dropped files are kept while they are offered."""
        self.bridge = bridge
        self.host = host
        self.token = secrets.token_urlsafe(32)
        assert bridge.uploads is not None
        self.upload_dir = bridge.uploads
        self.port = 0
        self.refused = {"token": 0, "host": 0, "origin": 0}
        self._runner: web.AppRunner | None = None
        self._pump: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/?t={self.token}"

    async def start(self, port: int = 0) -> None:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_UPLOAD)
        app.router.add_get("/", self._page)
        app.router.add_get("/ws", self._socket)
        app.router.add_post("/upload", self._upload)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        self._pump = asyncio.get_running_loop().create_task(self.bridge.pump())

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        await self.bridge.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- who may ask ---------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.host not in (f"127.0.0.1:{self.port}", f"localhost:{self.port}"):
            self.refused["host"] += 1
            return web.Response(status=421, text="wrong Host: this app answers only to its own address\n")
        given = request.query.get("t") or request.headers.get("X-P2PIM-Token") or ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            self.refused["token"] += 1
            return web.Response(status=403, text="open the app from the address p2pim app printed\n")
        response: web.StreamResponse = await handler(request)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"  # the token stays in this page
        return response

    def _origin_ok(self, request: web.Request) -> bool:
        return request.headers.get("Origin", "") in (
            f"http://127.0.0.1:{self.port}",
            f"http://localhost:{self.port}",
        )

    # -- the page ----------------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.Response:
        nonce = secrets.token_urlsafe(16)
        html = (STATIC / "index.html").read_text()
        html = html.replace("/*CSS*/", (STATIC / "app.css").read_text())
        html = html.replace("/*JS*/", (STATIC / "app.js").read_text()).replace("NONCE", nonce)
        csp = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; img-src data:; "
            f"connect-src 'self' ws://{request.host}; frame-ancestors 'none'; base-uri 'none'; "
            "form-action 'none'"
        )
        return web.Response(
            text=html,
            content_type="text/html",
            headers={"Content-Security-Policy": csp, "X-Frame-Options": "DENY"},
        )

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        if not self._origin_ok(request):
            self.refused["origin"] += 1
            return web.Response(status=403, text="this WebSocket is for the app's own page\n")
        try:
            key, queue = self.bridge.attach()
        except AppError as exc:
            return web.Response(status=429, text=f"{exc}\n")
        ws = web.WebSocketResponse(max_msg_size=MAX_WS_MESSAGE, heartbeat=30)
        await ws.prepare(request)
        loop = asyncio.get_running_loop()
        sender = loop.create_task(self._send(ws, queue))
        working: set[asyncio.Task[None]] = set()  # requests answered as they finish (a link waits)
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    req = json.loads(msg.data)
                    if not isinstance(req, dict):
                        raise ValueError("a request is a JSON object")
                except ValueError:
                    self.bridge.counters["bad_requests"] += 1
                    await ws.send_json({"error": "not a JSON request"})
                    continue
                if len(working) >= MAX_WORKING:
                    await ws.send_json({"id": req.get("id"), "error": "too many requests at once"})
                    continue
                task = loop.create_task(self._answer(req, queue))
                working.add(task)
                task.add_done_callback(working.discard)
        finally:
            self.bridge.detach(key)
            sender.cancel()
            for task in working:
                task.cancel()
        return ws

    async def _answer(self, req: dict[str, Any], queue: asyncio.Queue[dict[str, Any]]) -> None:
        answer = await self.bridge.handle(req)
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(answer)

    async def _send(self, ws: web.WebSocketResponse, queue: asyncio.Queue[dict[str, Any]]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await ws.send_json(await queue.get())

    async def _upload(self, request: web.Request) -> web.Response:
        """A file dropped on the composer: kept in the profile's uploads, then offered."""
        to = request.query.get("to", "")
        reader = await request.multipart()
        part = await reader.next()
        if to.startswith("#") or not to or part is None or not hasattr(part, "filename") or not part.filename:
            return web.json_response({"error": "drop a file on a buddy's conversation"}, status=400)
        name = Path(part.filename).name or "file"
        self.upload_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.upload_dir, prefix=".up-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := await part.read_chunk(1 << 20):  # type: ignore[union-attr]
                    out.write(chunk)
            folder = Path(tempfile.mkdtemp(dir=self.upload_dir))
            path = folder / name
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return web.json_response({"error": f"cannot keep the file: {exc.strerror}"}, status=507)
        try:
            return web.json_response({"ok": await self.bridge.offer(to, path)})
        except Exception as exc:  # said to the page; the app carries on, the copy goes
            with contextlib.suppress(OSError):
                path.unlink()
                folder.rmdir()
            message = getattr(exc, "message", "") or str(exc)
            return web.json_response({"error": message}, status=400)
