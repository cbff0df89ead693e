"""The messaging commands of ``p2pim``: register, login, logout, buddy, send, listen,
history, status, fingerprint.

Each command is one short-lived client (``listen`` stays until Ctrl-C). The
first ``login`` (or ``register``) keeps a resume token in the profile, so
later commands need no password. Errors are one line on stderr and an exit
code from :data:`EXIT_CODES` (documented in README.md).
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import account, app, devices, files, groups
from .render import event_line, print_history

EXIT_SERVER_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_NOT_A_BUDDY = 5
EXIT_RATE_LIMITED = 6
EXIT_TAKEN = 7
EXIT_KEY_CHANGED = 8
EXIT_FAILED = 9

DEFAULT_SERVER = "ws://127.0.0.1:7788"
SEND_WAIT_S = 10.0


class ChatError(Exception):
    """One line for the user and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def add_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        help="rendezvous URL, or a cluster's nodes as URL,URL,... (the first that answers; another "
        f"when it goes) (default: the one you logged in to, else $P2PIM_SERVER, else {DEFAULT_SERVER})",
    )
    common.add_argument(
        "--profile",
        default=os.environ.get("P2PIM_PROFILE", "default"),
        help="profile name: identity key and local database (default $P2PIM_PROFILE or 'default')",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    udp = argparse.ArgumentParser(add_help=False)
    udp.add_argument(
        "--udp-port",
        type=_udp_port,
        default=int(os.environ.get("P2PIM_UDP_PORT", "0")),
        help="UDP port for direct paths, e.g. one forwarded on your router (default: any)",
    )
    udp.add_argument(
        "--no-port-mapping",
        dest="port_mapping",
        action="store_false",
        default=os.environ.get("P2PIM_NO_PORT_MAPPING", "") == "",
        help="do not ask the router to forward that port (PCP, NAT-PMP, UPnP IGD)",
    )
    pw = argparse.ArgumentParser(add_help=False)
    pw.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from stdin (else $P2PIM_PASSWORD or a prompt)",
    )

    p = sub.add_parser("register", parents=[common, pw], help="create an account and log in")
    p.add_argument("username")
    p = sub.add_parser("login", parents=[common, pw], help="log in; later commands reuse the session")
    p.add_argument("username")
    p.add_argument(
        "--new-key",
        action="store_true",
        help="every device of this account is lost: make a new identity key here (buddies see a key change)",
    )
    sub.add_parser("logout", parents=[common], help="log out and forget the saved session")

    buddy = sub.add_parser("buddy", parents=[common], help="manage buddies")
    bsub = buddy.add_subparsers(dest="action", required=True)
    for action, text in (
        ("add", "ask USER to be your buddy (accepts if they asked you)"),
        ("accept", "accept USER's request"),
        ("decline", "decline USER's request"),
        ("remove", "remove USER (or withdraw a request)"),
        ("trust", "accept USER's new key after checking its fingerprint with them"),
    ):
        b = bsub.add_parser(action, parents=[common], help=text)
        b.add_argument("user")
    bsub.add_parser("list", parents=[common], help="buddies, requests and presence")

    p = sub.add_parser("send", parents=[common], help="send an end-to-end encrypted message")
    p.add_argument("user")
    p.add_argument("text", nargs="+")
    p.add_argument(
        "--wait", type=float, default=SEND_WAIT_S, help="seconds to wait for delivery (default 10)"
    )

    p = sub.add_parser(
        "listen", parents=[common, udp], help="print messages and presence changes as they happen"
    )
    p.add_argument("--away", action="store_true", help="appear away instead of online")
    p.add_argument("--no-read-receipts", action="store_true", help="do not tell senders you have read them")
    p.add_argument("--exit-after", type=float, metavar="S", help="stop after S seconds (for scripts)")
    p.add_argument("--auto-accept", action="store_true", help="accept every buddy's file offer")
    p.add_argument(
        "--dir", type=Path, help="where accepted files go (default $XDG_DOWNLOAD_DIR or ~/Downloads)"
    )

    p = sub.add_parser("history", parents=[common], help="conversation with USER (local, no server)")
    p.add_argument("user")
    p.add_argument("--limit", type=int, default=50)

    sub.add_parser("status", parents=[common], help="account, connection, outbox, buddies and their paths")
    p = sub.add_parser(
        "ping", parents=[common, udp], help="probe the path to USER (relay or direct) until it goes direct"
    )
    p.add_argument("user")
    p.add_argument("--count", type=int, default=10, help="give up after this many probes (default 10)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between probes (default 1)")
    p = sub.add_parser(
        "chat", parents=[common, udp], help="interactive: type lines to USER, see their messages as they come"
    )
    p.add_argument("user")
    p.add_argument(
        "--linger", type=float, default=10.0, help="at end of input, wait this long for receipts (default 10)"
    )
    p.add_argument(
        "--dir", type=Path, help="where /accept saves files (default $XDG_DOWNLOAD_DIR or ~/Downloads)"
    )
    p = sub.add_parser("fingerprint", parents=[common], help="your key's fingerprint, or USER's pinned one")
    p.add_argument("user", nargs="?")
    files.add_parsers(sub, common, udp)
    groups.add_parsers(sub, common)
    devices.add_parsers(sub, common)
    account.add_parsers(sub, common, pw)
    app.add_parsers(sub, common, udp)


