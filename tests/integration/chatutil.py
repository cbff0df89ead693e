"""Helpers for messaging tests: clients on real profiles, raw control connections, event waits."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from pathlib import Path
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection

from bench.wire import open_ws
from p2pim.client import Client, Event
from p2pim.identity import Identity
from p2pim.profile import Profile
from p2pim.wire import control_pb2 as pb

PASSWORD = "correct horse"
E = TypeVar("E")
_ids = itertools.count(1)


async def new_user(url: str, root: Path, name: str, register: bool = True, **opts: Any) -> Client:
    """``opts``: for :class:`Client` (``direct=False``: everything through the server)."""
    client = Client(url, Profile(name, root / "profiles"), **opts)
    await client.connect()
    if register:
        await client.register(name, PASSWORD)
    await client.login(name, PASSWORD)
    return client


async def users(url: str, root: Path, *names: str) -> list[Client]:
    """New accounts, each logged in on a client of its own."""
    return [await new_user(url, root, name) for name in names]


async def relogin(url: str, root: Path, name: str, **opts: Any) -> Client:
    """A fresh client process for an existing profile (token login)."""
    client = Client(url, Profile(name, root / "profiles"), **opts)
    await client.connect()
    await client.login(name)
    return client


async def befriend(a: Client, b: Client) -> None:
    await a.buddy_add(b.username)
    await b.buddy_accept(a.username)
    await wait_for(a, _is_presence(b.username, "online"))


def _is_presence(peer: str, status: str) -> Any:
    from p2pim.client import PresenceChange

    return lambda ev: isinstance(ev, PresenceChange) and ev.peer == peer and ev.status == status


async def wait_for(client: Client, pred: Any, timeout: float = 10.0) -> Event:
    """The first event matching ``pred`` (others are skipped)."""

    async def scan() -> Event:
        async for ev in client.events():
            if pred(ev):
                return ev
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(scan(), timeout)


async def collect(client: Client, kind: type[E], count: int, timeout: float = 15.0) -> list[E]:
    """``count`` events of ``kind``, then anything more of that kind arriving within 0.5 s."""
    got: list[E] = []

    async def scan() -> None:
        async for ev in client.events():
            if isinstance(ev, kind):
                got.append(ev)
                if len(got) >= count:
                    return

    await asyncio.wait_for(scan(), timeout)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(scan(), 0.5)
    return got


class Raw:
    """A hand-driven control connection, for what a well-behaved client never sends."""

    def __init__(self, ws: ClientConnection, nonce: bytes) -> None:
        self.ws, self.nonce = ws, nonce

    @classmethod
    async def open(cls, url: str, local: str | None = None, rcvbuf: int = 0) -> Raw:
        """Connect from ``local`` (a 127.x address: another source IP), optionally with a tiny
        receive buffer and no read-ahead (``rcvbuf``: a peer that will stop reading)."""
        return cls(*await open_ws(url, local, rcvbuf))

    async def request(self, **body: Any) -> pb.Frame:
        frame = pb.Frame(id=next(_ids), **body)
        await self.ws.send(frame.SerializeToString())
        while True:
            reply = pb.Frame.FromString(await asyncio.wait_for(self.ws.recv(), 10))  # type: ignore[arg-type]
            if reply.id == frame.id:
                return reply

    async def login(self, name: str, identity: Identity, password: str = PASSWORD) -> pb.Frame:
        sig = identity.sign_login(self.nonce, name)
        return await self.request(login=pb.Login(username=name, password=password, signature=sig))

    async def recv(self, timeout: float = 10.0) -> pb.Frame:
        return pb.Frame.FromString(await asyncio.wait_for(self.ws.recv(), timeout))  # type: ignore[arg-type]


async def gather_for(client: Client, kind: type[E], seconds: float) -> list[E]:
    """Every event of ``kind`` within ``seconds`` (none is fine)."""
    got: list[E] = []

    async def scan() -> None:
        async for ev in client.events():
            if isinstance(ev, kind):
                got.append(ev)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(scan(), seconds)
    return got


async def until(cond: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until ``cond()`` is true (checked every 20 ms); fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Recorder:
    """Every event of a client, kept in order while the test does other things."""

    def __init__(self, client: Client) -> None:
        self.events: list[Event] = []
        self._task = asyncio.create_task(self._run(client))

    async def _run(self, client: Client) -> None:
        async for ev in client.events():
            self.events.append(ev)

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]

    def stop(self) -> None:
        self._task.cancel()
