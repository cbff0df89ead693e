"""``p2pim app``: the long-lived client (paths, transfers, receipts) with its window in the
browser (:mod:`p2pim.app`). One long-lived session per profile: the app will not start
beside a running ``listen``/``chat`` (they move the file bytes), and they will not start
beside the app."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import webbrowser
from pathlib import Path
from typing import Any

APP_LOCK = "app.lock"


def add_parsers(sub: Any, common: argparse.ArgumentParser, udp: argparse.ArgumentParser) -> None:
    p = sub.add_parser("app", parents=[common, udp], help="the messenger in a browser window (local only)")
    p.add_argument("--port", type=int, default=0, help="local port for the page (default: any free one)")
    p.add_argument("--no-browser", action="store_true", help="print the address instead of opening it")
    p.add_argument(
        "--lan", action="store_true", help="also chat on the LAN (p2pim peers, IP Messenger clients)"
    )
    p.add_argument("--lan-interface", help="the LAN's network interface (default: every one)")


def app_running(profile_dir: Path) -> bool:
    """Whether ``p2pim app`` runs on this profile now (it holds its lock)."""
    from p2pim.profile import try_lock

    fd = try_lock(profile_dir / APP_LOCK)
    if fd is None:
        return True
    os.close(fd)  # releases the lock we took just now
    return False


def cmd_app(args: argparse.Namespace) -> int:
    from p2pim.app.bridge import Bridge
    from p2pim.app.server import AppServer
    from p2pim.files.disk import download_dir
    from p2pim.profile import try_lock

    from .chat import ChatError, _out, _run

    async def body(c: Any) -> int:
        fd = try_lock(c.profile.path / APP_LOCK)
        if fd is None:
            raise ChatError(f"p2pim app runs on profile {c.profile.name} already", 2)
        try:
            if not c.files.moving:
                raise ChatError(
                    f"another session (p2pim listen or chat) runs on profile {c.profile.name}: stop it first",
                    2,
                )
            c.reconnect = True
            lan = await _lan(c, args) if args.lan else None
            server = AppServer(Bridge(c, download_dir(), lan, c.profile.path / "uploads"))
            try:
                await server.start(args.port)
            except OSError as exc:
                raise ChatError(f"cannot serve the page on port {args.port}: {exc.strerror}", 2) from None
            _out(args, {"url": server.url}, f"p2pim app for {c.username}: {server.url}\n(Ctrl-C to stop)")
            if not args.no_browser:
                await asyncio.get_running_loop().run_in_executor(None, webbrowser.open, server.url)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                await stop.wait()
            finally:
                await server.close()
                if lan is not None:
                    await lan.close()
            return 0
        finally:
            os.close(fd)

    with contextlib.suppress(KeyboardInterrupt):
        return _run(args, body)
    return 0


async def _lan(c: Any, args: argparse.Namespace) -> Any:
    """The LAN node beside the client, as `p2pim lan` runs it, named as the account."""
    from p2pim.lan.core import LanCore
    from p2pim.lan.node import LanNode, LanNodeError

    from .chat import ChatError

    core = LanCore(c.profile.identity, c.username, c.store, 0, host=os.uname().nodename or "p2pim")
    try:
        node = LanNode(core, args.lan_interface, 2426, 2425)
        node.start(0)
    except LanNodeError as exc:
        raise ChatError(str(exc), 2) from None
    await node.enable_files(c.profile.path, None)
    return node


COMMANDS = {"app": cmd_app}