# -- plumbing -------------------------------------------------------------------


def _udp_port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return int(text)


def _password(
    args: argparse.Namespace, confirm: bool, prompt: str = "password: ", env_name: str = "P2PIM_PASSWORD"
) -> str:
    """From stdin (a line each, with --password-stdin), ``$env_name``, or a prompt."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    env = os.environ.get(env_name)
    if env:
        return env
    if not sys.stdin.isatty():
        raise ChatError(f"no password: use a terminal, --password-stdin or ${env_name}", 2)
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != first:
        raise ChatError("the passwords differ", 2)
    return first


def _map_error(exc: Exception) -> ChatError:
    from p2pim.client import KEY_CHANGED, ClientError, Unreachable
    from p2pim.wire import control_pb2 as pb

    if isinstance(exc, Unreachable):
        return ChatError(exc.message, EXIT_SERVER_UNREACHABLE)
    assert isinstance(exc, ClientError)
    codes = {
        pb.AUTH_FAILED: EXIT_AUTH,
        pb.NOT_LOGGED_IN: EXIT_AUTH,
        pb.NO_SUCH_USER: EXIT_NOT_A_BUDDY,
        pb.NOT_A_BUDDY: EXIT_NOT_A_BUDDY,
        pb.RATE_LIMITED: EXIT_RATE_LIMITED,
        pb.USERNAME_TAKEN: EXIT_TAKEN,
        KEY_CHANGED: EXIT_KEY_CHANGED,
    }
    message = exc.message
    if exc.code == pb.RATE_LIMITED and exc.retry_after_ms:
        message += f" (about {exc.retry_after_ms / 1000:.0f} s)"
    return ChatError(message, codes.get(exc.code, EXIT_FAILED))


def _server_for(args: argparse.Namespace, saved: tuple[str, str, bytes] | None) -> str:
    if args.server:
        return str(args.server)
    if saved is not None:
        return saved[0]
    return os.environ.get("P2PIM_SERVER", DEFAULT_SERVER)


def _run(args: argparse.Namespace, body: Callable[[Any], Awaitable[int]], login: str = "required") -> int:
    """Open the profile, log in with the saved session, run ``body(client)``.

    ``login``: "required" (server unreachable is an error), "try" (``body`` runs
    either way and checks ``client.connected``), or "no" (``body`` connects itself).
    """
    from p2pim.client import Client, ClientError, Unreachable
    from p2pim.files.disk import download_dir
    from p2pim.messaging.store import ClientStore
    from p2pim.profile import Profile, ProfileError

    async def go() -> int:
        try:
            profile = Profile(args.profile)
        except ProfileError as exc:
            raise ChatError(str(exc), 2) from None
        store = ClientStore(profile.db_path)
        saved = store.account()
        store.close()
        if args.command in ("listen", "chat") and app.app_running(profile.path):
            raise ChatError(f"p2pim app runs on profile {profile.name}: use its window, or stop it first", 2)
        # Only `listen` and `chat` show the user online; one-shot commands are quiet
        # sessions, so buddies do not see presence flicker each time a message is sent
        # from a script. Only commands that show messages take them in: a `send` must
        # not swallow what arrived while you were away (it waits for `listen`).
        # Sessions that move file bytes show online too: the other side sends (or asks
        # for) bytes only to a buddy it sees online.
        moving = args.command in ("listen", "chat", "send-file", "accept", "app")
        auto = getattr(args, "auto_accept", False)
        client = Client(
            _server_for(args, saved),
            profile,
            reconnect=False,
            quiet=not moving,
            direct=args.command in ("listen", "chat", "ping", "send-file", "accept", "app"),
            udp_port=getattr(args, "udp_port", 0),
            inbox=args.command in ("listen", "chat", "login", "app"),
            port_mapping=getattr(args, "port_mapping", True),
            transfers=moving,
            auto_accept=(getattr(args, "dir", None) or download_dir()) if auto else None,
        )
        try:
            if login != "no":
                if saved is None:
                    raise ChatError("not logged in: run p2pim login USER (or register)", EXIT_AUTH)
                try:
                    await client.connect()
                    await client.login(saved[1])
                except Unreachable:
                    if login == "required":
                        raise
            return await body(client)
        except ClientError as exc:
            raise _map_error(exc) from None
        finally:
            await client.close()

    try:
        return asyncio.run(go())
    except ChatError as exc:
        print(f"p2pim: {exc}", file=sys.stderr)
        return exc.code


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data) if args.json else text)


def _when(ms: int) -> str:
    if not ms:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))


# -- commands -------------------------------------------------------------------


def cmd_register(args: argparse.Namespace) -> int:
    password = _password(args, confirm=True)

    async def body(c: Any) -> int:
        await c.connect()
        await c.register(args.username, password)
        await c.login(args.username, password)
        _out(
            args,
            {"registered": args.username, "fingerprint": c.profile.identity.fingerprint},
            f"registered {args.username} on {c.server}\nyour fingerprint: {c.profile.identity.fingerprint}",
        )
        return 0

    return _run(args, body, login="no")


def cmd_login(args: argparse.Namespace) -> int:
    password = _password(args, confirm=False)

    async def body(c: Any) -> int:
        from p2pim.client import Message

        await c.connect()
        pending = await c.login(args.username, password, new_key=args.new_key)
        waiting: list[Message] = []
        with contextlib.suppress(TimeoutError):  # the server pushes them right after login
            async with asyncio.timeout(5):
                async for ev in c.events():
                    if isinstance(ev, Message):
                        waiting.append(ev)
                    if len(waiting) >= pending:
                        break
        _out(
            args,
            {"logged_in": args.username, "offline_messages": [event_line(m)[0] for m in waiting]},
            f"logged in as {args.username} on {c.server}"
            + (f" with a new key, fingerprint {c.profile.identity.fingerprint}" if args.new_key else "")
            + (f"; {len(waiting)} message(s) arrived while you were offline:" if waiting else ""),
        )
        if not args.json:
            for m in waiting:
                print("  " + event_line(m)[1])
        return 0

    return _run(args, body, login="no")


def cmd_logout(args: argparse.Namespace) -> int:
    async def body(c: Any) -> int:
        await c.logout(forget=True)
        _out(args, {"logged_out": True}, "logged out")
        return 0

    return _run(args, body)


def cmd_buddy(args: argparse.Namespace) -> int:
    async def body(c: Any) -> int:
        if args.action == "list":
            rows = await c.buddies()
            if args.json:
                print(json.dumps([r.__dict__ for r in rows]))
                return 0
            if not rows:
                print("no buddies yet: p2pim buddy add USER")
            for r in rows:
                seen = (
                    f", last seen {_when(r.last_seen_ms)}"
                    if r.presence == "offline" and r.state == "buddy"
                    else ""
                )
                warn = "  WARNING: key changed (p2pim fingerprint USER)" if r.key_warning else ""
                print(f"{r.username:<20} {r.state:<22} {r.presence}{seen}{warn}")
            return 0
        if args.action == "trust":
            if not c.trust(args.user):
                raise ChatError(f"no changed key is waiting for {args.user}", EXIT_FAILED)
            _out(args, {"trusted": args.user}, f"now trusting {args.user}'s new key")
            return 0
        action = {"add": c.buddy_add, "accept": c.buddy_accept, "decline": c.buddy_decline}
        await action.get(args.action, c.buddy_remove)(args.user)
        done = {"add": "request sent to", "accept": "accepted", "decline": "declined", "remove": "removed"}
        _out(args, {args.action: args.user}, f"{done[args.action]} {args.user}")
        return 0

    return _run(args, body, login="no" if args.action == "trust" else "required")


def cmd_send(args: argparse.Namespace) -> int:
    from p2pim.client import Client
    from p2pim.messaging.ids import short

    text = " ".join(args.text)

    async def body(c: Client) -> int:
        msg_id = await c.send(args.user, text)
        if args.user.startswith("#") and c.connected:
            state = await c.groups.wait_sent(msg_id, args.wait) or "queued"
            said = {
                "stored": f"sent to {args.user}: kept on the server for every member",
                "failed": f"not sent to {args.user}",
                "queued": "queued: not yet accepted by the server; it goes out with the next send or listen",
            }
            _out(args, {"msg_id": msg_id.hex(), "state": state}, said[state])
            return {"failed": EXIT_FAILED, "queued": EXIT_SERVER_UNREACHABLE}.get(state, 0)
        if not c.connected:
            # Server down: still queue it (a known buddy), so nothing the user typed is lost.
            print(
                f"p2pim: server unreachable; message {short(msg_id)} queued for {args.user}", file=sys.stderr
            )
            return EXIT_SERVER_UNREACHABLE
        outcome = await c.wait_outcome(msg_id, args.wait)
        state = outcome.state if outcome else "queued"
        messages = {
            "delivered": f"delivered to {args.user}",
            "stored": f"{args.user} is offline: kept on the server, delivered at their next login",
            "failed": f"not delivered: {outcome.detail if outcome else ''}",
            "queued": "queued: not yet accepted by the server; it goes out with the next send or listen",
        }
        _out(args, {"msg_id": msg_id.hex(), "state": state}, messages[state])
        return {"failed": EXIT_FAILED, "queued": EXIT_SERVER_UNREACHABLE}.get(state, 0)

    return _run(args, body, login="try")


def cmd_listen(args: argparse.Namespace) -> int:
    from p2pim import client as cl

    async def body(c: cl.Client) -> int:
        c.reconnect = True
        if args.away:
            await c.set_status("away")
        if not args.json:
            print(f"listening as {c.username} on {c.server} (Ctrl-C to stop)", flush=True)
        deadline = None if args.exit_after is None else time.monotonic() + args.exit_after
        events = c.events()
        while True:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                return 0
            try:
                ev = await asyncio.wait_for(anext(events), timeout)
            except TimeoutError:
                return 0
            data, line = event_line(ev)
            print(json.dumps(data) if args.json else line, flush=True)
            if isinstance(ev, cl.Message) and not args.no_read_receipts:
                await c.mark_read(ev.peer)
            elif isinstance(ev, cl.GroupMessage) and not args.no_read_receipts:
                with contextlib.suppress(cl.ClientError, cl.Unreachable):  # the count waits, nothing else
                    await c.groups.mark_read(ev.gid, [ev.msg_id])

    with contextlib.suppress(KeyboardInterrupt):
        return _run(args, body)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from p2pim.messaging.store import ClientStore
    from p2pim.profile import Profile, ProfileError

    try:
        store = ClientStore(Profile(args.profile).db_path)
    except ProfileError as exc:
        print(f"p2pim: {exc}", file=sys.stderr)
        return 2
    peer = args.user
    if peer.startswith("#"):  # a group: by name (or id prefix) among ours
        from p2pim.groups.seal import label
        from p2pim.groups.store import GroupStore

        hits = GroupStore(store.conn).named(peer, gone=True)  # also groups we left
        if len(hits) != 1:
            store.close()
            print(
                f"p2pim: {'no group' if not hits else 'more than one group'} called {peer}", file=sys.stderr
            )
            return 2
        peer = label(hits[0].gid)
    rows = store.history(peer, args.limit)
    me = (store.account() or ("", "me", b""))[1]
    store.close()
    print_history(rows, me, args.user, args.json)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from p2pim.client import Client

    async def body(c: Client) -> int:
        saved = c.store.account()
        assert saved is not None  # _run refused to go on without a session
        connected = c.connected
        buddies = await c.buddies() if connected else []
        outbox = len(c.store.outbox())
        paths = c.store.paths()
        listed: list[dict[str, Any]] = []
        for b in buddies:
            row = paths.get(b.username)
            # What the last long-running session (listen, chat) measured, and when.
            seen = (
                {"via": row.via, "addr": row.addr, "rtt_ms": row.rtt_ms, "at_ms": row.updated_ms}
                if row
                else None
            )
            listed.append({**b.__dict__, "path": seen})
        portmap = _saved_port_mapping(c.store.setting("port_mapping"))
        mine: list[dict[str, Any]] = [
            {
                "group": g.gid.hex(),
                "name": g.name,
                "role": g.role,
                "members": len(c.groups.store.members(g.gid)),
            }
            for g in c.groups.store.groups()
            if g.role != "gone"
        ]
        data = {
            "username": saved[1],
            "server": c.server,
            "connected": connected,
            "fingerprint": c.profile.identity.fingerprint,
            "outbox": outbox,
            "port_mapping": portmap,
            "buddies": listed,
            "transfers": [files.transfer_json(t) for t in c.transfers(active=True)],
            "groups": mine,
            "group_outbox": len(c.groups.store.outgoing()),
            "devices": c.device_count,
        }
        others = c.device_count - 1
        lines = [
            f"{saved[1]} on {c.server}: {'connected' if connected else 'server unreachable'}",
            f"fingerprint {c.profile.identity.fingerprint}"
            + (f"; {others} other device{'s' * (others != 1)} (p2pim device list)" if others else ""),
            f"outbox: {outbox} message(s) waiting to go out",
            f"port mapping: {_port_mapping_text(portmap)}",
        ]
        for b in buddies:
            if b.state != "buddy":
                continue
            row = paths.get(b.username)
            path = "path unknown"
            if row is not None and b.presence != "offline":
                rtt = f" {row.rtt_ms:.1f} ms" if row.rtt_ms is not None else ""
                where = f"direct {row.addr}{rtt}" if row.via == "direct" else "relay"
                path = f"{where} (as of {_when(row.updated_ms)})"
            lines.append(
                f"  {b.username:<20} {b.presence:<8} {path if b.presence != 'offline' else ''}".rstrip()
            )
        active = c.transfers(active=True)
        lines.append(f"file transfers: {len(active) or 'none'} open" + (" (p2pim files)" if active else ""))
        for t in active:
            way = f"to {t.peer}" if t.outgoing else f"from {t.peer}"
            state = f"{files.percent(t.durable, t.size)} there" if t.state == "accepted" else t.state
            lines.append(f"  {t.file_id.hex()[:8]}  {way}: {t.name} ({files.human_size(t.size)}) {state}")
        lines.append(f"groups: {len(mine) or 'none'}" + (" (p2pim group list)" if mine else ""))
        for g in mine:
            role = f"invited: p2pim group accept {g['name']}" if g["role"] == "invited" else str(g["role"])
            lines.append(f"  #{g['name']:<20} {g['members']} member(s), you: {role}")
        if data["group_outbox"]:
            lines.append(f"  {data['group_outbox']} group item(s) waiting to go to the server")
        _out(args, data, "\n".join(lines))
        return 0 if connected else EXIT_SERVER_UNREACHABLE

    return _run(args, body, login="try")


def _saved_port_mapping(raw: str | None) -> dict[str, Any] | None:
    """What the last long-running session's router gave (see Client._on_portmap)."""
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _port_mapping_text(pm: dict[str, Any] | None) -> str:
    if pm is None:
        return "unknown (no listen or chat yet)"
    when = _when(int(pm.get("at_ms") or 0))
    if not pm.get("protocol"):
        asked = ", ".join(pm.get("tried") or []) or "nothing"
        return f"none ({asked} asked; as of {when})"
    state = "given back at exit" if pm.get("released") else "held"
    return f"{pm['protocol']} {pm.get('external')} ({state}; as of {when})"


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from p2pim.identity import IdentityError, fingerprint
    from p2pim.messaging.store import ClientStore
    from p2pim.profile import Profile, ProfileError

    try:
        profile = Profile(args.profile)
        if not args.user:
            fp = profile.identity.fingerprint
            _out(args, {"fingerprint": fp}, fp)
            return 0
    except (ProfileError, IdentityError) as exc:
        print(f"p2pim: {exc}", file=sys.stderr)
        return 2
    store = ClientStore(profile.db_path)
    contact = store.contact(args.user)
    store.close()
    if contact is None:
        print(f"p2pim: no key known for {args.user} (not a buddy yet?)", file=sys.stderr)
        return EXIT_NOT_A_BUDDY
    pinned = fingerprint(contact.identity_key)
    offered = fingerprint(contact.offered_key) if contact.offered_key else None
    text = f"{args.user}: {pinned}"
    if offered:
        text += f"\nWARNING: the server now offers a different key: {offered}"
    _out(args, {"user": args.user, "fingerprint": pinned, "offered": offered}, text)
    return 0 if offered is None else EXIT_KEY_CHANGED


