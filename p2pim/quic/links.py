"""QUIC links to buddies over the punched UDP path (qh3, aioquic's sans-IO API).

One link per buddy, on the same socket and address as the direct path that
disco proved; its packets are told apart from STUN and disco by their first
byte (RFC 9443: QUIC's fixed bit, after the 4-byte magics are ruled out).
The side with the smaller identity key is the QUIC client, so two buddies
never open two links to each other; the server side accepts a new
connection only from the address of a buddy's current direct path.

Both ends are authenticated with the identity keys, never with a CA:

* the server's TLS certificate is self-signed by its identity key
  (:mod:`p2pim.quic.cert`), and the client checks that its key is the one it
  pinned for that buddy (TLS has proved the server holds it);
* the client's first stream message signs ``HELLO | server key | original
  destination connection id`` with its identity key: the signature is
  bound to this connection and this server, and travels inside TLS to the
  server it names, so it cannot be replayed anywhere else.

Frames (``len (4 bytes) | bytes``) flow both ways on stream 0. This core
carries bytes for the file transfer core; it does not look inside them.
Sans-IO with the project's verbs; the shell passes the time.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from qh3._hazmat import Ed25519PrivateKey, pull_quic_header
from qh3.quic import events as qe
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection
from qh3.tls import SignatureAlgorithm, X509Certificate

from ..identity import Identity
from ..sansio import Datagram
from .cert import certificate, private_key_pkcs8, public_key_of

ALPN = "p2pim-files/1"
HELLO = b"p2pim-quic-hello\0"
HELLO_KIND, FRAME_KIND = b"H", b"F"
MAX_FRAME = 256 * 1024  # a bigger frame from a peer is a protocol error: the link closes
MAX_DATAGRAM = 1280  # QUIC's packet size: fits IPv6's minimum MTU and tunnels
IDLE_TIMEOUT = 20.0  # a link nobody uses (or whose path died) closes after this
HANDSHAKE_TIMEOUT = 5.0  # a link not up by then is given up (the relay carries on)
CID_LENGTH = 8  # bytes in our connection ids: how to read the header of a packet with no link
MIN_INITIAL = 1200  # RFC 9000 §14.1: a client's Initial is at least this big
MAX_LINKS = 256
LINK_SETTLE = 2.0  # a peer may still use the relay this long after our link came up
MAX_EVENTS = 10_000

Addr = tuple[str, int]


@dataclass(frozen=True)
class LinkUp:
    """Frames to and from ``peer`` can go over QUIC now."""

    peer: str


@dataclass(frozen=True)
class LinkDown:
    """The link to ``peer`` is gone (``reason``); what was in flight on it may be lost."""

    peer: str
    reason: str


@dataclass(frozen=True)
class FrameIn:
    """A frame from ``peer`` (authenticated: it came over ``peer``'s link)."""

    peer: str
    data: bytes


LinkEvent = LinkUp | LinkDown | FrameIn


@dataclass
class _Link:
    peer: str
    sock: Any
    addr: Addr
    conn: QuicConnection
    client: bool
    started: float
    up: bool = False
    up_at: float = 0.0  # when it came up
    rx: bytearray = field(default_factory=bytearray)
    stream: int = 0


class QuicLinks:
    def __init__(
        self, identity: Identity, keys: Callable[[str], bytes | None], counters: dict[str, int]
    ) -> None:
        """``keys(peer)``: the key pinned for a mutual buddy, else None."""
        self.identity = identity
        self.keys = keys
        self.counters = counters
        for key in (
            "quic_links",
            "quic_refused",
            "quic_bad",
            "quic_frames_in",
            "quic_frames_out",
            "quic_moved",
            "quic_events_dropped",
        ):
            counters.setdefault(key, 0)
        self._cert = X509Certificate(certificate(identity.signing_key))
        self._pkcs8 = private_key_pkcs8(identity.signing_key)
        self._links: dict[str, _Link] = {}
        self._by_addr: dict[tuple[Any, Addr], _Link] = {}
        self._expect: dict[tuple[Any, Addr], str] = {}  # server side: where each buddy's path is
        self._events: deque[LinkEvent] = deque()
        self._closing: list[_Link] = []  # closed here: their CONNECTION_CLOSE still goes out once

    # -- what the shell says ----------------------------------------------------------------

    def path(self, peer: str, sock: Any, addr: Addr | None, now: float) -> None:
        """``peer``'s direct path is now (``sock``, ``addr``) (None: there is none). The client
        side opens a link there; the server side will accept one from there."""
        for where in [w for w, p in self._expect.items() if p == peer]:
            del self._expect[where]
        link = self._links.get(peer)
        if addr is None:
            if link is not None:
                self._close(link, "no direct path")
            return
        if link is not None and (link.sock, link.addr) == (sock, addr):
            return
        if link is not None and link.up and not link.client:
            # A NAT gave the client a new port: its connection goes on there. (A client whose
            # server moved opens a new connection below: the server may be a new process,
            # which would never answer the old one.)
            self._move(link, sock, addr)
            self._expect[(sock, addr)] = peer
            return
        if link is not None:
            self._close(link, "the direct path moved")
        key = self.keys(peer)
        if key is None or len(self._links) >= MAX_LINKS:
            return
        self._expect[(sock, addr)] = peer
        if self._client_of(key):
            cfg = QuicConfiguration(
                is_client=True,
                alpn_protocols=[ALPN],
                verify_mode=ssl.CERT_NONE,  # no CA: the pinned key is checked at HandshakeCompleted
                signature_algorithms=[SignatureAlgorithm.ED25519],
                server_name="p2pim",
                max_datagram_size=MAX_DATAGRAM,
                idle_timeout=IDLE_TIMEOUT,
                connection_id_length=CID_LENGTH,
            )
            conn = QuicConnection(configuration=cfg)
            conn.connect(addr, now)
            self._add(_Link(peer, sock, addr, conn, True, now))

    def up(self, peer: str) -> bool:
        link = self._links.get(peer)
        return link is not None and link.up

    def lost_by_peer(self, peer: str, now: float) -> None:
        """``peer`` sends by another road although our link has long been up: it has lost
        its end (it restarted, or its side timed out). Ours goes too, and a new one follows."""
        link = self._links.get(peer)
        if link is not None and link.up and now >= link.up_at + LINK_SETTLE:
            self._close(link, "the peer no longer has this link")

    def send(self, peer: str, data: bytes) -> bool:
        """Queue a frame for ``peer``; False if there is no link up (use the relay)."""
        link = self._links.get(peer)
        if link is None or not link.up:
            return False
        link.conn.send_stream_data(link.stream, FRAME_KIND + len(data).to_bytes(4, "big") + data)
        self.counters["quic_frames_out"] += 1
        return True

    def close_all(self, now: float) -> None:
        for link in list(self._links.values()):
            self._close(link, "closing")

    # -- the core verbs -----------------------------------------------------------------------

    def receive_datagram(self, sock: Any, data: bytes, addr: Any, now: float) -> None:
        link = self._by_addr.get((sock, addr))
        if link is not None and _initial(data) and not self._ours(link, data):
            link = None  # a new connection from there (the peer restarted): it replaces the old
        if link is None:
            peer = self._expect.get((sock, addr))
            live = self._links.get(peer) if peer is not None else None
            if live is not None and live.up and not _initial(data):
                self._move(live, sock, addr)  # the peer's packets come from its path's new address
                link = live
            else:
                link = self._accept(sock, data, addr, now)
            if link is None:
                return
        link.conn.receive_datagram(data, addr, now)
        self._drain(link, now)

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        out = []
        for link in self._closing:
            out += [Datagram(link.sock, data, addr) for data, addr in link.conn.datagrams_to_send(now)]
        self._closing.clear()
        for link in list(self._links.values()):
            # To the path's address, wherever the connection thinks the peer is: disco has
            # proved the path, and a NAT that moved the peer's port moved it there.
            out += [Datagram(link.sock, data, link.addr) for data, _ in link.conn.datagrams_to_send(now)]
            self._drain(link, now)
        return out

    def get_timer(self) -> float | None:
        dues = [t for t in (link.conn.get_timer() for link in self._links.values()) if t is not None]
        dues += [link.started + HANDSHAKE_TIMEOUT for link in self._links.values() if not link.up]
        return min(dues) if dues else None

    def handle_timer(self, now: float) -> None:
        for link in list(self._links.values()):
            if not link.up and now >= link.started + HANDSHAKE_TIMEOUT:
                self._close(link, "no QUIC handshake")
                continue
            timer = link.conn.get_timer()
            if timer is not None and now >= timer:
                link.conn.handle_timer(now)
                self._drain(link, now)

    def next_event(self) -> LinkEvent | None:
        return self._events.popleft() if self._events else None

    # -- inside -------------------------------------------------------------------------------

    def _client_of(self, peer_key: bytes) -> bool:
        return self.identity.public_key < peer_key

    def _accept(self, sock: Any, data: bytes, addr: Addr, now: float) -> _Link | None:
        """A packet from an address with no link: a new connection from a buddy's path, or junk."""
        peer = self._expect.get((sock, addr))
        key = self.keys(peer) if peer is not None else None
        if peer is None or key is None or self._client_of(key) or len(data) < MIN_INITIAL:
            self.counters["quic_refused"] += 1
            return None
        try:
            header = pull_quic_header(data, 0, CID_LENGTH)
        except ValueError:
            self.counters["quic_bad"] += 1
            return None
        old = self._links.get(peer)
        if old is not None:
            self._close(old, "the peer opened a new link")
        cfg = QuicConfiguration(
            is_client=False,
            alpn_protocols=[ALPN],
            max_datagram_size=MAX_DATAGRAM,
            idle_timeout=IDLE_TIMEOUT,
            connection_id_length=CID_LENGTH,
        )
        cfg.certificate = self._cert
        cfg.private_key = Ed25519PrivateKey(self._pkcs8)
        try:
            conn = QuicConnection(configuration=cfg, original_destination_connection_id=header[3])
        except Exception:  # a header qh3 refuses: junk
            self.counters["quic_bad"] += 1
            return None
        link = _Link(peer, sock, addr, conn, False, now)
        self._add(link)
        return link

    @staticmethod
    def _ours(link: _Link, data: bytes) -> bool:
        """An Initial packet of ``link``'s own connection (its client's first flight, or a
        retransmission of it), not of a new one."""
        if link.client:
            return True
        try:
            dcid = pull_quic_header(data, 0, CID_LENGTH)[3]
        except ValueError:
            return True  # junk: let the connection drop it
        return dcid in (link.conn.original_destination_connection_id, link.conn.host_cid)

    def _move(self, link: _Link, sock: Any, addr: Addr) -> None:
        self._by_addr.pop((link.sock, link.addr), None)
        link.sock, link.addr = sock, addr
        self._by_addr[(sock, addr)] = link
        self.counters["quic_moved"] += 1

    def _add(self, link: _Link) -> None:
        self._links[link.peer] = link
        self._by_addr[(link.sock, link.addr)] = link
        self.counters["quic_links"] += 1

    def _drain(self, link: _Link, now: float) -> None:
        while (ev := link.conn.next_event()) is not None:
            if self._links.get(link.peer) is not link:
                return
            if isinstance(ev, qe.HandshakeCompleted) and link.client:
                self._client_ready(link, now)
            elif isinstance(ev, qe.StreamDataReceived) and ev.stream_id == link.stream:
                link.rx += ev.data
                if not self._frames(link, now):
                    return
            elif isinstance(ev, qe.ConnectionTerminated):
                self._forget(link, ev.reason_phrase or f"closed ({ev.error_code})")
                return

    def _client_ready(self, link: _Link, now: float) -> None:
        cert = link.conn.tls.peer_certificate if link.conn.tls else None
        key = self.keys(link.peer)
        if cert is None or key is None or public_key_of(cert.public_key()) != key:
            self.counters["quic_bad"] += 1
            self._close(link, "the peer's QUIC certificate is not its pinned key")
            return
        link.stream = link.conn.get_next_available_stream_id()
        signed = self.identity.signing_key.sign(HELLO + key + link.conn.original_destination_connection_id)
        link.conn.send_stream_data(link.stream, HELLO_KIND + signed.signature)
        self._up(link, now)

    def _frames(self, link: _Link, now: float) -> bool:
        """Take whole frames out of ``link.rx``; False if the link was closed for a bad one."""
        while link.rx:
            if not link.up:  # the server's first message from a client is its hello
                if len(link.rx) < 65:
                    return True
                hello, link.rx = bytes(link.rx[:65]), link.rx[65:]
                key = self.keys(link.peer)
                message = HELLO + self.identity.public_key + link.conn.original_destination_connection_id
                try:
                    if hello[:1] != HELLO_KIND or key is None:
                        raise BadSignatureError
                    VerifyKey(key).verify(message, hello[1:])
                except BadSignatureError:
                    self.counters["quic_bad"] += 1
                    self._close(link, "the QUIC client did not prove its key")
                    return False
                self._up(link, now)
                continue
            if len(link.rx) < 5:
                return True
            size = int.from_bytes(link.rx[1:5], "big")
            if link.rx[:1] != FRAME_KIND or size > MAX_FRAME:
                self.counters["quic_bad"] += 1
                self._close(link, "a malformed frame")
                return False
            if len(link.rx) < 5 + size:
                return True
            data = bytes(link.rx[5 : 5 + size])
            del link.rx[: 5 + size]
            self.counters["quic_frames_in"] += 1
            self._emit(FrameIn(link.peer, data))
        return True

    def _up(self, link: _Link, now: float) -> None:
        link.up, link.up_at = True, now
        self._emit(LinkUp(link.peer))

    def _close(self, link: _Link, reason: str) -> None:
        link.conn.close(reason_phrase=reason)
        self._closing.append(link)
        self._forget(link, reason)

    def _forget(self, link: _Link, reason: str) -> None:
        if self._links.get(link.peer) is link:
            del self._links[link.peer]
        self._by_addr.pop((link.sock, link.addr), None)
        if link.up:
            self._emit(LinkDown(link.peer, reason))

    def _emit(self, event: LinkEvent) -> None:
        if len(self._events) >= MAX_EVENTS:
            self.counters["quic_events_dropped"] += 1
            return
        self._events.append(event)


def _initial(data: bytes) -> bool:
    """A QUIC long-header Initial packet (RFC 9000 §17.2.2): a new connection, not a moved one."""
    return len(data) > 0 and data[0] & 0xB0 == 0x80
