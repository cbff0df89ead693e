"""The server's store: accounts, resume tokens, buddies, groups, devices, offline envelopes.

SQLite (one file, the default) or PostgreSQL (a cluster's shared state), behind
:mod:`rendezvous.sql`; the queries here are written once, in what both engines
speak. Every method that changes state commits before it returns (SQLite: WAL
with ``synchronous=FULL``; PostgreSQL: ``synchronous_commit`` on), so whatever
the server acknowledges survives ``kill -9`` and power loss. The schema is
versioned and upgraded by the ordered :data:`MIGRATIONS` on both; a database
newer than this code is refused rather than damaged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .sql import Connection, SchemaTooNew, StoreUnavailable, connect

__all__ = ["MIGRATIONS", "Database", "SchemaTooNew", "StoreUnavailable"]
NOTICE_LOCK = 0x6E6F7469  # one node at a time sends email notices (see Database.try_lock)
NO_LIMIT = 2**62
THROTTLE_KEEP_MS = 3600 * 1000  # a shared bucket unused this long is full again: its row goes

MIGRATIONS: list[str] = [
    # 1: first schema
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        pw_hash BLOB NOT NULL,
        identity_key BLOB NOT NULL,
        created_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE tokens (
        token_hash BLOB PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        expires_ms INTEGER NOT NULL
    );
    -- (a, b, 'sent'): a asked b. (a, b, 'mutual') and (b, a, 'mutual'): buddies.
    CREATE TABLE relations (
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        other_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        state TEXT NOT NULL CHECK (state IN ('sent', 'mutual')),
        PRIMARY KEY (user_id, other_id)
    );
    CREATE INDEX relations_other ON relations(other_id);
    CREATE TABLE offline (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        recipient_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        sender TEXT NOT NULL,
        msg_id BLOB NOT NULL,
        envelope BLOB NOT NULL,
        stored_ms INTEGER NOT NULL,
        UNIQUE (recipient_id, msg_id)
    );
    CREATE INDEX offline_stored ON offline(stored_ms);
    """,
    # 2: groups (issue 15). Membership here; what members say is sealed end to end and
    # kept in the offline store, one row per member (``grp``: the group it came in).
    # Membership events go the same way, with an empty sender, so each member gets
    # messages and events in one order, exactly once.
    """
    CREATE TABLE groups (
        id INTEGER PRIMARY KEY,
        gid BLOB NOT NULL UNIQUE,
        name TEXT NOT NULL,
        seq INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE group_members (
        group_id INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'invited')),
        PRIMARY KEY (group_id, user_id)
    );
    CREATE INDEX group_members_user ON group_members(user_id);
    -- A post is kept once; each member's row points at it (an empty envelope of its own).
    -- ``copies`` rows were made, ``delivered`` of them acknowledged: what its sender is told.
    CREATE TABLE group_posts (
        id INTEGER PRIMARY KEY,
        envelope BLOB NOT NULL,
        gid BLOB NOT NULL,
        msg_id BLOB NOT NULL,
        sender TEXT NOT NULL,
        copies INTEGER NOT NULL DEFAULT 0,
        delivered INTEGER NOT NULL DEFAULT 0,
        stored_ms INTEGER NOT NULL
    );
    CREATE INDEX group_posts_msg ON group_posts(gid, msg_id);
    CREATE TABLE group_reads (          -- who said they read which post (once each)
        post_id INTEGER NOT NULL REFERENCES group_posts(id) ON DELETE CASCADE,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        PRIMARY KEY (post_id, user_id)
    );
    ALTER TABLE offline ADD COLUMN grp BLOB;
    ALTER TABLE offline ADD COLUMN post_id INTEGER REFERENCES group_posts(id);
    CREATE INDEX offline_grp ON offline(grp, recipient_id);
    CREATE INDEX offline_post ON offline(post_id);
    """,
    # 3: devices (issue 16). An account has one or more devices, each with its own key
    # (the first one's is the account's identity key); a resume token belongs to one
    # device. An offline envelope is for every device of its recipient: it goes when
    # each has taken it (``offline_taken``); ``not_for``: a device's copy of what it
    # sent or took, for its account's other devices.
    """
    CREATE TABLE devices (
        id INTEGER PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        device_key BLOB NOT NULL,
        name TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL DEFAULT 0,
        UNIQUE (user_id, device_key)
    );
    INSERT INTO devices (user_id, device_key, name, created_ms)
        SELECT id, identity_key, 'first device', created_ms FROM users;
    ALTER TABLE tokens ADD COLUMN device_id INTEGER REFERENCES devices(id) ON DELETE CASCADE;
    UPDATE tokens SET device_id = (SELECT d.id FROM devices d WHERE d.user_id = tokens.user_id);
    ALTER TABLE offline ADD COLUMN not_for INTEGER;
    CREATE TABLE offline_taken (
        store_id INTEGER NOT NULL REFERENCES offline(id) ON DELETE CASCADE,
        device_id INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        PRIMARY KEY (store_id, device_id)
    );
    """,
    # 4: email notices and the account's settings (issue 16). ``email_code``: a hash of
    # the verification code mailed; ``offline.counts``: something a person wrote (not a
    # receipt), what notices count.
    """
    ALTER TABLE users ADD COLUMN email TEXT;
    ALTER TABLE users ADD COLUMN email_verified INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE users ADD COLUMN email_code BLOB;
    ALTER TABLE users ADD COLUMN email_code_expires_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE users ADD COLUMN email_code_tries INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE users ADD COLUMN notify INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE users ADD COLUMN notify_delay_s INTEGER NOT NULL DEFAULT 3600;
    ALTER TABLE users ADD COLUMN notify_period_s INTEGER NOT NULL DEFAULT 86400;
    ALTER TABLE users ADD COLUMN last_notice_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE offline ADD COLUMN counts INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX users_mailed ON users(email_verified, notify);
    """,
    # 5: the cluster (issue 17): rate-limit buckets every node shares (password guesses at
    # one account, from any node); a row per account tried, dropped an hour after its last use.
    """
    CREATE TABLE throttle (
        key TEXT PRIMARY KEY,
        tokens DOUBLE PRECISION NOT NULL,
        at_ms INTEGER NOT NULL
    );
    """,
]


