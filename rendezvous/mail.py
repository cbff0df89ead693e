"""Sending the rendezvous's mail (verification codes, notices) through the SMTP server its
operator configures (``rendezvous serve --smtp HOST[:PORT] ...``), with aiosmtplib.

Mail leaves from a queue of its own, one message at a time: a slow or dead SMTP server
delays mail, never the hub. The queue is bounded (what does not fit is dropped and
counted); a failed send is tried twice more, then counted and logged once per kind of
failure, so an unreachable relay costs a log line, not a log flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from email.message import EmailMessage

import aiosmtplib

from .account import Mail

log = logging.getLogger(__name__)
MAX_QUEUE = 1000
TRIES = 3
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class MailConfig:
    host: str
    port: int = 25
    sender: str = "p2pim@localhost"
    username: str = ""
    password: str = ""
    starttls: bool = False  # upgrade a plain connection (port 587)
    tls: bool = False  # TLS from the start (port 465)

    @classmethod
    def parse(cls, where: str, **options: object) -> MailConfig:
        """``host`` or ``host:port``."""
        host, _, port = where.rpartition(":") if where.count(":") == 1 else (where, "", "")
        return cls(host=host, port=int(port) if port else 25, **options)  # type: ignore[arg-type]


class Mailer:
    def __init__(self, config: MailConfig) -> None:
        self.config = config
        self.sent = self.failed = self.dropped = 0
        self._queue: asyncio.Queue[Mail] = asyncio.Queue(MAX_QUEUE)
        self._task: asyncio.Task[None] | None = None
        self._said: set[str] = set()

    def send(self, mail: Mail) -> None:
        try:
            self._queue.put_nowait(mail)
        except asyncio.QueueFull:
            self.dropped += 1

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            mail = await self._queue.get()
            for attempt in range(TRIES):
                try:
                    await self._deliver(mail)
                    self.sent += 1
                    break
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    if attempt == TRIES - 1:
                        self.failed += 1
                        kind = type(exc).__name__
                        if kind not in self._said:
                            self._said.add(kind)
                            log.warning("cannot send mail through %s: %s", self.config.host, exc)
                    else:
                        await asyncio.sleep(1.0 + attempt)

    async def _deliver(self, mail: Mail) -> None:
        c = self.config
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = c.sender, mail.to, mail.subject
        msg.set_content(mail.body)
        await aiosmtplib.send(
            msg,
            hostname=c.host,
            port=c.port,
            username=c.username or None,
            password=c.password or None,
            # TLS from the start, or STARTTLS required, or (neither) upgraded if offered
            start_tls=False if c.tls else (True if c.starttls else None),
            use_tls=c.tls,
            timeout=TIMEOUT_S,
        )
