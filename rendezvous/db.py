"""The server's SQLite store: accounts, resume tokens, buddies, offline envelopes.

WAL mode with ``synchronous=FULL``: every method that changes state commits
before it returns, so whatever the server acknowledges survives ``kill -9``
and power loss. The schema is versioned with ``PRAGMA user_version`` and
upgraded by the ordered :data:`MIGRATIONS`; a database newer than this code is
refused rather than damaged.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from p2pim.sqlite import SchemaTooNew, open_db

__all__ = ["MIGRATIONS", "Database", "SchemaTooNew"]

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
]


@dataclass(frozen=True)
class User:
    id: int
    username: str
    pw_hash: bytes
    identity_key: bytes
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


class Database:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self.conn = open_db(self.path, MIGRATIONS, foreign_keys=True)

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        self.conn.close()

    # -- accounts -------------------------------------------------------------

    def add_user(self, username: str, pw_hash: bytes, identity_key: bytes, now_ms: int) -> bool:
        """False if the name is taken."""
        try:
            self.conn.execute(
                "INSERT INTO users (username, pw_hash, identity_key, created_ms) VALUES (?, ?, ?, ?)",
                (username, pw_hash, identity_key, now_ms),
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def user(self, username: str) -> User | None:
        row = self.conn.execute(
            "SELECT id, username, pw_hash, identity_key, last_seen_ms FROM users WHERE username = ?",
            (username,),
        ).fetchone()
        return User(*row) if row else None

    def set_last_seen(self, user_id: int, now_ms: int) -> None:
        self.conn.execute("UPDATE users SET last_seen_ms = ? WHERE id = ?", (now_ms, user_id))

    # -- resume tokens (stored hashed: a stolen database does not log anyone in) --

    def add_token(self, user_id: int, token_hash: bytes, expires_ms: int) -> None:
        self.conn.execute(
            "INSERT INTO tokens (token_hash, user_id, expires_ms) VALUES (?, ?, ?)",
            (token_hash, user_id, expires_ms),
        )

    def token_valid(self, user_id: int, token_hash: bytes, now_ms: int) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM tokens WHERE token_hash = ? AND user_id = ? AND expires_ms > ?",
            (token_hash, user_id, now_ms),
        ).fetchone()
        return row is not None

    def revoke_token(self, token_hash: bytes) -> None:
        self.conn.execute("DELETE FROM tokens WHERE token_hash = ?", (token_hash,))

    # -- buddies ----------------------------------------------------------------

    def relation(self, a: int, b: int) -> str | None:
        row = self.conn.execute(
            "SELECT state FROM relations WHERE user_id = ? AND other_id = ?", (a, b)
        ).fetchone()
        return row[0] if row else None

    def add_request(self, a: int, b: int) -> None:
        self.conn.execute("INSERT OR IGNORE INTO relations VALUES (?, ?, 'sent')", (a, b))

    def make_mutual(self, a: int, b: int) -> None:
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute("INSERT OR REPLACE INTO relations VALUES (?, ?, 'mutual')", (a, b))
            self.conn.execute("INSERT OR REPLACE INTO relations VALUES (?, ?, 'mutual')", (b, a))

    def remove_relation(self, a: int, b: int) -> bool:
        """Delete whatever links a and b (request either way, or buddyship); True if anything did."""
        with self.conn:
            self.conn.execute("BEGIN")
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
        row = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(envelope)), 0), "
            "COALESCE(SUM(sender = ?), 0), COALESCE(SUM(CASE WHEN sender = ? THEN LENGTH(envelope) END), 0) "
            "FROM offline WHERE recipient_id = ?",
            (sender, sender, recipient_id),
        ).fetchone()
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])

    def has_offline(self, recipient_id: int, msg_id: bytes) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM offline WHERE recipient_id = ? AND msg_id = ?", (recipient_id, msg_id)
        ).fetchone()
        return row is not None

    def store_offline(
        self, recipient_id: int, sender: str, msg_id: bytes, envelope: bytes, now_ms: int
    ) -> int | None:
        """Keep an envelope; returns its store id, or None when this id was already stored."""
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO offline (recipient_id, sender, msg_id, envelope, stored_ms) "
            "VALUES (?, ?, ?, ?, ?)",
            (recipient_id, sender, msg_id, envelope, now_ms),
        )
        return cur.lastrowid if cur.rowcount else None

    def offline_count(self, recipient_id: int) -> int:
        row = self.conn.execute("SELECT COUNT(*) FROM offline WHERE recipient_id = ?", (recipient_id,))
        return int(row.fetchone()[0])

    def last_offline_id(self, recipient_id: int) -> int:
        row = self.conn.execute("SELECT MAX(id) FROM offline WHERE recipient_id = ?", (recipient_id,))
        return int(row.fetchone()[0] or 0)

    def pending_offline(self, recipient_id: int, after_id: int = 0, limit: int = -1) -> list[StoredEnvelope]:
        """Envelopes for ``recipient_id`` with a store id above ``after_id``, oldest first."""
        rows = self.conn.execute(
            "SELECT id, sender, envelope, stored_ms FROM offline WHERE recipient_id = ? AND id > ? "
            "ORDER BY id LIMIT ?",
            (recipient_id, after_id, limit),
        ).fetchall()
        return [StoredEnvelope(*row) for row in rows]

    def ack_offline(self, recipient_id: int, store_ids: list[int]) -> int:
        """Delete acknowledged envelopes (only the recipient's own); returns how many."""
        with self.conn:
            self.conn.execute("BEGIN")
            deleted = 0
            for sid in store_ids:
                cur = self.conn.execute(
                    "DELETE FROM offline WHERE id = ? AND recipient_id = ?", (sid, recipient_id)
                )
                deleted += cur.rowcount
        return deleted

    def drop_offline_between(self, a: User, b: User) -> int:
        """Forget what waits between two users (either way): they are no longer buddies."""
        cur = self.conn.execute(
            "DELETE FROM offline "
            "WHERE (recipient_id = ? AND sender = ?) OR (recipient_id = ? AND sender = ?)",
            (a.id, b.username, b.id, a.username),
        )
        return cur.rowcount

    def expire(self, now_ms: int, max_age_ms: int) -> int:
        """Drop offline envelopes and tokens past their time."""
        with self.conn:
            self.conn.execute("BEGIN")
            cur = self.conn.execute("DELETE FROM offline WHERE stored_ms < ?", (now_ms - max_age_ms,))
            self.conn.execute("DELETE FROM tokens WHERE expires_ms <= ?", (now_ms,))
        return cur.rowcount
