"""``p2pim lan``: chat on the local network with no server.

``p2pim lan`` is interactive (type ``NAME: text``, or ``/to NAME`` and then
plain lines; ``/peers``; ``/quit``); ``p2pim lan send NAME TEXT`` and ``p2pim
lan peers`` are for scripts; ``p2pim lan history [NAME]`` reads the kept
conversations (no network). Exit codes as for the other commands: 0 ok,
2 usage, 3 peer not found or not answering, 8 key changed, 9 not delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import files
from .render import event_line, print_history

EXIT_NOT_FOUND = 3
EXIT_KEY_CHANGED = 8
EXIT_FAILED = 9


def add_parser(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--profile", default=os.environ.get("P2PIM_PROFILE", "default"), help="profile name")
    common.add_argument("--name", help="your name on the LAN (default: your p2pim username, else your login)")
    common.add_argument("--interface", help="use only this network interface (e.g. eth0)")
    common.add_argument("--port", type=int, default=0, help="UDP port for messages (default: any)")
    common.add_argument("--discovery-port", type=int, default=2426, help="discovery port (default 2426)")
    common.add_argument("--ipmsg-port", type=int, default=2425, help="IP Messenger port (default 2425)")
    common.add_argument("--no-ipmsg", action="store_true", help="do not talk to IP Messenger clients")
    common.add_argument("--interval", type=float, default=10.0, help="seconds between announcements (10)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    lan = sub.add_parser(
        "lan", parents=[common], help="chat on the LAN with no server (also with IP Messenger)"
    )
    lan.add_argument(
        "--linger", type=float, default=10.0, help="at end of input, wait this long for receipts"
    )
    lan.add_argument("--auto-accept", action="store_true", help="accept every p2pim peer's file offer")
    lan.add_argument("--dir", type=Path, help="where files go (default $XDG_DOWNLOAD_DIR or ~/Downloads)")
    lsub = lan.add_subparsers(dest="lan_action")
    p = lsub.add_parser("send", parents=[common], help="send one message to NAME on the LAN")
    p.add_argument("peer")
    p.add_argument("text", nargs="+")
    p.add_argument("--wait", type=float, default=5.0, help="seconds to find NAME and get its receipt (5)")
    p = lsub.add_parser("peers", parents=[common], help="who is on the LAN")
    p.add_argument("--wait", type=float, default=1.5, help="seconds to listen for answers (1.5)")
    p = lsub.add_parser("trust", parents=[common], help="accept NAME's new key after checking it with them")
    p.add_argument("peer")
    p = lsub.add_parser(
        "history", parents=[common], help="conversations on the LAN, or the one with NAME (no network)"
    )
    p.add_argument("peer", nargs="?")
    p.add_argument("--limit", type=int, default=50)


class _Fail(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def cmd_lan(args: argparse.Namespace) -> int:
    from p2pim.messaging.store import ClientStore
    from p2pim.profile import Profile, ProfileError

    if (
        not 0 <= args.port <= 65535
        or not 0 < args.discovery_port <= 65535
        or not 0 < args.ipmsg_port <= 65535
    ):
        print("p2pim: ports are 1-65535", file=sys.stderr)
        return 2
    if args.interval < 0.2:
        print("p2pim: --interval must be at least 0.2 s", file=sys.stderr)
        return 2
    try:
        profile = Profile(args.profile)
    except ProfileError as exc:
        print(f"p2pim: {exc}", file=sys.stderr)
        return 2
    store = ClientStore(profile.path / "lan.db")
    try:
        if args.lan_action == "trust":
            ok = store.trust_offered_key("lan:" + args.peer, int(time.time() * 1000))
            print(f"trusting {args.peer}'s new key" if ok else f"no new key from {args.peer} to trust")
            return 0 if ok else EXIT_NOT_FOUND
        name = args.name or _default_name(profile)
        if args.lan_action == "history":
            return _history(args, store, name)
        from p2pim.lan.announce import valid_name

        if not valid_name(name):
            print(
                f"p2pim: {name!r} cannot be a LAN name (1-64 printable characters, no ':' or '@')",
                file=sys.stderr,
            )
            return 2
        try:
            return asyncio.run(_main(args, profile, store, name))
        except _Fail as exc:
            print(f"p2pim: {exc}", file=sys.stderr)
            return exc.code
        except KeyboardInterrupt:
            return 0
    finally:
        store.close()


def _history(args: argparse.Namespace, store: Any, me: str) -> int:
    """Kept LAN conversations: p2pim peers under "lan:", IP Messenger ones under "ipmsg:"."""
    from p2pim.lan.core import PREFIX
    from p2pim.lan.ipmsg_messages import PREFIX as IPMSG_PREFIX
    from p2pim.lan.ipmsg_messages import called

    talks = store.conversations((PREFIX, IPMSG_PREFIX))
    if args.peer is None:
        listed = [
            {
                "peer": peer.split(":", 1)[1],
                "kind": "p2pim" if peer.startswith(PREFIX) else "ipmsg",
                "messages": count,
                "last_ms": last,
            }
            for peer, count, last in talks
        ]
        if args.json:
            print(json.dumps(listed))
            return 0
        if not listed:
            print("no LAN conversations yet")
        for t in listed:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(int(t["last_ms"]) / 1000))
            kind = "" if t["kind"] == "p2pim" else "  [IP Messenger]"
            print(f"  {t['peer']:<28} {t['messages']:>5} messages, last {when}{kind}")
        return 0
    names = [peer for peer, _, _ in talks]
    lan = [PREFIX + args.peer] if PREFIX + args.peer in names else []
    ipmsg_names = [n.removeprefix(IPMSG_PREFIX) for n in names if n.startswith(IPMSG_PREFIX)]
    # an exact name on either road; an IP Messenger nickname alone only if no LAN name matches
    want = lan + [IPMSG_PREFIX + n for n in called(args.peer, ipmsg_names) if not lan or n == args.peer]
    if len(want) > 1:
        print(
            f"p2pim: {args.peer!r} is more than one peer: {', '.join(w.split(':', 1)[1] for w in want)}",
            file=sys.stderr,
        )
        return 2
    peer = want[0] if want else PREFIX + args.peer
    print_history(store.history(peer, args.limit), me, peer.split(":", 1)[1], args.json)
    return 0


def _default_name(profile: Any) -> str:
    from p2pim.messaging.store import ClientStore

    if profile.db_path.exists():
        store = ClientStore(profile.db_path)
        account = store.account()
        store.close()
        if account is not None:
            return str(account[1])
    return getpass.getuser()


async def _main(args: argparse.Namespace, profile: Any, store: Any, name: str) -> int:
    from p2pim.lan.core import LanCore
    from p2pim.lan.node import LanNode, LanNodeError

    core = LanCore(
        profile.identity, name, store, 0, interval=args.interval, ipmsg_enabled=not args.no_ipmsg,
        host=os.uname().nodename or "p2pim",
    )  # fmt: skip
    try:
        node = LanNode(core, args.interface, args.discovery_port, args.ipmsg_port)
        node.start(args.port)
    except LanNodeError as exc:
        raise _Fail(str(exc), 2) from None
    try:
        if args.lan_action == "peers":
            return await _peers(args, node)
        if args.lan_action == "send":
            return await _send(args, node)
        from p2pim.files.disk import download_dir

        auto = (args.dir or download_dir()) if args.auto_accept else None
        await node.enable_files(profile.path, auto)
        return await _interactive(args, node, name)
    finally:
        await node.close()


def _print(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if args.json else text, flush=True)


async def _peers(args: argparse.Namespace, node: Any) -> int:
    await asyncio.sleep(args.wait)
    peers = sorted(node.core.peers.values(), key=lambda p: p.name)
    if args.json:
        print(json.dumps([p.as_dict() for p in peers]))
        return 0
    if not peers:
        print("nobody else on this LAN (yet)")
    for p in peers:
        kind = "p2pim, encrypted" if p.encrypted else f"{p.client}, unencrypted"
        flag = "  KEY CHANGED" if p.key_changed else ""
        flag += "  (away)" if p.away else ""
        print(f"  {p.name:<24} {p.addr[0]:<15} {kind}{flag}")
    return 0


async def _send(args: argparse.Namespace, node: Any) -> int:
    from p2pim.lan import core as lc
    from p2pim.messaging.events import Outcome

    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.wait
    while node.core.find(args.peer) is None and loop.time() < deadline:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(node.events.get(), max(0.0, deadline - loop.time()))
    text = " ".join(args.text)
    try:
        msg_id = node.send(args.peer, text)
    except lc.LanError as exc:
        code = EXIT_KEY_CHANGED if "key changed" in str(exc) else EXIT_NOT_FOUND
        raise _Fail(str(exc), code) from None
    while loop.time() < deadline:
        try:
            ev = await asyncio.wait_for(node.events.get(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            break
        if isinstance(ev, Outcome) and ev.msg_id == msg_id and ev.state == "delivered":
            _print(args, {"msg_id": msg_id.hex(), "state": "delivered"}, f"delivered to {args.peer}")
            return 0
        if isinstance(ev, Outcome) and ev.msg_id == msg_id:
            raise _Fail(f"not delivered: {ev.detail}", EXIT_FAILED)
    _print(
        args,
        {"msg_id": msg_id.hex(), "state": "queued"},
        f"{args.peer} did not answer in time; the message stays queued for the next p2pim lan",
    )
    return EXIT_NOT_FOUND


async def _interactive(args: argparse.Namespace, node: Any, name: str) -> int:
    from p2pim.lan import core as lc

    from .stdin import interact

    if args.json:
        _print(args, {"event": "ready", "name": name, "port": node.core.data_port}, "")
    else:
        print(
            f"on the LAN as {name} (port {node.core.data_port}; {', '.join(node.addresses) or 'no address'})."
            " Type NAME: text, or /to NAME then text; /peers; /who; /send [NAME] PATH; /accept ID;"
            " /decline ID; /cancel ID; /files; /quit",
            flush=True,
        )
    target: list[str | None] = [None]

    async def on_line(line: str) -> bool:
        if line.strip().split(" ")[0] in files.FILE_COMMANDS:
            await _file_command(args, node, line.strip(), target[0])
            return True
        target[0] = _command(args, node, line, target[0], lc)
        return target[0] != "/quit"

    async def on_event(ev: Any) -> None:
        data, text = event_line(ev)
        _print(args, data, text)

    try:
        await interact(node.events.get, on_event, on_line, node.core.pending, args.linger)
        return 0
    finally:
        if args.json:
            _print(args, {"event": "stats", **node.core.counters}, "")


async def _file_command(args: argparse.Namespace, node: Any, line: str, target: str | None) -> None:
    """Files with p2pim peers on the LAN (encrypted) and IP Messenger peers (attachments)."""
    from p2pim.files.service import TransferError
    from p2pim.lan.core import LanError

    try:
        await files.file_command(args, node.files, line, target, node.core.known)
    except (TransferError, LanError) as exc:
        print(f"p2pim: {exc}", file=sys.stderr, flush=True)


def _command(args: argparse.Namespace, node: Any, line: str, target: str | None, lc: Any) -> str | None:
    line = line.strip()
    if not line:
        return target
    if line == "/quit":
        return "/quit"
    if line == "/peers":
        for p in sorted(node.core.peers.values(), key=lambda p: p.name):
            tag = "" if p.encrypted else f" [{p.client}, unencrypted]"
            tag += " (away)" if p.away else ""
            print(f"  {p.name} ({p.addr[0]}){tag}", flush=True)
        return target
    if line.startswith("/to "):
        return line[4:].strip() or target
    if line == "/who":
        node.ask()
        return target
    to, text = target, line
    head, sep, rest = line.partition(":")
    if sep and node.core.known(head.strip()):
        to, text = head.strip(), rest.strip()
    if to is None:
        print("p2pim: say who: NAME: text, or /to NAME", file=sys.stderr, flush=True)
        return target
    try:
        node.send(to, text)
    except lc.LanError as exc:
        print(f"p2pim: {exc}", file=sys.stderr, flush=True)
    return target