@dataclass(frozen=True)
class User:
    id: int
    username: str
    pw_hash: bytes
    identity_key: bytes
    last_seen_ms: int


# An offline row (``o``) the device ``:device`` is still to take: not its own copy for the
# account's other devices, and not taken by it yet.
FOR_DEVICE = (
    "(o.not_for IS NULL OR o.not_for != :device) AND NOT EXISTS "
    "(SELECT 1 FROM offline_taken t WHERE t.store_id = o.id AND t.device_id = :device)"
)


@dataclass(frozen=True)
class AccountRow:
    email: str
    verified: bool
    notify: bool
    delay_s: int
    period_s: int
    code_hash: bytes | None
    code_expires_ms: int
    code_tries: int
    last_notice_ms: int


@dataclass(frozen=True)
class Device:
    id: int
    user_id: int
    key: bytes
    name: str
    created_ms: int
    last_seen_ms: int


@dataclass(frozen=True)
class Relation:
    """One row of a user's buddy list, from that user's point of view."""

    username: str
    identity_key: bytes
    state: str  # "mutual", "sent" (we asked) or "received" (they asked)
    last_seen_ms: int


@dataclass(frozen=True)
class StoredEnvelope:
    id: int
    sender: str
    envelope: bytes
    stored_ms: int
    grp: bytes | None = None


@dataclass(frozen=True)
class Group:
    id: int
    gid: bytes
    name: str
    seq: int


@dataclass(frozen=True)
class Member:
    user_id: int
    username: str
    identity_key: bytes
    role: str  # owner, admin, member, invited