def cmd_ping(args: argparse.Namespace) -> int:
    """Probe the path to a buddy: relay RTT at once, then direct once punching succeeds."""
    from p2pim.client import Client

    if args.count < 1 or args.interval <= 0:
        print("p2pim: --count must be at least 1 and --interval positive", file=sys.stderr)
        return 2

    async def body(c: Client) -> int:
        buddies = {b.username: b for b in await c.buddies()}
        b = buddies.get(args.user)
        if b is None or b.state != "buddy":
            raise ChatError(f"{args.user} is not your buddy", EXIT_NOT_A_BUDDY)
        if b.presence == "offline":
            raise ChatError(f"{args.user} is offline", EXIT_SERVER_UNREACHABLE)
        await asyncio.wait_for(c.local_ready.wait(), 10)
        assert c.paths is not None
        c.paths.want(args.user)
        answered, results = 0, []
        for seq in range(1, args.count + 1):
            via, rtt = await c.paths.probe(args.user, timeout=max(1.0, args.interval))
            answered += rtt is not None
            kind = "relay" if via == "relay" else "direct"
            results.append(
                {"seq": seq, "via": kind, "addr": "" if kind == "relay" else via, "rtt_ms": _ms(rtt)}
            )
            if not args.json:
                where = "relay" if kind == "relay" else f"direct {via}"
                print(
                    f"{seq:>3}  {where:<28} {'timeout' if rtt is None else f'{rtt * 1000:.2f} ms'}",
                    flush=True,
                )
            if kind == "direct" and rtt is not None:
                break
            await asyncio.sleep(args.interval if rtt is not None else 0)
        final = c.path_to(args.user)
        summary = (
            f"{args.user}: direct via {final[1]}"
            if final[0] == "direct"
            else f"{args.user}: no direct path after {len(results)} probes; messages use the relay"
        )
        if args.json:
            print(json.dumps({"user": args.user, "probes": results, "path": final[0], "addr": final[1]}))
        else:
            print(summary)
        return 0 if answered else EXIT_SERVER_UNREACHABLE

    return _run(args, body)


