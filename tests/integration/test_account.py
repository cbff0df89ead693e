"""The account's email notices, password and deletion through a real `rendezvous serve`
that mails through a real SMTP server on loopback (aiosmtpd): the verification code
arrives and only the right one verifies; while alice is away, what bob writes brings a
notice with counts and no text, at most one per period; a new password; deleting the
account leaves nothing of it in the server's database."""

from __future__ import annotations

import asyncio
import email
import sqlite3
import threading
import time
from collections.abc import Iterator
from email.message import Message as MailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from p2pim.client import Client, ClientError
from p2pim.profile import Profile
from p2pim.wire import control_pb2 as pb

from ..conftest import RendezvousProcess, free_tcp_port
from .chatutil import PASSWORD, befriend, new_user, relogin, until


class Inbox:
    """What the SMTP server on loopback received, as parsed mails (with when)."""

    def __init__(self) -> None:
        self.mails: list[tuple[float, MailMessage]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.mails.append((time.monotonic(), email.message_from_bytes(envelope.content)))
        return "250 OK"

    def to(self, address: str) -> list[tuple[float, MailMessage]]:
        with self.lock:
            return [(t, m) for t, m in self.mails if m["To"] == address]


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox, port = Inbox(), free_tcp_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


def body(mail: MailMessage) -> str:
    part = mail.get_payload(decode=True)
    assert isinstance(part, bytes)
    return part.decode()


def test_email_is_verified_and_notices_count_without_content(tmp_path: Path, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    srv = RendezvousProcess(
        tmp_path / "server.db",
        ("--heartbeat", "2", "--smtp", f"127.0.0.1:{port}", "--mail-from", "p2pim@test.invalid",
         "--notice-min-s", "1", "--notice-sweep-s", "0.2"),
    )  # fmt: skip
    address = "alice@example.test"

    async def main() -> None:
        alice = await new_user(srv.url, tmp_path, "alice")
        bob = await new_user(srv.url, tmp_path, "bob")
        await befriend(alice, bob)
        state = await alice.account.set_email(address)
        assert state.email == address and not state.verified and state.server_mails
        await until(lambda: len(inbox.to(address)) == 1)
        code_mail = inbox.to(address)[0][1]
        assert code_mail["From"] == "p2pim@test.invalid"
        code = code_mail["Subject"].rsplit(" ", 1)[1]
        assert code.isdigit() and len(code) == 6
        wrong = "000000" if code != "000000" else "111111"
        with pytest.raises(ClientError) as refused:
            await alice.account.verify(wrong)
        assert "wrong code" in refused.value.message
        assert (await alice.account.verify(code)).verified
        state = await alice.account.notify(True, delay_s=1, period_s=4)
        assert state.notify and (state.delay_s, state.period_s) == (1, 4)
        with pytest.raises(ClientError):  # a week's delay is the most
            await alice.account.notify(True, delay_s=8 * 86400)
        await alice.close()

        for i in range(3):  # alice is away: stored, and after a second, a notice
            await bob.send("alice", f"secret words {i}")
        await until(lambda: len(inbox.to(address)) == 2, 15, "the first notice")
        first_at, first = inbox.to(address)[1]
        text = body(first)
        assert "3 new messages" in first["Subject"] and "3 from bob" in text
        assert "secret" not in text and "secret" not in first["Subject"]  # never the content
        assert "p2pim account notify off" in text  # the one line that stops them
        for i in range(2):  # more while away: one notice per period at most, about these only
            await bob.send("alice", f"more secret words {i}")
        await until(lambda: len(inbox.to(address)) == 3, 20, "the second notice")
        second_at, second = inbox.to(address)[2]
        # Without the period it would have come a second (the delay) after bob wrote; with it,
        # 4 s after the first (allowing 2 s for mail delays on a busy machine).
        assert second_at - first_at >= 2
        assert "2 new messages" in second["Subject"] and "2 from bob" in body(second)

        alice = await relogin(srv.url, tmp_path, "alice")
        assert not (await alice.account.notify(False)).notify
        await alice.close()
        await bob.close()

    try:
        asyncio.run(main())
    finally:
        srv.stop()


def test_a_new_password_and_deleting_the_account_leaves_nothing(tmp_path: Path) -> None:
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))

    async def main() -> None:
        alice = await new_user(srv.url, tmp_path, "alice")
        bob = await new_user(srv.url, tmp_path, "bob")
        await befriend(alice, bob)
        await alice.groups.create("team", ["bob"])
        await alice.send("bob", "waiting for bob")  # bob is online: delivered; then one stored
        await bob.close()
        await alice.send("bob", "stored for bob")
        with pytest.raises(ClientError) as wrong:
            await alice.account.password("not it", "a brand new password")
        assert wrong.value.code == pb.AUTH_FAILED
        await alice.account.password(PASSWORD, "a brand new password")
        await alice.close()
        again = Client(srv.url, Profile("alice", tmp_path / "profiles"))
        await again.connect()
        with pytest.raises(ClientError):
            await again.login("alice", PASSWORD)
        await again.login("alice", "a brand new password")
        with pytest.raises(ClientError):
            await again.account.delete("not it")
        await again.account.delete("a brand new password")
        assert again.store.account() is None
        await again.close()
        bob = await relogin(srv.url, tmp_path, "bob")
        assert "alice" not in [b.username for b in await bob.buddies()]
        assert all(g.role == "gone" for g in await bob.groups.refresh())  # her group went with her
        await bob.close()

    try:
        asyncio.run(main())
    finally:
        srv.stop()
    db = sqlite3.connect(tmp_path / "server.db")
    dump = "\n".join(db.iterdump())
    assert "alice" not in dump and "stored for bob" not in dump
    assert db.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 1
