"""``p2pim group ...``: groups on the rendezvous (see :mod:`p2pim.client.groups`).

A group is named by its name (``team`` or ``#team``) or its id's first hex digits when
two of yours share a name. ``p2pim send '#team' TEXT`` posts to it; ``history
'#team'`` reads it; ``listen`` shows its messages and membership changes.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

ACTIONS = {
    "create": ("create a group, inviting your buddies USER...", ["name", "users*"]),
    "invite": ("invite your buddies to GROUP", ["group", "users+"]),
    "accept": ("join GROUP you were invited to", ["group"]),
    "decline": ("decline GROUP's invitation", ["group"]),
    "leave": ("leave GROUP", ["group"]),
    "remove": ("remove USER from GROUP (owner, admin)", ["group", "user"]),
    "rename": ("rename GROUP (owner, admin)", ["group", "name"]),
    "role": ("make USER owner, admin or member of GROUP (owner)", ["group", "user", "role"]),
    "delete": ("delete GROUP for everyone (owner)", ["group"]),
    "list": ("your groups and invitations", []),
    "members": ("who is in GROUP", ["group"]),
    "sent": ("your last messages to GROUP: delivered to how many members", ["group"]),
}


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("group", parents=[common], help="groups: create, invite, accept, leave, list ...")
    gsub = group.add_subparsers(dest="action", required=True)
    for action, (text, params) in ACTIONS.items():
        p = gsub.add_parser(action, parents=[common], help=text)
        for param in params:
            name = param.rstrip("*+")
            nargs = {"*": "*", "+": "+"}.get(param[-1])
            if nargs:
                p.add_argument(name, nargs=nargs)
            else:
                p.add_argument(name, choices=["owner", "admin", "member"] if name == "role" else None)


def cmd_group(args: argparse.Namespace) -> int:
    from p2pim.client.groups import GroupError

    from .chat import ChatError, _out, _run

    async def body(c: Any) -> int:
        try:
            return await act(c)
        except GroupError as exc:
            raise ChatError(str(exc), 2) from None

    async def act(c: Any) -> int:
        g = c.groups
        act = args.action
        if act == "create":
            row = await g.create(args.name, args.users)
            invited = f", invited {', '.join(args.users)}" if args.users else ""
            _out(args, _row(row), f"created #{row.name} ({row.gid.hex()[:8]}){invited}")
        elif act == "invite":
            for user in args.users:
                await g.invite(args.group, user)
            _out(args, {"invited": args.users}, f"invited {', '.join(args.users)} to {args.group}")
        elif act in ("accept", "decline"):
            await g.answer(args.group, act == "accept")
            done = {"accept": "joined", "decline": "declined"}[act]
            _out(args, {"group": args.group, "answer": done}, f"{done} {args.group}")
        elif act == "leave":
            await g.leave(args.group)
            _out(args, {"group": args.group, "left": True}, f"left {args.group}")
        elif act == "remove":
            await g.remove(args.group, args.user)
            _out(args, {"group": args.group, "removed": args.user}, f"removed {args.user} from {args.group}")
        elif act == "rename":
            await g.rename(args.group, args.name)
            _out(args, {"group": args.group, "name": args.name}, f"renamed {args.group} to #{args.name}")
        elif act == "role":
            await g.set_role(args.group, args.user, args.role)
            _out(
                args,
                {"user": args.user, "role": args.role},
                f"{args.user} is now {args.role} of {args.group}",
            )
        elif act == "delete":
            await g.delete(args.group)
            _out(args, {"group": args.group, "deleted": True}, f"deleted {args.group}")
        elif act == "list":
            rows = [r for r in await g.refresh() if r.role != "gone"]
            if args.json:
                print(json.dumps([_row(r, g.store.members(r.gid)) for r in rows]))
            elif not rows:
                print("no groups (p2pim group create NAME [USER...])")
            for r in rows if not args.json else ():
                members = g.store.members(r.gid)
                n = sum(1 for role in members.values() if role != "invited")
                note = f"invited: p2pim group accept {r.name}" if r.role == "invited" else f"you: {r.role}"
                print(f"  #{r.name:<20} {n} member{'s' * (n != 1)}  {note}  ({r.gid.hex()[:8]})")
        elif act == "sent":
            from p2pim.groups.seal import label

            row = g.find(args.group)
            mine = [r for r in c.history(label(row.gid), 200) if r.outgoing][-20:]
            counts = await g.counts(args.group, [r.msg_id for r in mine])
            listed = []
            for r in mine:
                members, delivered, read = counts.get(r.msg_id, (0, 0, 0))
                listed.append({"msg_id": r.msg_id.hex(), "text": r.text, "state": r.state,
                               "members": members, "delivered": delivered, "read": read})  # fmt: skip
            if args.json:
                print(json.dumps(listed))
            for item in listed if not args.json else ():
                where = (
                    f"delivered to {item['delivered']} of {item['members']}, read by {item['read']}"
                    if item["members"]
                    else str(item["state"])
                )
                print(f"  {item['text'][:50]:<50}  {where}")
        else:  # members
            await g.refresh()
            row = g.find(args.group, invited=True)
            members = g.store.members(row.gid)
            if args.json:
                print(json.dumps(_row(row, members)))
            for user, role in members.items() if not args.json else ():
                print(f"  {user:<24} {role}")
        return 0

    return _run(args, body)


def _row(row: Any, members: dict[str, str] | None = None) -> dict[str, Any]:
    data = {"group": row.gid.hex(), "name": row.name, "role": row.role, "seq": row.seq}
    if members is not None:
        data["members"] = [{"username": u, "role": r} for u, r in members.items()]
    return data


COMMANDS = {"group": cmd_group}
