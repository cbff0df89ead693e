"""``p2pim send-file``, ``files``, ``accept``, ``decline``, ``cancel``.

``send-file`` and ``accept`` stay until their transfers end (progress bars with
rate and time left on a terminal, JSON events with ``--json``), unless ``--no-wait``; a
transfer left running goes on in the next ``listen`` or ``chat`` of either
side, from where it stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from p2pim.files.disk import human_size

from .render import event_line

if TYPE_CHECKING:
    from tqdm import tqdm

    from p2pim.files.service import FileService
    from p2pim.lan.files import LanFiles

FINAL_EVENTS = ("FileDone", "FileFailed")


def add_parsers(sub: Any, common: argparse.ArgumentParser, udp: argparse.ArgumentParser) -> None:
    p = sub.add_parser("send-file", parents=[common, udp], help="offer files to USER; they go once accepted")
    p.add_argument("user")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--no-wait", action="store_true", help="offer and return; listen or chat sends the bytes")
    p = sub.add_parser("files", parents=[common], help="file offers and transfers, both ways (local)")
    p.add_argument(
        "--all", action="store_true", help="also finished ones (default: the last 20 and all open)"
    )
    p = sub.add_parser("accept", parents=[common, udp], help="accept an offered file (ID from p2pim files)")
    p.add_argument("id")
    p.add_argument("--dir", type=Path, help="where to save it (default $XDG_DOWNLOAD_DIR or ~/Downloads)")
    p.add_argument("--no-wait", action="store_true", help="accept and return; listen or chat receives it")
    for name, text in (("decline", "decline an offered file"), ("cancel", "stop a transfer, either way")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("id")


def cmd_send_file(args: argparse.Namespace) -> int:
    from .chat import EXIT_FAILED, _run

    async def body(c: Any) -> int:
        c.reconnect = True  # it may run long: a lost connection comes back, the transfer goes on
        offers = [await c.send_file(args.user, path) for path in args.paths]
        for t in offers:
            _out(
                args,
                {"event": "offered", **transfer_json(t)},
                f"offered {t.name} ({human_size(t.size)}) to {args.user}",
            )
        if args.no_wait:
            return 0
        if args.user not in c.messenger.delivery.online:
            _out(
                args,
                {"event": "waiting", "peer": args.user},
                f"{args.user} is offline: the offer waits on the server; the file goes once "
                f"{args.user} accepts and you are both online (p2pim listen)",
            )
            return 0
        ok = await _follow(args, c, {t.file_id for t in offers})
        return 0 if ok else EXIT_FAILED

    return _run(args, body)


def cmd_accept(args: argparse.Namespace) -> int:
    from .chat import EXIT_FAILED, _run

    async def body(c: Any) -> int:
        c.reconnect = True
        t = await c.accept_file(c.find_file(args.id).file_id, args.dir)
        _out(
            args,
            {"event": "accepted", **transfer_json(t)},
            f"accepted {t.name} from {t.peer}: saving to {t.path}",
        )
        if args.no_wait:
            return 0
        ok = await _follow(args, c, {t.file_id})
        return 0 if ok else EXIT_FAILED

    return _run(args, body)


def cmd_decline(args: argparse.Namespace) -> int:
    from .chat import _run

    async def body(c: Any) -> int:
        t = await c.decline_file(c.find_file(args.id).file_id)
        _out(args, {"event": "declined", **transfer_json(t)}, f"declined {t.name} from {t.peer}")
        return 0

    return _run(args, body)


def cmd_cancel(args: argparse.Namespace) -> int:
    from .chat import _run

    async def body(c: Any) -> int:
        t = await c.cancel_file(c.find_file(args.id).file_id)
        _out(
            args,
            {"event": "cancelled", **transfer_json(t)},
            f"cancelled {t.name} ({'to' if t.outgoing else 'from'} {t.peer})",
        )
        return 0

    return _run(args, body, login="try")


def cmd_files(args: argparse.Namespace) -> int:
    from p2pim.files.store import TransferStore
    from p2pim.messaging.store import ClientStore
    from p2pim.profile import Profile, ProfileError

    try:
        store = ClientStore(Profile(args.profile).db_path)
    except ProfileError as exc:
        print(f"p2pim: {exc}", file=sys.stderr)
        return 2
    try:
        rows = TransferStore(store.conn).list()
    finally:
        store.close()
    if not args.all:
        rows = [t for i, t in enumerate(rows) if not t.final or i >= len(rows) - 20]
    if args.json:
        print(json.dumps([transfer_json(t) for t in rows]))
        return 0
    if not rows:
        print("no file transfers")
    for t in rows:
        arrow = f"to {t.peer}" if t.outgoing else f"from {t.peer}"
        state = t.state
        if t.state == "accepted":
            state = f"{percent(t.durable, t.size)} on {'their' if t.outgoing else 'our'} disk"
        elif t.state == "offered" and not t.outgoing:
            state = f"offered: p2pim accept {t.file_id.hex()[:8]}"
        where = f"  {t.path}" if t.path and (t.outgoing or t.state == "done") else ""
        detail = f" ({t.detail})" if t.detail and t.state in ("failed", "cancelled") else ""
        print(f"{t.file_id.hex()[:8]}  {arrow:<16} {t.name} ({human_size(t.size)})  {state}{detail}{where}")
    return 0


async def _follow(args: argparse.Namespace, c: Any, ids: set[bytes]) -> bool:
    """Show progress of ``ids`` until each is done or failed; True if all were done."""
    from p2pim.files import events as fe

    bars = Bars(sys.stderr) if sys.stderr.isatty() and not args.json else None
    ok = True
    try:
        async for ev in c.events():
            if not isinstance(ev, (fe.FileProgress, fe.FileDone, fe.FileFailed, fe.FileAnswered)):
                continue
            if ev.file_id not in ids:
                continue
            if isinstance(ev, fe.FileProgress):
                if args.json:
                    print(json.dumps(event_line(ev)[0]), flush=True)
                elif bars is not None:
                    bars.update(ev.file_id, ev.name, ev.done, ev.size)
                continue
            if bars is not None and isinstance(ev, (fe.FileDone, fe.FileFailed)):
                bars.close(ev.file_id, ev.size if isinstance(ev, fe.FileDone) else None)
            data, line = event_line(ev)
            print(json.dumps(data) if args.json else line, flush=True)
            if isinstance(ev, fe.FileAnswered) and ev.kind == "accepted":
                continue
            ok = ok and isinstance(ev, fe.FileDone)
            ids.discard(ev.file_id)
            if not ids:
                await asyncio.sleep(0)  # let the "done" envelope go out
                while c.delivery.items:
                    await asyncio.sleep(0.05)
                return ok
    finally:
        if bars is not None:
            bars.close_all()
    return ok


class Bars:
    """One progress bar per transfer on a terminal: bytes, percent, rate and time left
    (tqdm), drawn on ``out``; each ends when its transfer does."""

    def __init__(self, out: TextIO, every_s: float = 0.2) -> None:
        self.out = out
        self.every_s = every_s  # redrawn at most this often
        self._bars: dict[bytes, tqdm[Any]] = {}

    def update(self, file_id: bytes, name: str, done: int, size: int) -> None:
        bar = self._bars.get(file_id)
        if bar is None:
            from tqdm import tqdm  # here: the CLI starts without it

            # initial: a resumed transfer's rate counts only the bytes that move now
            bar = tqdm(
                total=size, desc=name, unit="B", unit_scale=True, unit_divisor=1000, file=self.out,
                initial=done, position=len(self._bars), leave=True, dynamic_ncols=True,
                mininterval=self.every_s,
            )  # fmt: skip
            self._bars[file_id] = bar
        bar.update(max(0, done - bar.n))

    def close(self, file_id: bytes, done: int | None) -> None:
        """The transfer ended: at ``done`` bytes (None: it failed, the bar stays where it was)."""
        bar = self._bars.pop(file_id, None)
        if bar is not None:
            if done is not None:
                bar.update(max(0, done - bar.n))
            bar.close()

    def close_all(self) -> None:
        for file_id in list(self._bars):
            self.close(file_id, None)


FILE_COMMANDS = {
    "/send": "/send [NAME] PATH: offer a file (to this buddy in chat; to NAME, or the /to peer, on the LAN)",
    "/accept": "/accept ID: accept an offered file (ID as shown with the offer, or by /files)",
    "/decline": "/decline ID",
    "/cancel": "/cancel ID: stop a transfer",
    "/files": "/files: the last transfers",
}


async def file_command(
    args: argparse.Namespace,
    files: FileService | LanFiles,
    line: str,
    to: str | None,
    known: Callable[[str], bool],
    only: str | None = None,
) -> None:
    """A file command typed in `p2pim chat` or `p2pim lan` (``files``: that session's
    service); what it did is printed like an event. ``to``: who a bare ``/send PATH`` goes
    to; ``known(name)``: whether ``/send NAME PATH`` names a peer; ``only``: list the
    transfers with this peer only. Raises :class:`TransferError` (or the host's error)."""
    from p2pim.files.service import TransferError

    word, _, rest = line.strip().partition(" ")
    rest = rest.strip()
    if word != "/files" and not rest:
        raise TransferError(FILE_COMMANDS[word])
    if word == "/send":
        who, _, path = rest.partition(" ")
        if not path or not known(who):
            who, path = to or "", rest
        if not who:
            raise TransferError("/send NAME PATH (or /to NAME first, then /send PATH)")
        t = await files.send(who, path)
        _out(
            args,
            {"event": "offered", **transfer_json(t)},
            f"offered {t.name} ({human_size(t.size)}) to {who}",
        )
    elif word == "/files":
        rows = [t for t in files.store.list() if files.mine(t)]
        rows = [t for t in rows if only is None or files.peer_of(t) == only][-20:]
        if args.json:
            print(json.dumps({"event": "files", "transfers": [transfer_json(t) for t in rows]}), flush=True)
        for t in rows if not args.json else ():
            way = f"{'to' if t.outgoing else 'from'} {files.peer_of(t)}"
            print(f"  {t.file_id.hex()[:8]}  {way}: {t.name} ({human_size(t.size)}) {t.state}", flush=True)
    else:
        file_id = files.find(rest).file_id
        if word == "/accept":
            t = await files.accept(file_id, getattr(args, "dir", None))
            _out(args, {"event": "accepted", **transfer_json(t)}, f"accepted {t.name}: saving to {t.path}")
        else:
            done = {"/decline": "declined", "/cancel": "cancelled"}[word]
            t = await (files.decline(file_id) if word == "/decline" else files.cancel(file_id))
            _out(args, {"event": done, **transfer_json(t)}, f"{done} {t.name}")


def _out(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if args.json else text, flush=True)


def transfer_json(t: Any) -> dict[str, Any]:
    return {
        "id": t.file_id.hex(),
        "peer": t.peer,
        "outgoing": t.outgoing,
        "name": t.name,
        "size": t.size,
        "state": t.state,
        "durable": t.durable,
        "path": t.path,
        "detail": t.detail,
        "resent": t.resent,
    }


def percent(done: int, size: int) -> str:
    return f"{100 * done / size:.0f}%" if size else "100%"


COMMANDS = {
    "send-file": cmd_send_file,
    "files": cmd_files,
    "accept": cmd_accept,
    "decline": cmd_decline,
    "cancel": cmd_cancel,
}