class Database:
    def __init__(self, target: Path | str) -> None:
        """``target``: a SQLite file, or a ``postgresql://`` URL."""
        self.conn: Connection = connect(str(target), MIGRATIONS)
        self.path = self.conn.path

    @property
    def schema_version(self) -> int:
        return self.conn.schema_version()

    def transaction(self) -> AbstractContextManager[None]:
        """Everything inside commits together (or not at all); nests."""
        return self.conn.transaction()

    @contextmanager
    def chore(self, key: int) -> Iterator[bool]:
        """A transaction holding a lock only one node gets at a time (True if this one did):
        for work one node must do for all, like the email sweep."""
        with self.conn.transaction():
            yield self.conn.try_lock(key)

    def close(self) -> None:
        self.conn.close()

    # -- accounts -------------------------------------------------------------

    def add_user(self, username: str, pw_hash: bytes, identity_key: bytes, now_ms: int) -> bool:
        """False if the name is taken. The key is also the first device's."""
        with self.conn.transaction():
            row = self.conn.execute(
                "INSERT INTO users (username, pw_hash, identity_key, created_ms) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING id",
                (username, pw_hash, identity_key, now_ms),
            ).fetchone()
            if row is None:
                return False
            self.conn.execute(
                "INSERT INTO devices (user_id, device_key, name, created_ms) VALUES (?, ?, ?, ?)",
                (row[0], identity_key, "first device", now_ms),
            )
        return True

    # -- the account: email, notices, password, deletion ----------------------------

    def account(self, user_id: int) -> AccountRow:
        r = self.conn.execute(
            "SELECT email, email_verified, notify, notify_delay_s, notify_period_s, email_code, "
            "email_code_expires_ms, email_code_tries, last_notice_ms FROM users WHERE id = ?",
            (user_id,),
        ).fetchone()
        code = bytes(r[5]) if r[5] is not None else None
        return AccountRow(r[0] or "", bool(r[1]), bool(r[2]), r[3], r[4], code, r[6], r[7], r[8])

    def set_email(self, user_id: int, email: str, code_hash: bytes | None, expires_ms: int) -> None:
        """A new address (unverified until its code comes back), or none."""
        self.conn.execute(
            "UPDATE users SET email = ?, email_verified = 0, email_code = ?, email_code_expires_ms = ?, "
            "email_code_tries = 0 WHERE id = ?",
            (email or None, code_hash, expires_ms, user_id),
        )

    def code_tried(self, user_id: int, right: bool) -> None:
        if right:
            self.conn.execute(
                "UPDATE users SET email_verified = 1, email_code = NULL, email_code_tries = 0 WHERE id = ?",
                (user_id,),
            )
        else:
            self.conn.execute(
                "UPDATE users SET email_code_tries = email_code_tries + 1 WHERE id = ?", (user_id,)
            )

    def set_notify(self, user_id: int, on: bool, delay_s: int, period_s: int) -> None:
        self.conn.execute(
            "UPDATE users SET notify = ?, notify_delay_s = ?, notify_period_s = ? WHERE id = ?",
            (int(on), delay_s, period_s, user_id),
        )

    def notices_due(self, now_ms: int, limit: int) -> list[tuple[int, str, str, list[tuple[str, int]]]]:
        """(user id, username, email, [(sender, count)]) for users with a verified address and
        notices on who have something a person wrote waiting longer than their delay, newer
        than their last notice, and no notice within their period."""
        rows = self.conn.execute(
            "SELECT u.id, u.username, u.email, o.sender, COUNT(*) FROM users u "
            "JOIN offline o ON o.recipient_id = u.id "
            "WHERE u.email_verified = 1 AND u.notify = 1 AND o.counts = 1 AND o.sender != '' "
            "AND o.not_for IS NULL AND o.stored_ms <= :now - u.notify_delay_s * 1000 "
            "AND o.stored_ms > u.last_notice_ms AND u.last_notice_ms <= :now - u.notify_period_s * 1000 "
            "GROUP BY u.id, o.sender ORDER BY u.id, o.sender",
            {"now": now_ms},
        ).fetchall()
        out: dict[int, tuple[int, str, str, list[tuple[str, int]]]] = {}
        for uid, name, email, sender, count in rows:
            if uid not in out:
                if len(out) >= limit:
                    break
                out[uid] = (uid, name, email, [])
            out[uid][3].append((sender, count))
        return list(out.values())

    def noticed(self, user_id: int, now_ms: int) -> None:
        self.conn.execute("UPDATE users SET last_notice_ms = ? WHERE id = ?", (now_ms, user_id))

    def set_password(self, user_id: int, pw_hash: bytes) -> None:
        """A new password: every saved session (token) but none ends; devices stay linked."""
        self.conn.execute("UPDATE users SET pw_hash = ? WHERE id = ?", (pw_hash, user_id))

    def delete_user(self, user_id: int) -> None:
        """Remove the account and everything of it: devices, tokens, buddies, what waits for
        it and what it left waiting for others, its group posts and reads; a group it owned
        goes to another member (an admin first), or away if nobody else is in it."""
        row = self.conn.execute("SELECT username FROM users WHERE id = ?", (user_id,)).fetchone()
        if row is None:
            return
        name = row[0]
        with self.conn.transaction():
            for (gid,) in self.conn.execute(
                "SELECT group_id FROM group_members WHERE user_id = ? AND role = 'owner'", (user_id,)
            ).fetchall():
                heir = self.conn.execute(
                    "SELECT user_id FROM group_members WHERE group_id = ? AND user_id != ? "
                    "AND role != 'invited' ORDER BY role = 'admin' DESC, user_id LIMIT 1",
                    (gid, user_id),
                ).fetchone()
                if heir is None:
                    self.conn.execute(
                        "DELETE FROM offline WHERE grp = (SELECT gid FROM groups WHERE id = ?)", (gid,)
                    )
                    self.conn.execute("DELETE FROM groups WHERE id = ?", (gid,))
                else:
                    self.conn.execute(
                        "UPDATE group_members SET role = 'owner' WHERE group_id = ? AND user_id = ?",
                        (gid, heir[0]),
                    )
            self.conn.execute("DELETE FROM offline WHERE sender = ?", (name,))
            self.conn.execute("DELETE FROM group_posts WHERE sender = ?", (name,))
            self.conn.execute("DELETE FROM users WHERE id = ?", (user_id,))  # the rest cascades

    # -- devices ----------------------------------------------------------------

    def devices(self, user_id: int) -> list[Device]:
        rows = self.conn.execute(
            "SELECT id, user_id, device_key, name, created_ms, last_seen_ms FROM devices "
            "WHERE user_id = ? ORDER BY id",
            (user_id,),
        ).fetchall()
        return [Device(r[0], r[1], bytes(r[2]), r[3], r[4], r[5]) for r in rows]

    def device_count(self, user_id: int) -> int:
        row = self.conn.execute("SELECT COUNT(*) FROM devices WHERE user_id = ?", (user_id,)).fetchone()
        return int(row[0])

    def device_by_key(self, user_id: int, key: bytes) -> Device | None:
        return next((d for d in self.devices(user_id) if d.key == key), None)

    def add_device(self, user_id: int, key: bytes, name: str, now_ms: int) -> int | None:
        """The new device's id; None if that key is some device's already."""
        row = self.conn.execute(
            "INSERT INTO devices (user_id, device_key, name, created_ms) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING RETURNING id",
            (user_id, key, name, now_ms),
        ).fetchone()
        return int(row[0]) if row else None

    def remove_device(self, user_id: int, device_id: int) -> bool:
        """Remove a device (its tokens and what it took go with it): the copies it left for
        the account's other devices are now for all of them, and what waited only for it
        is dropped."""
        with self.conn.transaction():
            cur = self.conn.execute("DELETE FROM devices WHERE id = ? AND user_id = ?", (device_id, user_id))
            if cur.rowcount:
                self.conn.execute(
                    "UPDATE offline SET not_for = NULL WHERE recipient_id = ? AND not_for = ?",
                    (user_id, device_id),
                )
                self._drop_taken_by_all(user_id)
        return cur.rowcount > 0

    def reset_identity(self, user_id: int, key: bytes, name: str, now_ms: int) -> int:
        """Every device was lost: ``key`` is the account's identity key and its only device."""
        with self.conn.transaction():
            self.conn.execute("DELETE FROM devices WHERE user_id = ?", (user_id,))
            self.conn.execute("DELETE FROM tokens WHERE user_id = ?", (user_id,))
            self.conn.execute("UPDATE users SET identity_key = ? WHERE id = ?", (key, user_id))
            self.conn.execute(
                "DELETE FROM offline WHERE recipient_id = ? AND not_for IS NOT NULL", (user_id,)
            )
            row = self.conn.execute(
                "INSERT INTO devices (user_id, device_key, name, created_ms) VALUES (?, ?, ?, ?) "
                "RETURNING id",
                (user_id, key, name, now_ms),
            ).fetchone()
        return int(row[0])

    def device_seen(self, device_id: int, now_ms: int) -> None:
        self.conn.execute("UPDATE devices SET last_seen_ms = ? WHERE id = ?", (now_ms, device_id))

    def _drop_taken_by_all(self, user_id: int) -> None:
        """Envelopes every device of ``user_id`` has taken (one fewer device now) go; a copy
        counts as taken by the device it is from (the rule of :meth:`ack_offline_many`)."""
        self.conn.execute(
            "DELETE FROM offline WHERE recipient_id = :user AND "
            "(SELECT COUNT(*) FROM offline_taken t WHERE t.store_id = offline.id) "
            "+ CASE WHEN not_for IS NULL THEN 0 ELSE 1 END "
            ">= (SELECT COUNT(*) FROM devices WHERE user_id = :user)",
            {"user": user_id},
        )

    def user(self, username: str) -> User | None:
        row = self.conn.execute(
            "SELECT id, username, pw_hash, identity_key, last_seen_ms FROM users WHERE username = ?",
            (username,),
        ).fetchone()
        return User(*row) if row else None

    def set_last_seen(self, user_id: int, now_ms: int) -> None:
        self.conn.execute("UPDATE users SET last_seen_ms = ? WHERE id = ?", (now_ms, user_id))

    # -- resume tokens (stored hashed: a stolen database does not log anyone in) --

    def add_token(self, user_id: int, token_hash: bytes, expires_ms: int, device_id: int) -> None:
        self.conn.execute(
            "INSERT INTO tokens (token_hash, user_id, expires_ms, device_id) VALUES (?, ?, ?, ?)",
            (token_hash, user_id, expires_ms, device_id),
        )

    def token_device(self, user_id: int, token_hash: bytes, now_ms: int) -> int | None:
        """The device a valid token belongs to; None if it is not (or no longer) valid."""
        row = self.conn.execute(
            "SELECT device_id FROM tokens WHERE token_hash = ? AND user_id = ? AND expires_ms > ?",
            (token_hash, user_id, now_ms),
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def revoke_token(self, token_hash: bytes) -> None:
        self.conn.execute("DELETE FROM tokens WHERE token_hash = ?", (token_hash,))

    # -- buddies ----------------------------------------------------------------

    def relation(self, a: int, b: int) -> str | None:
        row = self.conn.execute(
            "SELECT state FROM relations WHERE user_id = ? AND other_id = ?", (a, b)
        ).fetchone()
        return row[0] if row else None

    def add_request(self, a: int, b: int) -> None:
        self.conn.execute("INSERT INTO relations VALUES (?, ?, 'sent') ON CONFLICT DO NOTHING", (a, b))

    def make_mutual(self, a: int, b: int) -> None:
        with self.conn.transaction():
            for x, y in ((a, b), (b, a)):
                self.conn.execute(
                    "INSERT INTO relations VALUES (?, ?, 'mutual') "
                    "ON CONFLICT (user_id, other_id) DO UPDATE SET state = excluded.state",
                    (x, y),
                )

    def remove_relation(self, a: int, b: int) -> bool:
        """Delete whatever links a and b (request either way, or buddyship); True if anything did."""
        with self.conn.transaction():
            cur = self.conn.execute(
                "DELETE FROM relations "
                "WHERE (user_id = ? AND other_id = ?) OR (user_id = ? AND other_id = ?)",
                (a, b, b, a),
            )
        return cur.rowcount > 0

    def relations(self, user_id: int) -> list[Relation]:
        rows = self.conn.execute(
            """
            SELECT u.username, u.identity_key, r.state, u.last_seen_ms
              FROM relations r JOIN users u ON u.id = r.other_id WHERE r.user_id = ?
            UNION ALL
            SELECT u.username, u.identity_key, 'received', u.last_seen_ms
              FROM relations r JOIN users u ON u.id = r.user_id
             WHERE r.other_id = ? AND r.state = 'sent'
            ORDER BY 1
            """,
            (user_id, user_id),
        ).fetchall()
        return [Relation(*row) for row in rows]

    def mutual_buddies(self, user_id: int) -> set[str]:
        rows = self.conn.execute(
            "SELECT u.username FROM relations r JOIN users u ON u.id = r.other_id "
            "WHERE r.user_id = ? AND r.state = 'mutual'",
            (user_id,),
        ).fetchall()
        return {row[0] for row in rows}

    # -- offline envelopes --------------------------------------------------------

    def offline_usage(self, recipient_id: int, sender: str) -> tuple[int, int, int, int]:
        """(envelopes, bytes) waiting for ``recipient_id`` in all, then those from ``sender``."""
        return self.offline_usages([recipient_id], sender)[recipient_id]

    def has_offline(self, recipient_id: int, msg_id: bytes) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM offline WHERE recipient_id = ? AND msg_id = ?", (recipient_id, msg_id)
        ).fetchone()
        return row is not None

    def store_offline(
        self,
        recipient_id: int,
        sender: str,
        msg_id: bytes,
        envelope: bytes,
        now_ms: int,
        grp: bytes | None = None,
        not_for: int | None = None,
        counts: bool = False,
    ) -> int | None:
        """Keep an envelope (``not_for``: a device's copy for its account's other devices;
        ``counts``: a person wrote it, for email notices); returns its store id, or None
        when this id was already stored."""
        row = self.conn.execute(
            "INSERT INTO offline (recipient_id, sender, msg_id, envelope, stored_ms, grp, not_for, "
            "counts) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
            (recipient_id, sender, msg_id, envelope, now_ms, grp, not_for, int(counts)),
        ).fetchone()
        return int(row[0]) if row else None

    def offline_count(self, recipient_id: int, device_id: int = 0) -> int:
        """What waits for ``recipient_id``'s device ``device_id`` (not taken by it yet)."""
        row = self.conn.execute(
            f"SELECT COUNT(*) FROM offline o WHERE o.recipient_id = :user AND {FOR_DEVICE}",
            {"user": recipient_id, "device": device_id},
        )
        return int(row.fetchone()[0])

    def last_offline_id(self, recipient_id: int) -> int:
        row = self.conn.execute("SELECT MAX(id) FROM offline WHERE recipient_id = ?", (recipient_id,))
        return int(row.fetchone()[0] or 0)

    def pending_offline(
        self, recipient_id: int, after_id: int = 0, limit: int = NO_LIMIT, device_id: int = 0
    ) -> list[StoredEnvelope]:
        """Envelopes for ``recipient_id`` (its device ``device_id`` has not taken yet) with a
        store id above ``after_id``, oldest first."""
        rows = self.conn.execute(
            "SELECT o.id, o.sender, COALESCE(p.envelope, o.envelope), o.stored_ms, o.grp FROM offline o "
            "LEFT JOIN group_posts p ON p.id = o.post_id WHERE o.recipient_id = :user AND o.id > :after "
            f"AND {FOR_DEVICE} ORDER BY o.id LIMIT :limit",
            {"user": recipient_id, "after": after_id, "limit": limit, "device": device_id},
        ).fetchall()
        return [StoredEnvelope(*row) for row in rows]

    def ack_offline(self, recipient_id: int, store_ids: list[int], device_id: int = 0) -> int:
        """Envelopes taken by ``recipient_id``'s device (only the recipient's own); returns
        how many went (each goes once every device has taken it)."""
        return self.ack_offline_many([(recipient_id, device_id, sid) for sid in store_ids])

    def ack_offline_many(self, acks: list[tuple[int, int, int]]) -> int:
        """(recipient id, device id, store id) taken, for many recipients, in one transaction;
        returns how many envelopes went. With one device (most accounts) an envelope goes at
        once; with more, when each device (but the one it is a copy from) has taken it."""
        devices: dict[int, int] = {}
        with self.conn.transaction():
            deleted = 0
            for recipient_id, device_id, sid in sorted(acks, key=lambda a: a[2]):  # one lock order
                if recipient_id not in devices:
                    devices[recipient_id] = self.device_count(recipient_id)
                # locked (PostgreSQL): two devices on two nodes taking one envelope at once
                # must not both count themselves the second-to-last
                row = self.conn.execute(
                    "SELECT post_id, not_for FROM offline WHERE id = ? AND recipient_id = ?"
                    + self.conn.for_update,
                    (sid, recipient_id),
                ).fetchone()
                if row is None:
                    continue
                taken = self.conn.execute(
                    "SELECT COUNT(*) FROM offline_taken WHERE store_id = ?", (sid,)
                ).fetchone()[0]
                post_id, not_for = row
                if post_id is not None and taken == 0:  # a group post's copy: one more delivered
                    self.conn.execute(
                        "UPDATE group_posts SET delivered = delivered + 1 WHERE id = ?", (post_id,)
                    )
                if taken + 1 + (not_for is not None) >= devices[recipient_id] or not device_id:
                    self.conn.execute("DELETE FROM offline WHERE id = ?", (sid,))
                    deleted += 1
                else:
                    self.conn.execute(
                        "INSERT INTO offline_taken VALUES (?, ?) ON CONFLICT DO NOTHING", (sid, device_id)
                    )
        return deleted

    def drop_offline_between(self, a: User, b: User) -> int:
        """Forget what waits between two users (either way): they are no longer buddies."""
        cur = self.conn.execute(
            "DELETE FROM offline "
            "WHERE (recipient_id = ? AND sender = ?) OR (recipient_id = ? AND sender = ?)",
            (a.id, b.username, b.id, a.username),
        )
        return cur.rowcount

    # -- groups -------------------------------------------------------------------

    def group(self, gid: bytes) -> Group | None:
        row = self.conn.execute("SELECT id, gid, name, seq FROM groups WHERE gid = ?", (gid,)).fetchone()
        return Group(int(row[0]), bytes(row[1]), str(row[2]), int(row[3])) if row else None

    def add_group(self, gid: bytes, name: str, now_ms: int) -> Group:
        row = self.conn.execute(
            "INSERT INTO groups (gid, name, created_ms) VALUES (?, ?, ?) RETURNING id", (gid, name, now_ms)
        ).fetchone()
        return Group(int(row[0]), gid, name, 0)

    def members(self, group_id: int) -> list[Member]:
        rows = self.conn.execute(
            "SELECT u.id, u.username, u.identity_key, m.role FROM group_members m "
            "JOIN users u ON u.id = m.user_id WHERE m.group_id = ? ORDER BY u.username",
            (group_id,),
        ).fetchall()
        return [Member(int(r[0]), str(r[1]), bytes(r[2]), str(r[3])) for r in rows]

    def set_member(self, group_id: int, user_id: int, role: str | None) -> None:
        """Give ``user_id`` ``role`` in the group (None: out of it)."""
        if role is None:
            self.conn.execute(
                "DELETE FROM group_members WHERE group_id = ? AND user_id = ?", (group_id, user_id)
            )
        else:
            self.conn.execute(
                "INSERT INTO group_members VALUES (?, ?, ?) "
                "ON CONFLICT (group_id, user_id) DO UPDATE SET role = excluded.role",
                (group_id, user_id, role),
            )

    def rename_group(self, group_id: int, name: str) -> None:
        self.conn.execute("UPDATE groups SET name = ? WHERE id = ?", (name, group_id))

    def next_seq(self, group_id: int) -> int:
        return int(
            self.conn.execute(
                "UPDATE groups SET seq = seq + 1 WHERE id = ? RETURNING seq", (group_id,)
            ).fetchone()[0]
        )

    def delete_group(self, group_id: int) -> None:
        self.conn.execute("DELETE FROM groups WHERE id = ?", (group_id,))

    def groups_of(self, user_id: int) -> list[Group]:
        rows = self.conn.execute(
            "SELECT g.id, g.gid, g.name, g.seq FROM groups g JOIN group_members m ON m.group_id = g.id "
            "WHERE m.user_id = ? ORDER BY g.name, g.id",
            (user_id,),
        ).fetchall()
        return [Group(int(r[0]), bytes(r[1]), str(r[2]), int(r[3])) for r in rows]

    def group_count(self, user_id: int) -> int:
        """Groups ``user_id`` is in or invited to."""
        row = self.conn.execute("SELECT COUNT(*) FROM group_members WHERE user_id = ?", (user_id,)).fetchone()
        return int(row[0])

    def share_group(self, a: int, b: int) -> bool:
        """Are ``a`` and ``b`` both members (not only invited) of some group?"""
        row = self.conn.execute(
            "SELECT 1 FROM group_members x JOIN group_members y ON x.group_id = y.group_id "
            "WHERE x.user_id = ? AND y.user_id = ? AND x.role != 'invited' AND y.role != 'invited' LIMIT 1",
            (a, b),
        ).fetchone()
        return row is not None

    def offline_usages(self, user_ids: list[int], sender: str) -> dict[int, tuple[int, int, int, int]]:
        """:meth:`offline_usage` for many recipients in one query (a group post's members)."""
        marks = ",".join("?" * len(user_ids))
        rows = self.conn.execute(
            "SELECT recipient_id, COUNT(*), COALESCE(SUM(LENGTH(envelope)), 0), "
            "COALESCE(SUM(CASE WHEN sender = ? THEN 1 ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN sender = ? THEN LENGTH(envelope) END), 0) "
            f"FROM offline WHERE recipient_id IN ({marks}) GROUP BY recipient_id",
            (sender, sender, *user_ids),
        ).fetchall()
        usage = {int(r[0]): (int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows}
        return {u: usage.get(u, (0, 0, 0, 0)) for u in user_ids}

    def store_post(
        self, recipients: list[int], sender: str, msg_id: bytes, envelope: bytes, now_ms: int, grp: bytes
    ) -> list[int]:
        """Keep a group post once, and a row for each recipient that points at it (a copy that
        was there already, a retransmission, is not added again); returns who got a new row."""
        post_id = self.conn.execute(
            "INSERT INTO group_posts (envelope, gid, msg_id, sender, stored_ms) VALUES (?, ?, ?, ?, ?) "
            "RETURNING id",
            (envelope, grp, msg_id, sender, now_ms),
        ).fetchone()[0]
        added = []
        for user_id in recipients:
            cur = self.conn.execute(
                "INSERT INTO offline (recipient_id, sender, msg_id, envelope, stored_ms, grp, "
                "post_id, counts) VALUES (?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT DO NOTHING",
                (user_id, sender, msg_id, b"", now_ms, grp, post_id),
            )
            if cur.rowcount:
                added.append(user_id)
        if not added:
            self.conn.execute("DELETE FROM group_posts WHERE id = ?", (post_id,))
        else:
            self.conn.execute("UPDATE group_posts SET copies = ? WHERE id = ?", (len(added), post_id))
        return added

    def post_counts(self, gid: bytes, sender: str, msg_ids: list[bytes]) -> dict[bytes, tuple[int, int, int]]:
        """(copies, delivered, read) of ``sender``'s posts in the group (a retransmitted post: summed)."""
        out: dict[bytes, tuple[int, int, int]] = {}
        for msg_id in msg_ids:
            row = self.conn.execute(
                "SELECT COALESCE(SUM(copies), 0), COALESCE(SUM(delivered), 0), COUNT(*), "
                "(SELECT COUNT(DISTINCT r.user_id) FROM group_reads r JOIN group_posts q ON q.id = r.post_id "
                " WHERE q.gid = ? AND q.msg_id = ? AND q.sender = ?) "
                "FROM group_posts WHERE gid = ? AND msg_id = ? AND sender = ?",
                (gid, msg_id, sender, gid, msg_id, sender),
            ).fetchone()
            if row[2]:
                out[msg_id] = (int(row[0]), int(row[1]), int(row[3]))
        return out

    def mark_read(self, gid: bytes, reader: int, msg_ids: list[bytes]) -> int:
        """``reader`` read these posts (not their own): counted once each; returns how many new."""
        added = 0
        with self.conn.transaction():
            for msg_id in msg_ids:
                cur = self.conn.execute(
                    "INSERT INTO group_reads SELECT p.id, ? FROM group_posts p "
                    "JOIN users u ON u.username = p.sender "
                    "WHERE p.gid = ? AND p.msg_id = ? AND u.id != ? ORDER BY p.id LIMIT 1 "
                    "ON CONFLICT DO NOTHING",
                    (reader, gid, msg_id, reader),
                )
                added += cur.rowcount
        return added

    def drop_group_messages(self, gid: bytes, recipient_id: int | None = None) -> int:
        """Forget the group's messages waiting (for one recipient, or for all); its membership
        events stay: they tell whoever they are for what happened."""
        if recipient_id is None:
            cur = self.conn.execute("DELETE FROM offline WHERE grp = ? AND sender != ''", (gid,))
        else:
            cur = self.conn.execute(
                "DELETE FROM offline WHERE grp = ? AND recipient_id = ? AND sender != ''", (gid, recipient_id)
            )
        return cur.rowcount

    def take_token(self, key: str, rate: float, burst: float, now_ms: int) -> bool:
        """One token from the shared bucket ``key`` (``rate`` per second, up to ``burst``),
        in one statement (nodes racing for the last token: one gets it); False if empty."""
        refilled = "(throttle.tokens + (:now - throttle.at_ms) * :rate / 1000.0)"
        capped = f"(CASE WHEN {refilled} > :burst THEN :burst ELSE {refilled} END)"
        row = self.conn.execute(
            "INSERT INTO throttle (key, tokens, at_ms) VALUES (:key, :burst - 1, :now) "
            f"ON CONFLICT (key) DO UPDATE SET tokens = {capped} - 1, at_ms = :now "
            f"WHERE {capped} >= 1 RETURNING tokens",
            {"key": key, "rate": float(rate), "burst": float(burst), "now": now_ms},
        ).fetchone()
        return row is not None

    def store_size(self) -> tuple[int, int]:
        """(envelopes waiting, their bytes, group posts' counted once): for the metrics."""
        rows, size = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(envelope)), 0) FROM offline"
        ).fetchone()
        posts = self.conn.execute("SELECT COALESCE(SUM(LENGTH(envelope)), 0) FROM group_posts").fetchone()[0]
        return int(rows), int(size) + int(posts)

    def expire(self, now_ms: int, max_age_ms: int) -> int:
        """Drop offline envelopes and tokens past their time."""
        with self.conn.transaction():
            cur = self.conn.execute("DELETE FROM offline WHERE stored_ms < ?", (now_ms - max_age_ms,))
            self.conn.execute("DELETE FROM tokens WHERE expires_ms <= ?", (now_ms,))
            self.conn.execute("DELETE FROM throttle WHERE at_ms < ?", (now_ms - THROTTLE_KEEP_MS,))
            # group posts no member's row points at any more (every copy taken), kept as long
            # as a stored envelope would be, for their delivered counts
            self.conn.execute(
                "DELETE FROM group_posts WHERE stored_ms < ? "
                "AND NOT EXISTS (SELECT 1 FROM offline WHERE post_id = group_posts.id)",
                (now_ms - max_age_ms,),
            )
        return cur.rowcount
