"""The client's SQLite database: account, contacts (pinned keys), history, outbox.

Every write commits before the caller goes on, so a message is in the outbox
before :meth:`p2pim.client.Client.send` returns and a received message is in
the history before its receipt or offline ack leaves: ``kill -9`` at any point
loses nothing and shows nothing twice (the history's primary key is the
message id, which is what deduplicates).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from p2pim.sqlite import open_db

MIGRATIONS: list[str] = [
    """
    CREATE TABLE account (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        server TEXT NOT NULL,
        username TEXT NOT NULL,
        token BLOB NOT NULL DEFAULT x''
    );
    CREATE TABLE contacts (
        username TEXT PRIMARY KEY,
        identity_key BLOB NOT NULL,     -- pinned at first sight
        offered_key BLOB,               -- a different key the server offered; NULL when none
        pinned_ms INTEGER NOT NULL
    );
    CREATE TABLE messages (
        msg_id BLOB PRIMARY KEY,
        peer TEXT NOT NULL,
        outgoing INTEGER NOT NULL,      -- 1 sent by us, 0 received
        text TEXT NOT NULL,
        sent_at_ms INTEGER NOT NULL,
        at_ms INTEGER NOT NULL,         -- when written here
        state TEXT NOT NULL             -- out: queued|relayed|failed|stored|delivered|read; in: received|read
    );
    CREATE INDEX messages_peer ON messages(peer, msg_id);
    CREATE TABLE outbox (
        msg_id BLOB PRIMARY KEY,
        peer TEXT NOT NULL,
        receipt INTEGER NOT NULL,       -- 1: a receipt (no ack of its own), 0: a text
        envelope BLOB NOT NULL,
        created_ms INTEGER NOT NULL
    );
    """,
    """
    CREATE TABLE paths (                -- what the last session learned about each buddy's path
        peer TEXT PRIMARY KEY,
        via TEXT NOT NULL,              -- direct|relay
        addr TEXT NOT NULL DEFAULT '',  -- ip:port of a direct path
        rtt_ms REAL,
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    """
    CREATE TABLE ipmsg_numbering (      -- LAN: which packet numbering an IP Messenger peer is on
        ip TEXT PRIMARY KEY,
        epoch INTEGER NOT NULL,         -- changes when the peer starts numbering again (BR_ENTRY/EXIT)
        updated_ms INTEGER NOT NULL
    );
    """,
    """
    CREATE TABLE transfers (            -- file transfers, both ways (p2pim.files.store)
        file_id BLOB PRIMARY KEY,
        peer TEXT NOT NULL,
        outgoing INTEGER NOT NULL,      -- 1 we send, 0 we receive
        name TEXT NOT NULL,             -- as offered (the receiver sanitizes it for its disk)
        size INTEGER NOT NULL,
        blake2b BLOB NOT NULL,          -- BLAKE2b-256 of the whole file
        chunk_size INTEGER NOT NULL,
        state TEXT NOT NULL,            -- offered|accepted|done|declined|cancelled|failed
        durable INTEGER NOT NULL DEFAULT 0,  -- bytes fsynced on the receiver's disk (as far as we know)
        path TEXT NOT NULL DEFAULT '',  -- out: the source file; in: the directory, then the final file
        part TEXT NOT NULL DEFAULT '',  -- in: the .part file being written
        mtime_ns INTEGER NOT NULL DEFAULT 0,  -- out: the source's mtime when offered
        detail TEXT NOT NULL DEFAULT '',      -- why it failed, or who cancelled
        resent INTEGER NOT NULL DEFAULT 0,    -- bytes that came (in) or went (out) twice
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE INDEX transfers_state ON transfers(state, created_ms);
    """,
    """
    ALTER TABLE messages ADD COLUMN author TEXT NOT NULL DEFAULT '';  -- a group message's sender
    CREATE TABLE groups (               -- groups we are (or were) in (p2pim.groups.store)
        gid BLOB PRIMARY KEY,
        name TEXT NOT NULL,
        seq INTEGER NOT NULL,           -- the last membership event applied
        role TEXT NOT NULL              -- ours: owner|admin|member|invited|gone
    );
    CREATE TABLE group_members (
        gid BLOB NOT NULL,
        username TEXT NOT NULL,
        role TEXT NOT NULL,
        PRIMARY KEY (gid, username)
    );
    CREATE TABLE group_keys (           -- sender keys: each member's, ours among them
        gid BLOB NOT NULL,
        owner TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        key BLOB NOT NULL,
        at_ms INTEGER NOT NULL,
        given TEXT NOT NULL DEFAULT '',  -- ours: the members we gave it to (newline-separated)
        PRIMARY KEY (gid, owner, epoch)
    );
    CREATE TABLE group_outbox (         -- sender keys to store for members, then posts, in order
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,             -- store|post
        target TEXT NOT NULL,           -- store: the member; post: the group id (hex)
        msg_id BLOB NOT NULL,
        envelope BLOB NOT NULL
    );
    """,
    """
    -- each (group, sender, epoch) stream's next place: ours, the next we give; a member's,
    -- the next we show (a direct copy waits for its turn)
    ALTER TABLE group_keys ADD COLUMN next_seq INTEGER NOT NULL DEFAULT 0;
    -- ours: the members the key was made for; another member set means a new key
    ALTER TABLE group_keys ADD COLUMN made_for TEXT;
    """,
]
MESSAGE_COLUMNS = "msg_id, peer, outgoing, text, sent_at_ms, at_ms, state, author"
MAX_NUMBERINGS = 4096  # rows kept in ipmsg_numbering (anyone on the LAN can claim an address)

