"""The account's own settings on the rendezvous (issue 16): an email address (verified by a
code mailed to it), email notices for what waits in the offline store, a new password,
and deleting the account.

Notices are the seeds' "extension" delivery, without the content: while a user is
offline, when something a person wrote (``Store.counts``, group posts) has waited for
them longer than their delay, the server mails "3 new messages from bob, 1 from carol",
at most once per their period and only about what came since the last notice, each
mail ending with the one line that stops them. The hub only decides; what to mail comes
out of it as :class:`Mail` events, which the shell (:mod:`rendezvous.mail`) sends through
the SMTP server its operator configured. Without one, the email requests are refused.

Codes are 6 digits, kept hashed (with the user id), valid :data:`CODE_TTL_S`, 5 tries;
a user may ask for :data:`CODES_PER_HOUR` codes an hour (each is a mail the server sends
to an address anyone may type).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from p2pim.ratelimit import RateLimiter
from p2pim.wire import control_pb2 as pb

from .db import NOTICE_LOCK
from .errors import RequestError, error_frame

if TYPE_CHECKING:
    from .db import User
    from .hub import Hub, Session

CODE_TTL_S = 3600
CODE_TRIES = 5
CODES_PER_HOUR = 5
MAX_EMAIL = 254
EMAIL_RE = re.compile(r"[^@\s]{1,64}@[A-Za-z0-9.-]{1,189}\.[A-Za-z]{2,}")
MAX_DELAY_S, MAX_PERIOD_S = 7 * 86400, 30 * 86400
NOTICES_PER_SWEEP = 200
STOP_LINE = "To stop these notices: p2pim account notify off"


@dataclass(frozen=True)
class Mail:
    """A mail for the shell to send."""

    to: str
    subject: str
    body: str


@dataclass(frozen=True)
class AccountWork:
    """A password to check (and perhaps a new one to hash) for ``account_password`` or
    ``account_delete``, in the shell's thread pool like a login's."""

    user: User
    password: str
    new_password: str = ""


def code_hash(user_id: int, code: str) -> bytes:
    return hashlib.sha256(f"p2pim-email-code\0{user_id}\0{code}".encode()).digest()


class AccountHandlers:
    def __init__(self, hub: Hub, mail: bool) -> None:
        self.hub = hub
        self.db = hub.db
        self.mail = mail  # the operator configured an SMTP server
        self._codes = RateLimiter(CODES_PER_HOUR / 3600, CODES_PER_HOUR)

    def handlers(self) -> dict[str, object]:
        return {
            "account_info": self.info,
            "account_email": self.email,
            "account_verify": self.verify,
            "account_notify": self.notify,
        }

    def info(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        a = self.db.account(session.user_id)
        return pb.Frame(
            account=pb.AccountInfo(
                email=a.email, verified=a.verified, notify=a.notify, delay_s=a.delay_s,
                period_s=a.period_s, mail=self.mail,
            )
        )  # fmt: skip

    def email(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        address = frame.account_email.email.strip()
        if not address:
            self.db.set_email(session.user_id, "", None, 0)
            return self.info(session, frame, now)
        if not self.mail:
            raise RequestError(pb.NOT_ALLOWED, "this server sends no email (its operator set no SMTP server)")
        if len(address) > MAX_EMAIL or not EMAIL_RE.fullmatch(address):
            raise RequestError(pb.BAD_REQUEST, f"{address!r} is not an email address")
        if not self._codes.allow(session.username, now):
            raise RequestError(pb.RATE_LIMITED, "too many codes asked for; wait an hour", 3_600_000)
        code = f"{secrets.randbelow(10**6):06d}"
        self.db.set_email(
            session.user_id, address, code_hash(session.user_id, code), int((now + CODE_TTL_S) * 1000)
        )
        self.hub.mail_out(
            Mail(
                address,
                f"p2pim: your code is {code}",
                f"Someone (we hope you) gave this address to the p2pim account {session.username}.\n"
                f"To confirm it, run:\n\n    p2pim account verify {code}\n\n"
                f"The code is good for an hour. If it was not you, ignore this mail.\n",
            )
        )
        return self.info(session, frame, now)

    def verify(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        a = self.db.account(session.user_id)
        if a.verified:
            return self.info(session, frame, now)
        if a.code_hash is None or now * 1000 > a.code_expires_ms or a.code_tries >= CODE_TRIES:
            raise RequestError(
                pb.NOT_ALLOWED, "no code is waiting (or it expired): p2pim account email ADDRESS"
            )
        right = secrets.compare_digest(
            a.code_hash, code_hash(session.user_id, frame.account_verify.code.strip())
        )
        self.db.code_tried(session.user_id, right)
        if not right:
            left = CODE_TRIES - a.code_tries - 1
            raise RequestError(pb.BAD_REQUEST, f"wrong code ({left} tries left)")
        return self.info(session, frame, now)

    def notify(self, session: Session, frame: pb.Frame, now: float) -> pb.Frame:
        req, a = frame.account_notify, self.db.account(session.user_id)
        delay, period, least = (
            req.delay_s or a.delay_s,
            req.period_s or a.period_s,
            self.hub.limits.notice_min_s,
        )
        if not least <= delay <= MAX_DELAY_S or not least <= period <= MAX_PERIOD_S:
            raise RequestError(
                pb.BAD_REQUEST, f"the delay is {least:g} s to 7 days, the period {least:g} s to 30 days"
            )
        self.db.set_notify(session.user_id, req.on, delay, period)
        return self.info(session, frame, now)

    # -- password and deletion (the shell checks the password first) ---------------------

    def begin(self, session: Session, frame: pb.Frame, now: float) -> AccountWork | None:
        """``account_password`` / ``account_delete``: checks that need no hashing."""
        kind = frame.WhichOneof("body")
        if not session.username:
            raise RequestError(pb.NOT_LOGGED_IN, "log in first")
        self.hub._throttle(session, session.username, now)  # a password guess, like a login
        user = self.db.user(session.username)
        assert user is not None
        if kind == "account_password":
            new = frame.account_password.new_password
            self.hub.check_password(new)
            return AccountWork(user, frame.account_password.old_password, new)
        return AccountWork(user, frame.account_delete.password)

    def finish(
        self, session: Session, frame: pb.Frame, work: AccountWork, ok: bool, new_hash: bytes, now: float
    ) -> None:
        if not ok:
            self.hub.counters.login_failures += 1
            self.hub._send(session, error_frame(frame.id, pb.AUTH_FAILED, "wrong password"))
            return
        if frame.WhichOneof("body") == "account_password":
            self.db.set_password(work.user.id, new_hash)
            self.hub._send(session, pb.Frame(id=frame.id, ok=pb.Ok()))
            return
        self.hub._send(session, pb.Frame(id=frame.id, ok=pb.Ok()))  # before its sessions end
        self.hub.delete_account(work.user, now)

    # -- notices ----------------------------------------------------------------------

    def sweep(self, now: float) -> int:
        """Mail the notices that are due (offline users only); returns how many."""
        if not self.mail:
            return 0
        with self.db.chore(NOTICE_LOCK) as mine:  # several nodes: one sweeps, the others skip
            return self._sweep(now) if mine else 0

    def _sweep(self, now: float) -> int:
        sent = 0
        for user_id, name, email, senders in self.db.notices_due(int(now * 1000), NOTICES_PER_SWEEP):
            if self.hub.is_online(name):
                continue  # on now: it is being delivered
            total = sum(n for _, n in senders)
            many = f"{total} new message{'s' * (total != 1)}"
            parts = [f"{n} from {s}" for s, n in senders[:10]]
            if len(senders) > 10:
                parts.append(f"more from {len(senders) - 10} others")
            self.hub.mail_out(
                Mail(
                    email,
                    f"p2pim: {many} for {name}",
                    f"{name}, {many} wait for you on p2pim: {', '.join(parts)}.\n"
                    f"Log in to read them (p2pim listen).\n\n{STOP_LINE}\n",
                )
            )
            self.db.noticed(user_id, int(now * 1000))
            sent += 1
        return sent
