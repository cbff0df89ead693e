"""Opening a SQLite database the way both the client and the server need it.

WAL with ``synchronous=FULL`` (a commit is on disk before we acknowledge
anything), autocommit mode (callers open their own ``BEGIN`` for multi-row
changes), and versioned migrations through ``PRAGMA user_version``: each step
applies whole or not at all, and a database newer than the code is refused.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


class SchemaTooNew(Exception):
    """The database was written by newer code."""


def open_db(path: str, migrations: list[str], foreign_keys: bool = False) -> sqlite3.Connection:
    """Open (creating it private to this user: directory 0700, file 0600) and migrate.

    The mode is set when the file is created, before SQLite writes a byte; the
    WAL and shared-memory files SQLite adds take the database file's mode.
    Hashes, tokens and message history are nobody else's business.
    """
    if path != ":memory:" and not os.path.exists(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    if foreign_keys:
        conn.execute("PRAGMA foreign_keys=ON")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        conn.close()
        raise SchemaTooNew(f"{path} has schema {version}; this code knows up to {len(migrations)}")
    for number, script in enumerate(migrations[version:], start=version + 1):
        # executescript commits first; BEGIN/COMMIT make each step all or nothing.
        conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
    return conn
