"""The client's groups in its database (tables of migration 5 in p2pim.messaging.store):
what the server last said of each group (name, members, our role), the sender keys we
hold, and the group outbox (sender keys to store for members, then posts, in order)."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from ..wire import control_pb2 as pb

ROLE_NAMES = {pb.OWNER: "owner", pb.ADMIN: "admin", pb.MEMBER: "member", pb.INVITED: "invited"}
MAX_PENDING_OUT = 10_000


@dataclass(frozen=True)
class GroupRow:
    gid: bytes
    name: str
    seq: int
    role: str  # ours: owner, admin, member, invited, or gone (left, removed, deleted)

    @property
    def active(self) -> bool:
        return self.role in ("owner", "admin", "member")


Item = tuple[str, str, bytes, bytes]  # kind, target, msg_id, envelope: a row of the group outbox


@dataclass(frozen=True)
class Post:
    """Our post as the history keeps it, and its place in our order."""

    gid: bytes
    sender: str
    epoch: int
    seq: int
    msg_id: bytes
    label: str
    text: str
    sent_at_ms: int


@dataclass(frozen=True)
class Outgoing:
    id: int
    kind: str  # "store" (a sender key for ``target``) or "post" (a message to the group ``target``)
    target: str
    msg_id: bytes
    envelope: bytes


class GroupStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # -- groups and members ------------------------------------------------------------

    def apply(self, info: pb.GroupInfo, me: str) -> GroupRow:
        """The group as the server says it is now (after event ``info.seq``)."""
        mine = next((ROLE_NAMES.get(m.role, "member") for m in info.members if m.username == me), "gone")
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute(
                "INSERT OR REPLACE INTO groups VALUES (?, ?, ?, ?)", (info.group, info.name, info.seq, mine)
            )
            self.conn.execute("DELETE FROM group_members WHERE gid = ?", (info.group,))
            self.conn.executemany(
                "INSERT INTO group_members VALUES (?, ?, ?)",
                [(info.group, m.username, ROLE_NAMES.get(m.role, "member")) for m in info.members],
            )
        return GroupRow(info.group, info.name, info.seq, mine)

    def gone(self, gid: bytes) -> None:
        """We are out of the group (left, removed, or it was deleted): its history stays."""
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute("UPDATE groups SET role = 'gone' WHERE gid = ?", (gid,))
            self.conn.execute("DELETE FROM group_members WHERE gid = ?", (gid,))

    def group(self, gid: bytes) -> GroupRow | None:
        r = self.conn.execute("SELECT gid, name, seq, role FROM groups WHERE gid = ?", (gid,)).fetchone()
        return GroupRow(bytes(r[0]), r[1], r[2], r[3]) if r else None

    def groups(self) -> list[GroupRow]:
        rows = self.conn.execute("SELECT gid, name, seq, role FROM groups ORDER BY name, gid").fetchall()
        return [GroupRow(bytes(r[0]), r[1], r[2], r[3]) for r in rows]

    def named(self, name: str, gone: bool = False) -> list[GroupRow]:
        """The groups ``name`` (or ``#name``) means: those called so, else those whose id starts
        with it; only ones we are in or invited to, unless ``gone``."""
        want = name.removeprefix("#")
        rows = [r for r in self.groups() if gone or r.role != "gone"]
        return [r for r in rows if r.name == want] or [
            r for r in rows if want and r.gid.hex().startswith(want)
        ]

    def members(self, gid: bytes) -> dict[str, str]:
        """username -> role (invited ones too)."""
        rows = self.conn.execute(
            "SELECT username, role FROM group_members WHERE gid = ? ORDER BY username", (gid,)
        )
        return {r[0]: r[1] for r in rows}

    # -- sender keys ------------------------------------------------------------------

    def add_key(
        self, gid: bytes, owner: str, epoch: int, key: bytes, made_for: set[str] | None = None
    ) -> bool:
        """A sender key (``made_for``: ours, the members it is for)."""
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO group_keys (gid, owner, epoch, key, at_ms, made_for)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (gid, owner, epoch, key, int(time.time() * 1000), None if made_for is None else _names(made_for)),
        )
        return cur.rowcount > 0

    def made_for(self, gid: bytes, owner: str, epoch: int) -> set[str] | None:
        """The members our key of ``epoch`` was made for (None: not known, a key from before)."""
        names = self._field("made_for", gid, owner, epoch)
        return None if names is None else _split(names)

    def next_seq(self, gid: bytes, owner: str, epoch: int) -> int:
        """The next place in ``owner``'s order in ``epoch``: ours to give, or a member's to show."""
        return int(self._field("next_seq", gid, owner, epoch) or 0)

    def shown(self, gid: bytes, owner: str, epoch: int, seq: int) -> None:
        """``owner``'s message ``seq`` of ``epoch`` is in the history: the next to show is after it."""
        self.conn.execute(
            "UPDATE group_keys SET next_seq = MAX(next_seq, ?) WHERE gid = ? AND owner = ? AND epoch = ?",
            (seq + 1, gid, owner, epoch),
        )

    def given(self, gid: bytes, owner: str, epoch: int) -> set[str]:
        """Whom our key of ``epoch`` was handed to."""
        return _split(self._field("given", gid, owner, epoch) or "")

    def give(self, gid: bytes, owner: str, epoch: int, names: set[str]) -> None:
        names = self.given(gid, owner, epoch) | names
        self.conn.execute(
            "UPDATE group_keys SET given = ? WHERE gid = ? AND owner = ? AND epoch = ?",
            (_names(names), gid, owner, epoch),
        )

    def key(self, gid: bytes, owner: str, epoch: int) -> bytes | None:
        key = self._field("key", gid, owner, epoch)
        return None if key is None else bytes(key)

    def _field(self, column: str, gid: bytes, owner: str, epoch: int) -> Any:
        """One column of ``owner``'s key of ``epoch`` (None: no such key, or a NULL there)."""
        r = self.conn.execute(
            f"SELECT {column} FROM group_keys WHERE gid = ? AND owner = ? AND epoch = ?", (gid, owner, epoch)
        ).fetchone()
        return r[0] if r else None

    def current_key(self, gid: bytes, owner: str) -> tuple[int, bytes] | None:
        r = self.conn.execute(
            "SELECT epoch, key FROM group_keys WHERE gid = ? AND owner = ? ORDER BY rowid DESC LIMIT 1",
            (gid, owner),
        ).fetchone()
        return (int(r[0]), bytes(r[1])) if r else None

    # -- the group outbox -------------------------------------------------------------

    def queue(self, items: list[Item], post: Post | None = None) -> None:
        """Queue (kind, target, msg_id, envelope) items, and with ``post`` our post's history
        line and its place taken in our order, in one transaction."""
        from ..messaging.store import MESSAGE_COLUMNS

        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                "INSERT INTO group_outbox (kind, target, msg_id, envelope) VALUES (?, ?, ?, ?)", items
            )
            if post is not None:
                self.conn.execute(
                    f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES (?, ?, 1, ?, ?, ?, 'queued', '')",
                    (post.msg_id, post.label, post.text, post.sent_at_ms, post.sent_at_ms),
                )
                self.shown(post.gid, post.sender, post.epoch, post.seq)

    def outgoing(self, limit: int = 100) -> list[Outgoing]:
        rows = self.conn.execute(
            "SELECT id, kind, target, msg_id, envelope FROM group_outbox ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [Outgoing(r[0], r[1], r[2], bytes(r[3]), bytes(r[4])) for r in rows]

    def sent(self, item: Outgoing, state: str = "stored") -> None:
        """The server took ``item`` (or refused it for good): out of the outbox, the history says so."""
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute("DELETE FROM group_outbox WHERE id = ?", (item.id,))
            if item.kind == "post":
                self.conn.execute("UPDATE messages SET state = ? WHERE msg_id = ?", (state, item.msg_id))


def _names(names: set[str]) -> str:
    return "\n".join(sorted(names))


def _split(names: str) -> set[str]:
    return set(names.split("\n")) - {""}
