"""The control protocol by hand, for the benchmarks' load generators.

No client database and no `p2pim.Client`: the load must not be the thing
measured. Logins retry when the server sheds load (RATE_LIMITED, as the real
client does), and a connection can come from any loopback address (the server
counts per address) or with a tiny receive buffer (a peer that will stop
reading).
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator

from websockets.asyncio.client import ClientConnection, connect

from p2pim.identity import Identity
from p2pim.wire import control_pb2 as pb

LOGIN_TRIES = 1000


async def frames(ws: ClientConnection, stop: asyncio.Event, poll: float = 0.2) -> AsyncIterator[pb.Frame]:
    """What the server pushes on ``ws``, until ``stop`` is set (looked at every ``poll`` s)."""
    while not stop.is_set():
        try:
            data = await asyncio.wait_for(ws.recv(), poll)
        except TimeoutError:
            continue
        yield pb.Frame.FromString(data)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def open_ws(url: str, local: str | None = None, rcvbuf: int = 0) -> tuple[ClientConnection, bytes]:
    """Connect from ``local`` (default 127.0.0.1); returns the connection and the server's nonce."""
    kwargs: dict[str, object] = {}
    if rcvbuf:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((local or "127.0.0.1", 0))
        host, port = url.removeprefix("ws://").rsplit(":", 1)
        sock.connect((host, int(port)))
        sock.setblocking(False)
        kwargs.update(sock=sock, max_queue=1)
    elif local:
        kwargs["local_addr"] = (local, 0)
    ws = await connect(
        url,
        compression=None,
        max_size=None,
        ping_interval=None,
        open_timeout=30,
        **kwargs,  # type: ignore[arg-type]
    )
    first = pb.Frame.FromString(await ws.recv())  # type: ignore[arg-type]
    if first.WhichOneof("body") != "challenge":
        await ws.close()
        raise RuntimeError(f"{url} did not greet us with a challenge")
    return ws, first.challenge.nonce


async def reply_to(ws: ClientConnection, rid: int) -> pb.Frame:
    """The reply to request ``rid`` (pushes before it are skipped)."""
    while True:
        frame = pb.Frame.FromString(await ws.recv())  # type: ignore[arg-type]
        if frame.id == rid:
            return frame


async def login(
    url: str, name: str, ident: Identity, password: str, local: str | None = None, rcvbuf: int = 0
) -> ClientConnection:
    """Log in with the password, waiting out RATE_LIMITED answers."""
    ws, nonce = await open_ws(url, local, rcvbuf)
    sig = ident.sign_login(nonce, name)
    for rid in range(1, LOGIN_TRIES):
        frame = pb.Frame(id=rid, login=pb.Login(username=name, password=password, signature=sig))
        await ws.send(frame.SerializeToString())
        reply = await reply_to(ws, rid)
        if reply.WhichOneof("body") == "login_ok":
            return ws
        if reply.error.code != pb.RATE_LIMITED:
            raise RuntimeError(f"login {name}: {reply.error.message}")
        await asyncio.sleep(max(0.05, reply.error.retry_after_ms / 1000) * random.uniform(0.5, 1.5))
    raise RuntimeError(f"login {name}: still refused")