STATE_RANK = {"queued": 0, "relayed": 1, "failed": 2, "stored": 3, "delivered": 4, "read": 5}


def owned_by(name: str, prefix: str) -> bool:
    """A peer name in the shared database that belongs to the owner whose names carry
    ``prefix`` ("lan:" for the LAN node; "" for the internet client, whose names have no colon)."""
    return name.startswith(prefix) and (bool(prefix) or ":" not in name)


@dataclass(frozen=True)
class Contact:
    username: str
    identity_key: bytes
    offered_key: bytes | None


@dataclass(frozen=True)
class HistoryRow:
    msg_id: bytes
    peer: str
    outgoing: bool
    text: str
    sent_at_ms: int
    state: str
    author: str = ""  # who wrote a received group message


@dataclass(frozen=True)
class OutboxRow:
    msg_id: bytes
    peer: str
    receipt: bool
    envelope: bytes


@dataclass(frozen=True)
class PathRow:
    peer: str
    via: str
    addr: str
    rtt_ms: float | None
    updated_ms: int


class ClientStore:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self.conn = open_db(self.path, MIGRATIONS)

    def close(self) -> None:
        self.conn.close()

    # -- account --------------------------------------------------------------

    def account(self) -> tuple[str, str, bytes] | None:
        row = self.conn.execute("SELECT server, username, token FROM account").fetchone()
        return (row[0], row[1], bytes(row[2])) if row else None

    def set_account(self, server: str, username: str, token: bytes) -> None:
        self.conn.execute("INSERT OR REPLACE INTO account VALUES (1, ?, ?, ?)", (server, username, token))

    def clear_account(self) -> None:
        self.conn.execute("DELETE FROM account")

    # -- contacts (trust on first use, changes never silent) -----------------------

    def contact(self, username: str) -> Contact | None:
        row = self.conn.execute(
            "SELECT username, identity_key, offered_key FROM contacts WHERE username = ?", (username,)
        ).fetchone()
        return Contact(row[0], bytes(row[1]), bytes(row[2]) if row[2] is not None else None) if row else None

    def contacts(self) -> list[Contact]:
        rows = self.conn.execute(
            "SELECT username, identity_key, offered_key FROM contacts ORDER BY username"
        ).fetchall()
        return [Contact(r[0], bytes(r[1]), bytes(r[2]) if r[2] is not None else None) for r in rows]

    def see_key(self, username: str, key: bytes, now_ms: int) -> str:
        """Record a key the server says ``username`` has: "new", "same" or "changed"."""
        known = self.contact(username)
        if known is None:
            self.conn.execute(
                "INSERT INTO contacts (username, identity_key, pinned_ms) VALUES (?, ?, ?)",
                (username, key, now_ms),
            )
            return "new"
        if known.identity_key == key:
            if known.offered_key is not None:
                self.conn.execute("UPDATE contacts SET offered_key = NULL WHERE username = ?", (username,))
            return "same"
        self.conn.execute("UPDATE contacts SET offered_key = ? WHERE username = ?", (key, username))
        return "changed"

    def keys(self) -> dict[bytes, str]:
        """Pinned identity key -> username, to tell who sent a disco packet."""
        return {bytes(k): u for u, k in self.conn.execute("SELECT username, identity_key FROM contacts")}

    def trust_offered_key(self, username: str, now_ms: int) -> bool:
        """The user checked the new fingerprint: pin the offered key. False if none was offered."""
        cur = self.conn.execute(
            "UPDATE contacts SET identity_key = offered_key, offered_key = NULL, pinned_ms = ? "
            "WHERE username = ? AND offered_key IS NOT NULL",
            (now_ms, username),
        )
        return cur.rowcount > 0

    # -- history ----------------------------------------------------------------

    def add_incoming(
        self, msg_id: bytes, peer: str, text: str, sent_at_ms: int, now_ms: int, author: str = ""
    ) -> bool:
        """Store a received text; False if this id was seen before (a duplicate)."""
        cur = self.conn.execute(
            f"INSERT OR IGNORE INTO messages ({MESSAGE_COLUMNS}) VALUES (?, ?, 0, ?, ?, ?, 'received', ?)",
            (msg_id, peer, text, sent_at_ms, now_ms, author),
        )
        return cur.rowcount > 0

    def add_copy(
        self, msg_id: bytes, peer: str, text: str, sent_at_ms: int, now_ms: int, author: str = ""
    ) -> bool:
        """What another device of ours sent (``author`` empty) as our own history line; False
        if this id is known already."""
        cur = self.conn.execute(
            f"INSERT OR IGNORE INTO messages ({MESSAGE_COLUMNS}) VALUES (?, ?, 1, ?, ?, ?, 'stored', ?)",
            (msg_id, peer, text, sent_at_ms, now_ms, author),
        )
        return cur.rowcount > 0

    def queue_outgoing(
        self, msg_id: bytes, peer: str, text: str | None, envelope: bytes, sent_at_ms: int, now_ms: int
    ) -> None:
        """History row (for texts) and outbox row, in one transaction."""
        with self.conn:
            self.conn.execute("BEGIN")
            if text is not None:
                self.conn.execute(
                    f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES (?, ?, 1, ?, ?, ?, 'queued', '')",
                    (msg_id, peer, text, sent_at_ms, now_ms),
                )
            self.conn.execute(
                "INSERT INTO outbox VALUES (?, ?, ?, ?, ?)",
                (msg_id, peer, int(text is None), envelope, now_ms),
            )

    def advance(self, msg_id: bytes, state: str) -> bool:
        """Move an outgoing message forward (never back); True if it moved."""
        row = self.conn.execute(
            "SELECT state FROM messages WHERE msg_id = ? AND outgoing = 1", (msg_id,)
        ).fetchone()
        if row is None or STATE_RANK[state] <= STATE_RANK[row[0]]:
            return False
        self.conn.execute("UPDATE messages SET state = ? WHERE msg_id = ?", (state, msg_id))
        return True

    def outgoing_peer(self, msg_id: bytes) -> str | None:
        row = self.conn.execute(
            "SELECT peer FROM messages WHERE msg_id = ? AND outgoing = 1", (msg_id,)
        ).fetchone()
        return row[0] if row else None

    def message(self, msg_id: bytes) -> HistoryRow | None:
        r = self.conn.execute(
            "SELECT msg_id, peer, outgoing, text, sent_at_ms, state, author FROM messages WHERE msg_id = ?",
            (msg_id,),
        ).fetchone()
        return HistoryRow(bytes(r[0]), r[1], bool(r[2]), r[3], r[4], r[5], r[6]) if r else None

    def unread(self, peer: str) -> list[bytes]:
        rows = self.conn.execute(
            "SELECT msg_id FROM messages WHERE peer = ? AND outgoing = 0 AND state = 'received' "
            "ORDER BY msg_id",
            (peer,),
        ).fetchall()
        return [bytes(r[0]) for r in rows]

    def mark_read(self, msg_ids: list[bytes]) -> None:
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                "UPDATE messages SET state = 'read' WHERE msg_id = ?", [(m,) for m in msg_ids]
            )

    def history(self, peer: str, limit: int = 50) -> list[HistoryRow]:
        rows = self.conn.execute(
            "SELECT msg_id, peer, outgoing, text, sent_at_ms, state, author FROM messages WHERE peer = ? "
            "ORDER BY sent_at_ms DESC, rowid DESC LIMIT ?",  # same millisecond: the order written
            (peer, limit),
        ).fetchall()
        return [HistoryRow(bytes(r[0]), r[1], bool(r[2]), r[3], r[4], r[5], r[6]) for r in reversed(rows)]

    # -- outbox -----------------------------------------------------------------

    def outbox(self) -> list[OutboxRow]:
        """Oldest first: after a restart, messages go out in the order they were typed."""
        rows = self.conn.execute(
            "SELECT msg_id, peer, receipt, envelope FROM outbox ORDER BY created_ms, rowid"
        ).fetchall()
        return [OutboxRow(bytes(r[0]), r[1], bool(r[2]), bytes(r[3])) for r in rows]

    def outbox_done(self, msg_id: bytes, state: str | None) -> None:
        """Drop from the outbox and, for texts, record how far it got."""
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute("DELETE FROM outbox WHERE msg_id = ?", (msg_id,))
            if state is not None:
                self.advance(msg_id, state)

    def rename_outgoing(self, old: str, new: str) -> None:
        """Messages waiting for ``old`` are now for ``new`` (history rows follow)."""
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute(
                "UPDATE messages SET peer = ? WHERE peer = ? AND msg_id IN "
                "(SELECT msg_id FROM outbox WHERE peer = ?)",
                (new, old, old),
            )
            self.conn.execute("UPDATE outbox SET peer = ? WHERE peer = ?", (new, old))

    def conversations(self, prefixes: tuple[str, ...]) -> list[tuple[str, int, int]]:
        """(peer, messages, newest sent_at_ms) for peers named with one of ``prefixes``, newest first."""
        rows = []
        for prefix in prefixes:  # a range on the (peer, msg_id) index, not a scan of every message
            rows += self.conn.execute(
                "SELECT peer, COUNT(*), MAX(sent_at_ms) FROM messages "
                "WHERE peer >= ? AND peer < ? GROUP BY peer",
                (prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)),
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in sorted(rows, key=lambda r: -r[2])]

    # -- IP Messenger numberings ------------------------------------------------------

    def numbering(self, ip: str) -> int | None:
        row = self.conn.execute("SELECT epoch FROM ipmsg_numbering WHERE ip = ?", (ip,)).fetchone()
        return int(row[0]) if row else None

    def set_numbering(self, ip: str, epoch: int, now_ms: int) -> None:
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute("INSERT OR REPLACE INTO ipmsg_numbering VALUES (?, ?, ?)", (ip, epoch, now_ms))
            self.conn.execute(
                "DELETE FROM ipmsg_numbering WHERE ip NOT IN "
                "(SELECT ip FROM ipmsg_numbering ORDER BY updated_ms DESC LIMIT ?)",
                (MAX_NUMBERINGS,),
            )

    # -- paths and settings -------------------------------------------------------

    def set_path(self, peer: str, via: str, addr: str, rtt_ms: float | None, now_ms: int) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO paths VALUES (?, ?, ?, ?, ?)", (peer, via, addr, rtt_ms, now_ms)
        )

    def paths(self) -> dict[str, PathRow]:
        rows = self.conn.execute("SELECT peer, via, addr, rtt_ms, updated_ms FROM paths")
        return {r[0]: PathRow(*r) for r in rows}

    def setting(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_setting(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))
