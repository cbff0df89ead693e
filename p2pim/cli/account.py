"""``p2pim account ...``: the account's email address and notices, its password, and
deleting it (see :mod:`p2pim.client.account`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parsers(sub: Any, common: argparse.ArgumentParser, pw: argparse.ArgumentParser) -> None:
    account = sub.add_parser("account", parents=[common], help="email notices, password, delete the account")
    asub = account.add_subparsers(dest="action", required=True)
    asub.add_parser("show", parents=[common], help="the account's email address and notices")
    email = asub.add_parser("email", parents=[common], help="give an address for notices (a code is mailed)")
    email.add_argument("address", nargs="?", default="")
    email.add_argument("--remove", action="store_true", help="forget the address")
    verify = asub.add_parser(
        "verify", parents=[common], help="confirm the address with the CODE mailed to it"
    )
    verify.add_argument("code")
    notify = asub.add_parser("notify", parents=[common], help="email notices for messages waiting: on or off")
    notify.add_argument("state", choices=["on", "off"])
    notify.add_argument("--after", type=float, default=0, help="minutes a message waits before a notice")
    notify.add_argument("--every", type=float, default=0, help="at most one notice per this many minutes")
    asub.add_parser("password", parents=[common, pw], help="change the password (old, then new)")
    delete = asub.add_parser("delete", parents=[common, pw], help="delete the account and all it left here")
    delete.add_argument("--yes", action="store_true", help="do not ask again")


def cmd_account(args: argparse.Namespace) -> int:
    from .chat import ChatError, _out, _password, _run

    act = args.action
    if act == "delete" and not args.yes:
        if not sys.stdin.isatty():
            raise ChatError("deleting an account asks first: pass --yes to skip the question", 2)
        args.confirmed = input("delete the account for good? type its name: ").strip()
    old = _password(args, confirm=False) if act in ("password", "delete") else ""
    new = _password(args, True, "new password: ", "P2PIM_NEW_PASSWORD") if act == "password" else ""

    def show(state: Any) -> None:
        mails = "" if state.server_mails else " (this server sends no email)"
        if not state.email:
            line = f"no email address{mails}: p2pim account email ADDRESS"
        else:
            checked = "verified" if state.verified else "not verified yet: p2pim account verify CODE"
            after, every = state.delay_s // 60, state.period_s // 60
            notices = (
                f"notices after {after} min waiting, one per {every} min at most"
                if state.notify
                else "no notices"
            )
            line = f"{state.email} ({checked}); {notices}{mails}"
        _out(args, {"email": state.email, "verified": state.verified, "notify": state.notify,
                    "delay_s": state.delay_s, "period_s": state.period_s, "server_mails": state.server_mails},
             line)  # fmt: skip

    async def body(c: Any) -> int:
        a = c.account
        if act == "show":
            show(await a.info())
        elif act == "email":
            if not args.address and not args.remove:
                raise ChatError("give an address, or --remove", 2)
            show(await a.set_email("" if args.remove else args.address))
        elif act == "verify":
            show(await a.verify(args.code))
        elif act == "notify":
            show(await a.notify(args.state == "on", int(args.after * 60), int(args.every * 60)))
        elif act == "password":
            await a.password(old, new)
            _out(args, {"password": "changed"}, "password changed (your devices stay linked)")
        else:
            if not args.yes and getattr(args, "confirmed", "") != c.username:
                raise ChatError("not deleted (the name did not match; or pass --yes)", 2)
            await a.delete(old)
            _out(args, {"deleted": c.username}, f"deleted the account {c.username}")
        return 0

    return _run(args, body)


COMMANDS = {"account": cmd_account}
