"""The account's settings (issue 16): email address and notices, password, deletion (see
:mod:`rendezvous.account`; the server never sees message content, notices carry counts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..wire import control_pb2 as pb

if TYPE_CHECKING:
    from .facade import Client


@dataclass(frozen=True)
class AccountState:
    email: str
    verified: bool
    notify: bool
    delay_s: int
    period_s: int
    server_mails: bool  # the server sends email at all


class Account:
    def __init__(self, client: Client) -> None:
        self.client = client

    async def _ask(self, kind: str, message: object) -> AccountState:
        a = (await self.client.control.request(kind, message)).account
        return AccountState(a.email, a.verified, a.notify, a.delay_s, a.period_s, a.mail)

    async def info(self) -> AccountState:
        return await self._ask("account_info", pb.AccountInfoRequest())

    async def set_email(self, email: str) -> AccountState:
        """Give an address (a code is mailed to it: :meth:`verify`), or "" to forget it."""
        return await self._ask("account_email", pb.AccountEmail(email=email))

    async def verify(self, code: str) -> AccountState:
        return await self._ask("account_verify", pb.AccountVerify(code=code))

    async def notify(self, on: bool, delay_s: int = 0, period_s: int = 0) -> AccountState:
        """Notices on or off; after ``delay_s`` waiting, at most one per ``period_s`` (0: as is)."""
        return await self._ask("account_notify", pb.AccountNotify(on=on, delay_s=delay_s, period_s=period_s))

    async def password(self, old: str, new: str) -> None:
        await self.client.control.request(
            "account_password", pb.AccountPassword(old_password=old, new_password=new)
        )

    async def delete(self, password: str) -> None:
        """Remove the account on the server, and forget the saved session here."""
        await self.client.control.request("account_delete", pb.AccountDelete(password=password))
        self.client.store.clear_account()
