"""The ``p2pim`` command.

Exit codes (stable, for scripts):

==  =====================================================================
0   done (for ``nat`` some verdicts may still be "unknown"; the notes say why)
1   unexpected failure (a bug: please report it)
2   usage error, or the server name does not resolve
3   no answer: the STUN server ("blocked") or the rendezvous is unreachable
    (``send`` then keeps the message queued in the outbox)
4   authentication failed: wrong username or password, or not logged in
5   no such user, or not a buddy
6   rate limited (too many login attempts)
7   username taken
8   a buddy's key changed (see ``p2pim fingerprint USER``)
9   refused or not delivered for another reason (the message says why)
==  =====================================================================

Imports are kept light (no crypto, no protobuf) so `p2pim nat` starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_NO_ANSWER = 3

DEFAULT_STUN_PORT = 3478


class UsageError(Exception):
    """Bad input from the user: one line on stderr, exit 2."""


def parse_server(text: str, default_port: int = DEFAULT_STUN_PORT) -> tuple[str, int]:
    """``HOST[:PORT]``, ``[V6]:PORT`` or a bare IPv6 literal, resolved to an address."""
    host, port = text, default_port
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise UsageError(f"bad server address {text!r}")
        if rest:
            if not rest.startswith(":"):
                raise UsageError(f"bad server address {text!r}")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(p, text)
    if not host:
        raise UsageError(f"bad server address {text!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve {host!r}: {exc.strerror}") from None
    addr = infos[0][4]
    return (str(addr[0]), int(addr[1]))


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UsageError(f"bad port in {whole!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pim", description="P2P-first instant messenger")
    sub = parser.add_subparsers(dest="command", required=True)
    nat = sub.add_parser(
        "nat",
        help="diagnose this network's NAT (RFC 5780 / RFC 3489)",
        description="Measure NAT mapping and filtering behaviour, port preservation, "
        "hairpinning and (with --lifetime) the UDP binding lifetime against a STUN server "
        "(any RFC 5780 or RFC 3489 server). Exit codes: 0 done, 2 usage, 3 no answer.",
    )
    nat.add_argument(
        "--server",
        default=os.environ.get("P2PIM_STUN_SERVER", f"127.0.0.1:{DEFAULT_STUN_PORT}"),
        help="STUN server HOST[:PORT] (default $P2PIM_STUN_SERVER or %(default)s)",
    )
    nat.add_argument("--json", action="store_true", help="print JSON instead of a table")
    nat.add_argument(
        "--profile",
        default=os.environ.get("P2PIM_PROFILE", "default"),
        help="with --lifetime: save the keepalive it implies in this profile, if it exists "
        "(default $P2PIM_PROFILE or 'default')",
    )
    nat.add_argument(
        "--lifetime",
        nargs="?",
        const=120.0,
        type=float,
        metavar="MAX_S",
        help="also measure how long an idle UDP binding lives, testing idle times up to "
        "MAX_S seconds (default 120); takes about that long",
    )
    nat.add_argument(
        "--give-up",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds without any answer before reporting 'blocked' (default %(default)s)",
    )
    from . import chat, lan

    chat.add_parsers(sub)
    lan.add_parser(sub)
    return parser


def _cmd_nat(args: argparse.Namespace) -> int:
    from p2pim.nat.discovery import Timings
    from p2pim.nat.runner import discover

    server = parse_server(args.server)
    if args.lifetime is not None and not 1 <= args.lifetime <= 3600:
        raise UsageError("--lifetime takes 1 to 3600 seconds")
    if not 0.1 <= args.give_up <= 60:
        raise UsageError("--give-up takes 0.1 to 60 seconds")
    if args.lifetime and not args.json:
        print(f"measuring binding lifetime: up to {args.lifetime:g} s ...", file=sys.stderr, flush=True)
    report = asyncio.run(discover(server, Timings(give_up=args.give_up), args.lifetime))
    if report.lifetime is not None:
        _save_keepalive(args.profile, report.lifetime.keepalive)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.render())
    return EXIT_OK if report.responded else EXIT_NO_ANSWER


def _save_keepalive(profile_name: str, keepalive: float) -> None:
    """Direct paths to buddies then refresh NAT bindings at this interval."""
    from p2pim.messaging.store import ClientStore
    from p2pim.profile import Profile, ProfileError

    try:
        profile = Profile(profile_name)
    except ProfileError:
        return
    if not profile.db_path.exists():
        return  # no account on this machine: nothing to tune
    store = ClientStore(profile.db_path)
    store.set_setting("keepalive_s", str(keepalive))
    store.close()
    print(f"profile {profile_name}: keepalive for direct paths set to {keepalive:g} s", file=sys.stderr)


def _commands() -> dict[str, Callable[[argparse.Namespace], int]]:
    from . import chat, lan

    return {"nat": _cmd_nat, "lan": lan.cmd_lan, **chat.COMMANDS}


def main(argv: list[str] | None = None) -> int:
    from p2pim.sqlite import SchemaTooNew

    from . import chat

    args = build_parser().parse_args(argv)
    try:
        return _commands()[args.command](args)
    except UsageError as exc:
        print(f"p2pim: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except chat.ChatError as exc:
        print(f"p2pim: {exc}", file=sys.stderr)
        return exc.code
    except SchemaTooNew as exc:
        print(f"p2pim: {exc}: upgrade p2pim", file=sys.stderr)
        return EXIT_BUG
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"p2pim: network error: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