def _ms(rtt: float | None) -> float | None:
    return None if rtt is None else round(rtt * 1000, 3)


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat with one buddy (or ``#group``): stdin lines out, everything that happens printed."""
    from p2pim import client as cl
    from p2pim.client.groups import GroupError
    from p2pim.files.service import TransferError

    async def body(c: cl.Client) -> int:
        c.reconnect = True
        if args.json:
            print(json.dumps({"event": "ready", "user": c.username, "peer": args.user}), flush=True)
        else:
            print(f"chatting with {args.user} as {c.username} (end input with Ctrl-D)", flush=True)
        from .stdin import interact

        pending: set[bytes] = set()
        events = c.events()
        group = args.user.startswith("#")
        try:
            gid = c.groups.find(args.user).gid if group else b""
        except GroupError as exc:
            raise ChatError(str(exc), 2) from None
        tasks: set[asyncio.Task[None]] = set()

        async def kept(msg_id: bytes) -> None:
            """A group post counts as done once the server keeps it for every member."""
            state = await c.groups.wait_sent(msg_id, 60)
            pending.discard(msg_id)
            text = (
                f"(kept on the server for every member of {args.user})" if state == "stored" else "(not sent)"
            )
            print(
                json.dumps({"event": "group_sent", "msg_id": msg_id.hex(), "state": state})
                if args.json
                else text
            )

        async def on_line(text: str) -> bool:
            if not text.strip():
                return True
            if text.strip() == "/quit":
                return False
            try:
                if text.startswith("/") and text.split()[0] in files.FILE_COMMANDS:
                    if group:
                        print("p2pim: files go to one buddy, not to a group", file=sys.stderr, flush=True)
                        return True
                    await files.file_command(args, c.files, text, args.user, lambda _: False, args.user)
                else:
                    msg_id = await c.send(args.user, text)
                    pending.add(msg_id)
                    if group:
                        task = asyncio.get_running_loop().create_task(kept(msg_id))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
            except cl.ClientError as exc:
                print(f"p2pim: {exc.message}", file=sys.stderr, flush=True)
            except TransferError as exc:
                print(f"p2pim: {exc}", file=sys.stderr, flush=True)
            return True

        async def on_event(ev: Any) -> None:
            data, line = event_line(ev)
            print(json.dumps(data) if args.json else line, flush=True)
            if isinstance(ev, cl.Message) and ev.peer == args.user:
                await c.mark_read(args.user)
            if isinstance(ev, cl.GroupMessage) and ev.gid == gid:
                with contextlib.suppress(cl.ClientError, cl.Unreachable):
                    await c.groups.mark_read(gid, [ev.msg_id])
            if isinstance(ev, cl.Receipt):
                pending.difference_update(ev.msg_ids)
            if isinstance(ev, cl.Outcome) and ev.state in ("stored", "failed"):
                pending.discard(ev.msg_id)

        try:
            done = await interact(lambda: anext(events), on_event, on_line, lambda: len(pending), args.linger)
            return 0 if done else EXIT_SERVER_UNREACHABLE
        finally:
            if args.json:  # for scripts (natlab matrix): how the messages travelled
                print(json.dumps({"event": "stats", **c.counters}), flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        return _run(args, body)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "register": cmd_register,
    "login": cmd_login,
    "logout": cmd_logout,
    "buddy": cmd_buddy,
    "send": cmd_send,
    "listen": cmd_listen,
    "history": cmd_history,
    "status": cmd_status,
    "fingerprint": cmd_fingerprint,
    "ping": cmd_ping,
    "chat": cmd_chat,
    **files.COMMANDS,
    **groups.COMMANDS,
    **devices.COMMANDS,
    **account.COMMANDS,
    **app.COMMANDS,
}
