"""What the app's page may ask of the long-lived client, and what it is told.

The page speaks JSON over one WebSocket: requests ``{"id": 7, "op": "send", ...}`` get
``{"id": 7, "ok": ...}`` or ``{"id": 7, "error": "..."}``; everything the client says comes
as the same objects ``--json`` prints (:func:`p2pim.cli.render.event_line`), so the page,
``listen --json`` and scripts read one format. The bridge holds no state of its own beyond
the pages: the history, unread marks and transfers are the profile's SQLite, the same the
CLI uses, so closing the window loses nothing.

Every op is bounded (text sizes are the client's own limits; history pages at most
:data:`MAX_HISTORY`), and a bad request is an error answer, never the end of the loop that
serves the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..cli.files import transfer_json
from ..cli.render import event_line
from ..client import Client, ClientError, Unreachable
from ..groups.seal import label
from ..identity import fingerprint

log = logging.getLogger(__name__)
MAX_HISTORY = 500
MAX_PAGES = 8  # pages (tabs) connected at once
PAGE_QUEUE = 1000  # events waiting for a page that is slow to take them; past it, it reloads
# Events that add a line to a conversation's history, and those that can end a transfer.
LANDS = {"message", "group_message", "file_offered", "file_answered", "file_done", "file_failed"}
ENDS = {"file_answered", "file_done", "file_failed"}


class AppError(Exception):
    """A request the page made that cannot be done (said back to the page)."""


class Bridge:
    def __init__(self, client: Client, downloads: Path, lan: Any = None, uploads: Path | None = None) -> None:
        """``lan``: a started :class:`p2pim.lan.node.LanNode` (``p2pim app --lan``): its peers
        are listed and written to beside the buddies, "lan:NAME". ``uploads``: where files
        dropped on the page wait while they are offered (each goes once its transfer ends)."""
        self.client = client
        self.downloads = downloads
        self.uploads = uploads
        self.lan = lan
        self.pages: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self.counters = {"bad_requests": 0, "pages_behind": 0}
        self._open: str = ""  # the conversation the page shows: what comes there is read
        self._keep: set[asyncio.Task[None]] = set()  # links and the LAN pump, while they run
        self._linking: asyncio.Task[None] | None = None
        self._ops: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "state": self.state,
            "history": self.history,
            "send": self.send,
            "read": self.read,
            "open": self.open,
            "buddy": self.buddy,
            "trust": self.trust,
            "file": self.file,
            "group": self.group,
            "devices": self.devices,
            "link": self.link,
            "account": self.account,
            "nat": self.nat,
        }
        self._nat: asyncio.Lock = asyncio.Lock()  # one diagnosis at a time

    # -- pages ---------------------------------------------------------------------------

    def attach(self) -> tuple[int, asyncio.Queue[dict[str, Any]]]:
        if len(self.pages) >= MAX_PAGES:
            raise AppError(f"at most {MAX_PAGES} windows at once")
        key = id(object())
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(PAGE_QUEUE)
        self.pages[key] = queue
        return key, queue

    async def close(self) -> None:
        for task in list(self._keep):
            task.cancel()
        await asyncio.gather(*self._keep, return_exceptions=True)

    def detach(self, key: int) -> None:
        self.pages.pop(key, None)

    def tell(self, data: dict[str, Any]) -> None:
        for queue in self.pages.values():
            try:
                queue.put_nowait(data)
            except asyncio.QueueFull:  # the page will ask for the state again
                self.counters["pages_behind"] += 1

    async def pump(self) -> None:
        """The client's events (and the LAN's), to every page; what comes into the open
        conversation is read."""
        if self.lan is not None:
            self._keep.add(asyncio.get_running_loop().create_task(self._pump_lan()))
        async for ev in self.client.events():
            data, _ = event_line(ev)
            self.tell(data)
            kind = data.get("event")
            if kind in ENDS:
                self._tidy(str(data.get("id", "")))
            # A text, a group post, a file's offer or answer: whatever lands in the open
            # conversation's history is read there (and its sender told).
            if kind in LANDS and self._open and self.client.store.unread(self._open):
                with contextlib.suppress(ClientError, Unreachable):
                    await self.read({"peer": self._open})

    def _tidy(self, file_id: str) -> None:
        """A dropped file's copy goes once its transfer is over (done, declined, cancelled, failed)."""
        if self.uploads is None or not file_id:
            return
        try:
            t = self.client.find_file(file_id)
        except ClientError:
            return
        path = Path(t.path)
        if t.outgoing and t.final and path.parent.parent == self.uploads:
            with contextlib.suppress(OSError):
                path.unlink()
                path.parent.rmdir()

    async def _pump_lan(self) -> None:
        from ..lan.core import PREFIX

        while True:
            data, _ = event_line(await self.lan.events.get())
            if data.get("event") == "message":
                data["from"] = PREFIX + str(data["from"])  # "lan:bob", as the page names LAN peers
            self.tell(data)

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request from a page: its answer (with the request's id)."""
        rid = request.get("id")
        op = self._ops.get(str(request.get("op")))
        try:
            if op is None:
                raise AppError(f"no such request: {request.get('op')!r}")
            return {"id": rid, "ok": await op(request)}
        except (AppError, ClientError, ValueError, KeyError, TypeError) as exc:
            self.counters["bad_requests"] += 1
            message = exc.message if isinstance(exc, ClientError) else str(exc)
            return {"id": rid, "error": message or type(exc).__name__}

    # -- what the page asks ----------------------------------------------------------------

    async def state(self, req: dict[str, Any]) -> dict[str, Any]:
        """Everything the left column shows: buddies, groups, transfers, who we are."""
        c = self.client
        buddies = await c.buddies() if c.connected else []
        paths = c.store.paths()
        listed = []
        for b in buddies:
            via, addr, rtt = c.path_to(b.username) if b.presence != "offline" else ("", "", None)
            row = paths.get(b.username)
            contact = c.store.contact(b.username)
            pinned = fingerprint(contact.identity_key) if contact else b.fingerprint
            offered = fingerprint(contact.offered_key) if contact and contact.offered_key else ""
            listed.append({
                "name": b.username, "state": b.state, "presence": b.presence, "last_seen_ms": b.last_seen_ms,
                "fingerprint": pinned, "offered": offered, "key_warning": b.key_warning,
                "unread": len(c.store.unread(b.username)),
                "path": {"via": via or (row.via if row else ""), "addr": addr, "rtt_ms": rtt},
            })  # fmt: skip
        groups = []
        for g in c.groups.store.groups():
            if g.role == "gone":
                continue
            members = c.groups.store.members(g.gid)
            groups.append({
                "gid": g.gid.hex(), "name": g.name, "role": g.role, "peer": label(g.gid),
                "members": [{"name": m, "role": r} for m, r in members.items()],
                "unread": len(c.store.unread(label(g.gid))),
            })  # fmt: skip
        return {
            "me": c.username, "server": c.server, "connected": c.connected,
            "fingerprint": c.profile.identity.fingerprint, "buddies": listed, "groups": groups,
            "transfers": [transfer_json(t) for t in c.transfers()[-50:]], "devices": c.device_count,
            "lan": self._lan_peers(),
        }  # fmt: skip

    def _lan_peers(self) -> list[dict[str, Any]]:
        if self.lan is None:
            return []
        from ..lan.core import PREFIX

        return [
            {**p.as_dict(), "peer": PREFIX + p.name, "unread": len(self.client.store.unread(PREFIX + p.name))}
            for p in sorted(self.lan.core.peers.values(), key=lambda p: p.name)
        ]

    async def history(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        peer = str(req["peer"])
        limit = min(int(req.get("limit", 100)), MAX_HISTORY)
        return [
            {"msg_id": r.msg_id.hex(), "outgoing": r.outgoing, "text": r.text, "sent_at_ms": r.sent_at_ms,
             "state": r.state, "author": r.author}
            for r in self.client.history(peer, limit)
        ]  # fmt: skip

    async def send(self, req: dict[str, Any]) -> str:
        to, text = str(req["to"]), str(req["text"])
        if not text.strip():
            raise AppError("nothing to send")
        if to.startswith("lan:"):
            from ..lan.core import LanError

            if self.lan is None:
                raise AppError("this app does not run on the LAN (p2pim app --lan)")
            try:
                return bytes(self.lan.send(to.removeprefix("lan:"), text)).hex()
            except LanError as exc:
                raise AppError(str(exc)) from None
        return (await self.client.send(to, text)).hex()

    async def open(self, req: dict[str, Any]) -> int:
        """The page shows this conversation now: what is unread there is read (told to the
        sender as read receipts), and what comes there later too."""
        self._open = str(req.get("peer", ""))
        return await self.read({"peer": self._open}) if self._open else 0

    async def read(self, req: dict[str, Any]) -> int:
        peer = str(req["peer"])
        if not peer.startswith(("#", "lan:", "ipmsg:")):
            return await self.client.mark_read(peer)  # a buddy: read receipts go back
        unread = self.client.store.unread(peer)
        if unread and peer.startswith("#"):  # its posts' senders see "read by"
            with contextlib.suppress(ClientError, Unreachable):
                await self.client.groups.mark_read(bytes.fromhex(peer[1:]), unread)
        elif unread:  # the LAN: no read receipts there
            self.client.store.mark_read(unread)
        return len(unread)

    async def buddy(self, req: dict[str, Any]) -> bool:
        action, user = str(req["action"]), str(req["user"])
        do = {
            "add": self.client.buddy_add, "accept": self.client.buddy_accept,
            "decline": self.client.buddy_decline, "remove": self.client.buddy_remove,
        }.get(action)  # fmt: skip
        if do is None:
            raise AppError(f"no buddy action {action!r}")
        await do(user)
        return True

    async def trust(self, req: dict[str, Any]) -> bool:
        return self.client.trust(str(req["user"]))

    async def file(self, req: dict[str, Any]) -> dict[str, Any]:
        action, c = str(req["action"]), self.client
        t = c.find_file(str(req["file_id"]))
        if action == "accept":
            t = await c.accept_file(t.file_id, self.downloads)
        elif action == "decline":
            t = await c.decline_file(t.file_id)
        elif action == "cancel":
            t = await c.cancel_file(t.file_id)
        else:
            raise AppError(f"no file action {action!r}")
        return transfer_json(t)

    async def offer(self, peer: str, path: Path) -> dict[str, Any]:
        """A file the page dropped (uploaded to the app first): offer it to ``peer``."""
        return transfer_json(await self.client.send_file(peer, path))

    async def group(self, req: dict[str, Any]) -> Any:
        g, action = self.client.groups, str(req["action"])
        if action == "create":
            row = await g.create(str(req["name"]), [str(u) for u in req.get("members", [])][:256])
            return {"gid": row.gid.hex(), "name": row.name}
        group = str(req["group"])
        if action in ("accept", "decline"):
            await g.answer(group, action == "accept")
        elif action == "invite":
            await g.invite(group, str(req["user"]))
        elif action == "leave":
            await g.leave(group)
        elif action == "remove":
            await g.remove(group, str(req["user"]))
        else:
            raise AppError(f"no group action {action!r}")
        await g.refresh()
        return True

    async def devices(self, req: dict[str, Any]) -> Any:
        if req.get("action") == "remove":
            await self.client.devices.remove(int(req["device_id"]))
        return [asdict(d) for d in await self.client.devices.list()]

    async def link(self, req: dict[str, Any]) -> dict[str, Any]:
        """Show a link code (as an event) and wait for the new device, in the background;
        one link at a time."""
        if self._linking is not None and not self._linking.done():
            raise AppError("a link is waiting for its device already")
        shown: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            try:
                row = await self.client.devices.link(lambda code: shown.set_result(code))
                self.tell({"event": "device_linked", "device_id": row.device_id, "name": row.name})
            except ClientError as exc:
                if not shown.done():
                    shown.set_exception(exc)
                self.tell({"event": "link_failed", "reason": exc.message})

        task = self._linking = asyncio.get_running_loop().create_task(run())
        self._keep.add(task)
        task.add_done_callback(self._keep.discard)
        return {"code": await asyncio.wait_for(shown, 20)}

    async def account(self, req: dict[str, Any]) -> dict[str, Any]:
        a = self.client.account
        action = str(req.get("action", "show"))
        if action == "email":
            state = await a.set_email(str(req["email"]))
        elif action == "verify":
            state = await a.verify(str(req["code"]))
        elif action == "notify":
            state = await a.notify(bool(req["on"]), int(req.get("delay_s", 0)), int(req.get("period_s", 0)))
        else:
            state = await a.info()
        return asdict(state)

    async def nat(self, req: dict[str, Any]) -> dict[str, Any]:
        """`p2pim nat` against the rendezvous's STUN service: the report, its table, and what
        it means in words."""
        from ..nat.classify import ADVICE
        from ..nat.discovery import Timings
        from ..nat.runner import discover

        if not self.client.stun_servers:
            raise AppError("this rendezvous runs no STUN service: try p2pim nat --server HOST")
        if self._nat.locked():
            raise AppError("a diagnosis is running already")
        async with self._nat:
            report = await discover(self.client.stun_servers[0], Timings())
        return {"report": report.to_json(), "table": report.render(), "advice": ADVICE[report.label]}
