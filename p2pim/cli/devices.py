"""``p2pim device ...``: the account's devices (see :mod:`p2pim.client.devices`).

On a linked device ``p2pim device link`` shows a one-time code and waits; on the new
one (a fresh ``--profile``) ``p2pim device join CODE`` takes the account over it.
``list`` and ``remove ID`` manage them; a removed device is cut off at once.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    device = sub.add_parser("device", parents=[common], help="devices: link a new one, list, remove")
    dsub = device.add_subparsers(dest="action", required=True)
    dsub.add_parser("link", parents=[common], help="show a one-time code for a new device, and wait for it")
    join = dsub.add_parser("join", parents=[common], help="make this profile a device of the account (CODE)")
    join.add_argument("code")
    dsub.add_parser("list", parents=[common], help="the account's devices")
    remove = dsub.add_parser("remove", parents=[common], help="remove device ID (its sessions end at once)")
    remove.add_argument("device_id", type=int)


def cmd_device(args: argparse.Namespace) -> int:
    from p2pim.client.devices import LinkError

    from .chat import ChatError, _out, _run

    async def body(c: Any) -> int:
        try:
            return await act(c)
        except LinkError as exc:
            raise ChatError(str(exc), 2) from None

    async def act(c: Any) -> int:
        d = c.devices
        if args.action == "link":

            def show(code: str) -> None:
                if args.json:
                    print(json.dumps({"code": code}), flush=True)
                else:
                    print(f"on the new device, run:\n\n    p2pim device join {code}\n", flush=True)
                    print("(waiting up to 5 minutes)", flush=True)

            row = await d.link(show)
            _out(
                args,
                {"linked": row.device_id, "name": row.name},
                f"linked {row.name} (device {row.device_id})",
            )
        elif args.action == "join":
            await c.connect()
            username = await d.join(args.code)
            await c.close()
            again = type(c)(c.server, c.profile, reconnect=False, quiet=True, direct=False, inbox=False)
            try:
                await again.connect()
                await again.login(username)
            finally:
                await again.close()
            _out(args, {"joined": username}, f"this device is now {username}'s (p2pim listen to start)")
        elif args.action == "list":
            rows = await d.list()
            if args.json:
                print(json.dumps([r.__dict__ for r in rows]))
            for r in rows if not args.json else ():
                seen = "online" if r.online else _ago(r.last_seen_ms)
                print(f"  {r.device_id:>4}  {r.name:<24} {seen:<16}{'  (this one)' if r.this else ''}")
        else:
            await d.remove(args.device_id)
            _out(args, {"removed": args.device_id}, f"removed device {args.device_id}")
        return 0

    return _run(args, body, login="no" if args.action == "join" else "required")


def _ago(ms: int) -> str:
    if not ms:
        return "never seen"
    minutes = int((time.time() * 1000 - ms) / 60000)
    return f"seen {minutes} min ago" if minutes < 120 else f"seen {minutes // 60} h ago"


COMMANDS = {"device": cmd_device}
