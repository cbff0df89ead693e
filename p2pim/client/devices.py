"""Several devices per account (issue 16): linking a new device with a short code, listing
and removing devices.

Every device holds the account's identity key, so buddies see one key and every
envelope opens on each device; each device logs in with a key of its own, which the
server knows (:mod:`rendezvous.devices`). A new device gets the identity key from a
linked one, never from the server:

1. The linked device opens a channel on the server and shows ``<channel>-<word>-<word>``
   (:func:`new_code`); the server knows the channel number only.
2. The new device joins the channel by number, before it can log in, and both run SPAKE2
   (the ``spake2`` package, as magic-wormhole does) over the words, through the channel.
   Whoever does not know the words (the server, someone who guessed the number) ends up
   with another key, and learns nothing about the words but "wrong".
3. The new device sends, sealed under the agreed key (NaCl secretbox), its own device
   key and name; the linked device opens it (so the words matched: it is the user's new
   device), registers the key with the server (which returns a resume token for it) and
   sends back, sealed, the account: username, identity key, the token, and the contacts
   with their pinned keys. The new device saves them and logs in with the token.

The identity key is shared rather than one key per device certified by it: buddies see
no change at all, pairwise envelopes, group sender keys and direct paths work as they
are, and the server stays blind. The price: a removed device still knows the identity
key (the server ends its sessions and refuses its key at once, so it gets nothing more
from the server; ``login --new-key`` replaces the identity key if the device was stolen).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nacl.exceptions import CryptoError
from nacl.secret import SecretBox
from spake2 import SPAKE2_A, SPAKE2_B  # type: ignore[import-untyped]

from ..identity import Identity, valid_public_key
from ..wire import control_pb2 as pb
from .control import ClientError

if TYPE_CHECKING:
    from .facade import Client

LINK_TIMEOUT = 300.0  # as long as the server keeps a channel open
STEP_TIMEOUT = 30.0  # for each message once both sides are there
MAX_CONTACTS = 10_000
IDS = (b"p2pim-linked-device", b"p2pim-new-device")
# 256 short, distinct, easy-to-type words: two of them are 16 bits, and whoever is not
# the user gets one guess per code (a failed exchange ends the channel).
WORDS = """
acid acorn actor adult agent alarm album alley amber angle ankle apple april apron arena
armor arrow atlas attic audio aunt autumn award bacon badge bagel baker bamboo banjo barn
basil basin beach beard bench berry bingo birch bison blade blank blaze bloom board bonus
boots brain brave bread brick brook brush bucket buddy bunny cabin cable cactus camel
candy canoe canyon cargo carpet castle cedar chalk charm cheese cherry chess chief cider
cinema civic claim clerk cliff clock cloud clover coast cobra cocoa comet coral cotton
couch cousin cover crane crater crown cubic curry cycle daisy dance delta denim depot
desert diary diesel dinner disco doctor dolphin donkey dragon drama dream drum eagle
earth easel echo elbow elder ember empire engine epic equal error ethics event fabric
falcon fancy farm feast fence ferry fiber field fiesta finch flame flask fleet flint
flute focus forest fossil frame frost fruit galaxy garden garlic gecko genius ghost giant
ginger glacier globe glove goose grape gravel guitar habit hammer harbor harvest hazel
helmet hero honey hotel humble husky igloo index infant island ivory jacket jaguar jelly
jewel jockey joke judge juice jungle kayak kettle kiwi koala ladder lagoon lemon level
lilac limit linen lizard lobby locket lotus lunar lyric magnet mango maple marble meadow
melon metal mirror mobile monkey motor mouse muffin museum nectar needle ninja noble
novel oasis ocean olive omega onion opera orbit orchid otter oyster paddle panda paper
parade parrot pasta peach pepper piano pilot pixel planet plaza pocket polar potato
prism pumpkin puzzle quartz rabbit radar
""".split()  # noqa: SIM905 (a word list reads better as text)
assert len(WORDS) == len(set(WORDS)) >= 256


class LinkError(ClientError):
    """Linking failed (a wrong code, an expired one, the other side gone)."""

    def __init__(self, message: str) -> None:
        super().__init__(pb.LINK_FAILED, message)


def new_code(channel: int) -> tuple[str, bytes]:
    """The code to show for ``channel``, and its secret part (what SPAKE2 runs over)."""
    words = [WORDS[secrets.randbelow(256)] for _ in range(2)]
    return f"{channel}-{'-'.join(words)}", "-".join(words).encode()


def parse_code(code: str) -> tuple[int, bytes]:
    """(channel, secret) from what the user typed; :class:`LinkError` if it is not a code."""
    parts = code.strip().lower().split("-")
    if len(parts) != 3 or not parts[0].isdigit() or not all(p in WORDS for p in parts[1:]):
        raise LinkError(f"{code!r} is not a link code (like 7-guitar-ocean: p2pim device link shows one)")
    return int(parts[0]), "-".join(parts[1:]).encode()


@dataclass(frozen=True)
class DeviceRow:
    device_id: int
    name: str
    created_ms: int
    last_seen_ms: int
    online: bool
    this: bool


class Devices:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.inbox: asyncio.Queue[pb.DeviceLinkIn] = asyncio.Queue(maxsize=64)

    def on_link(self, msg: pb.DeviceLinkIn) -> None:
        """A push from the channel (the server passes at most a handful per link)."""
        if not self.inbox.full():
            self.inbox.put_nowait(msg)

    async def _next(self, timeout: float) -> bytes:
        try:
            msg = await asyncio.wait_for(self.inbox.get(), timeout)
        except TimeoutError:
            raise LinkError("the other device did not answer in time") from None
        if msg.closed:
            raise LinkError(
                f"the link was closed: {msg.data.decode(errors='replace') or 'the other side gave up'}"
            )
        return msg.data

    async def _say(self, data: bytes, close: bool = False) -> None:
        await self.client.control.request("device_link_data", pb.DeviceLinkData(data=data, close=close))

    async def _fail(self, why: str) -> LinkError:
        """Close the channel (burnt: the code was wrong, or someone else tried it)."""
        with contextlib.suppress(ClientError):
            await self._say(why.encode(), close=True)
        return LinkError(why)

    # -- the linked device -------------------------------------------------------------

    async def link(self, show: Callable[[str], None], timeout: float = LINK_TIMEOUT) -> DeviceRow:
        """Show a code (``show``), wait for the new device and hand it the account."""
        client = self.client
        while not self.inbox.empty():
            self.inbox.get_nowait()
        reply = await client.control.request("device_link_open", pb.DeviceLinkOpen())
        channel = reply.device_channel.channel
        code, secret = new_code(channel)
        show(code)
        spake = SPAKE2_A(secret, idA=IDS[0], idB=IDS[1])
        await self._next(min(timeout, reply.device_channel.expires_s or timeout))  # "joined"
        await self._say(spake.start())
        try:
            key = spake.finish(await self._next(STEP_TIMEOUT))
            hello = json.loads(SecretBox(key).decrypt(await self._next(STEP_TIMEOUT)))
            device_key, name = bytes.fromhex(hello["device_key"]), str(hello["name"])[:64]
        except (CryptoError, ValueError, KeyError, TypeError):
            raise await self._fail("the code was wrong (or someone else tried it): make a new one") from None
        if not valid_public_key(device_key):
            raise await self._fail("the new device sent an unusable key")
        added = await client.control.request(
            "device_add", pb.DeviceAdd(channel=channel, device_key=device_key, name=name)
        )
        contacts = [
            {"name": c.username, "key": c.identity_key.hex()}
            for c in client.store.contacts()[:MAX_CONTACTS]
            if c.offered_key is None
        ]
        account = {
            "username": client.username, "identity": client.profile.identity.seed.hex(),
            "token": added.device_added.resume_token.hex(), "contacts": contacts,
        }  # fmt: skip
        await self._say(bytes(SecretBox(key).encrypt(json.dumps(account).encode())))  # the new one closes
        return DeviceRow(added.device_added.device_id, name, int(time.time() * 1000), 0, False, False)

    # -- the new device ------------------------------------------------------------------

    async def join(self, code: str) -> str:
        """Join with ``code`` (connected, not logged in): on success the profile holds the
        account (identity key, contacts, a resume token); returns the username."""
        client = self.client
        channel, secret = parse_code(code)
        if client.store.account() is not None:
            raise LinkError("this profile has an account already: link a new profile (--profile NAME)")
        device = client.profile.device_key_for_link()
        spake = SPAKE2_B(secret, idA=IDS[0], idB=IDS[1])
        await client.control.request("device_link_join", pb.DeviceLinkJoin(channel=channel))
        await self._say(spake.start())
        try:
            key = spake.finish(await self._next(STEP_TIMEOUT))
        except ValueError:
            raise await self._fail("the other device sent garbage") from None
        hello = {"device_key": device.public_key.hex(), "name": socket.gethostname()[:64]}
        await self._say(bytes(SecretBox(key).encrypt(json.dumps(hello).encode())))
        try:
            account = json.loads(SecretBox(key).decrypt(await self._next(STEP_TIMEOUT)))
            username, token = str(account["username"]), bytes.fromhex(account["token"])
            identity = Identity.from_seed(bytes.fromhex(account["identity"]))
            contacts = [(str(c["name"]), bytes.fromhex(c["key"])) for c in account["contacts"]]
        except (CryptoError, ValueError, KeyError, TypeError):
            raise await self._fail("the other device sent something unreadable") from None
        with contextlib.suppress(ClientError):
            await self._say(b"linked", close=True)
        now_ms = int(time.time() * 1000)
        for name, key_ in contacts[:MAX_CONTACTS]:
            if valid_public_key(key_):
                client.store.see_key(name, key_, now_ms)
        client.profile.adopt(identity)
        client.store.set_account(client.server, username, token)
        return username

    # -- the account's devices --------------------------------------------------------

    async def list(self) -> list[DeviceRow]:
        reply = await self.client.control.request("device_list", pb.DeviceListRequest())
        return [
            DeviceRow(d.device_id, d.name, d.created_ms, d.last_seen_ms, d.online, d.this)
            for d in reply.devices.devices
        ]

    async def remove(self, device_id: int) -> None:
        await self.client.control.request("device_remove", pb.DeviceRemove(device_id=device_id))
