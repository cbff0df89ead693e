"""The path manager: the asyncio shell around one :class:`PeerPath` per buddy.

It owns the client's UDP socket (plus, briefly, the extra sockets of a
birthday dance), finds our own candidates with STUN against the
rendezvous, seals and opens disco packets, and hands direct envelopes to
the client. Everything it decides comes from the sans-IO cores; this module
only moves bytes and time.

The client gives it four callables: ``keys()`` (pinned identity key ->
username), ``relay(peer, data)`` (send bytes through the rendezvous),
``on_data(data, addr)`` (a direct envelope arrived) and ``on_change(peer,
path, reason)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..identity import Identity
from ..stun import codec
from ..stun.transaction import ClientTransaction
from ..wire import disco_pb2 as dpb
from ..wire import nat_pb2 as npb
from .disco import (
    DATA_MAGIC,
    Addr,
    Candidates,
    DiscoBoxes,
    DiscoError,
    call_me_maybe,
    is_data,
    is_disco,
    new_tx,
    parse_call_me_maybe,
    ping,
    pong,
    sender_key,
)
from .peer import (
    DEFAULT_KEEPALIVE,
    MAIN,
    RELAY,
    CloseSockets,
    Path,
    PathChanged,
    PeerPath,
    SendCallMeMaybe,
    SendPing,
    SendPong,
)

log = logging.getLogger(__name__)

MAX_DIRECT = 1100  # bigger envelopes take the relay: no IP fragmentation through NATs
STUN_RTO = 0.25  # first retransmission; doubles (RFC 8489): sends at 0, 0.25, 0.75, 1.75, 3.75 s
STUN_SENDS = 5
STUN_GIVE_UP = 4.0
MAX_REFLEXIVE = 4


@dataclass(frozen=True)
class Local:
    """What we found out about ourselves."""

    host: Addr
    mapped: Addr | None
    hard: bool  # the mapping changed with the destination
    # Our address as buddies' pongs reported it, newest last: after a NAT rebinding it is
    # fresher than what STUN said at login.
    reflexive: tuple[Addr, ...] = ()

    def candidates(self) -> Candidates:
        endpoints: list[Addr] = []
        for addr in (self.host, self.mapped, *reversed(self.reflexive)):
            if addr is not None and addr not in endpoints:
                endpoints.append(addr)
        return Candidates(tuple(endpoints), self.mapped, self.hard)


class PathManager:
    def __init__(
        self,
        identity: Identity,
        keys: Callable[[], dict[bytes, str]],
        relay: Callable[[str, bytes], None],
        on_data: Callable[[bytes, Addr], None],
        on_change: Callable[[str, Path | None, str], None],
        keepalive: float = DEFAULT_KEEPALIVE,
    ) -> None:
        self.boxes = DiscoBoxes(identity)
        self._keys = keys
        self._relay = relay
        self._on_data = on_data
        self._on_change = on_change
        self.keepalive = keepalive
        self.local: Local | None = None
        self.peers: dict[str, PeerPath] = {}
        self.counters = {
            "bad_packets": 0,
            "unknown_sender": 0,
            "forged": 0,
            "stun_unmatched": 0,
            "direct_in": 0,
            "direct_out": 0,
            "send_errors": 0,
        }
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._extra: dict[str, dict[int, socket.socket]] = {}
        self._stun: dict[bytes, asyncio.Future[codec.stun.Message]] = {}
        self._probes: dict[bytes, tuple[str, asyncio.Future[float]]] = {}
        self._key_cache: dict[bytes, str] = {}
        self._keys_loaded = -1e9
        self._cmm_waiting: dict[str, bool] = {}  # call-me-maybes held until STUN answers (peer: reply)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- life cycle ----------------------------------------------------------------

    def start(self, port: int = 0) -> int:
        """Bind the UDP socket (all IPv4 addresses); returns its port."""
        self._sock = self._open(port, MAIN, "")
        self._task = asyncio.create_task(self._ticker())
        return int(self._sock.getsockname()[1])

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1]) if self._sock else 0

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for peer in list(self._extra):
            self._close_extra(peer, frozenset())
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _open(self, port: int, sock_id: int, owner: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("0.0.0.0", port))
        self._loop.add_reader(sock.fileno(), self._readable, sock, sock_id, owner)
        return sock

    # -- our own candidates -------------------------------------------------------------

    async def discover(self, stun: list[Addr]) -> Local:
        """Host address towards the server, STUN-mapped address, and whether mapping varies.

        The mapping test is RFC 5780's first step: the same socket asks the
        primary and the alternate STUN address; two different mapped
        addresses mean the NAT maps per destination.
        """
        assert self._sock is not None
        host = (_source_ip(stun[0]) if stun else "127.0.0.1", self.port)
        mapped = None
        hard = False
        first = await self._binding(stun[0]) if stun else None
        if first is not None:
            mapped = codec.mapped_address(first)
            alt = codec.other_address(first) or (stun[1] if len(stun) > 1 else None)
            if alt is not None and mapped is not None:
                second = await self._binding(alt)
                other = codec.mapped_address(second) if second else None
                hard = other is not None and other != mapped
        self.local = Local(host, mapped, hard)
        for core in self.peers.values():
            core.local = self.local.candidates()
        waiting, self._cmm_waiting = self._cmm_waiting, {}
        for peer, reply in waiting.items():
            self._do(peer, SendCallMeMaybe(reply))
        return self.local

    async def _binding(self, server: Addr) -> codec.stun.Message | None:
        """One Binding request on our socket, retransmitted by the project's sans-IO transaction."""
        now = self._loop.time()
        tx = ClientTransaction(
            codec.binding_request(), server, now, STUN_RTO, now + STUN_GIVE_UP, max_sends=STUN_SENDS
        )
        future: asyncio.Future[codec.stun.Message] = self._loop.create_future()
        self._stun[tx.transaction_id] = future
        try:
            while tx.next_timer() is not None:
                data = tx.due(self._loop.time())
                if data is not None:
                    self._sendto(self._sock, data, server)
                due = tx.next_timer()
                if due is None:
                    break
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(future), max(0.0, due - self._loop.time()))
            return None
        finally:
            self._stun.pop(tx.transaction_id, None)

    # -- what the client tells us --------------------------------------------------------

    def want(self, peer: str) -> None:
        """``peer`` is online and we talk to it: try for a direct path."""
        if self._core(peer).activate(self._loop.time()):
            self._run(peer)

    def offline(self, peer: str) -> None:
        core = self.peers.get(peer)
        if core is not None:
            core.offline()
            self._run(peer)

    def suspect(self, peer: str) -> None:
        core = self.peers.get(peer)
        if core is not None:
            core.suspect(self._loop.time())
            self._run(peer)

    def route(self, peer: str) -> Path | None:
        """Where to send to ``peer`` directly now; None: use the relay."""
        core = self.peers.get(peer)
        return core.usable if core is not None else None

    def send_direct(self, peer: str, envelope: bytes) -> bool:
        """Send an envelope on the direct path; False if there is none (use the relay)."""
        path = self.route(peer)
        if path is None or len(envelope) > MAX_DIRECT:
            return False
        sock = self._socket(peer, path.sock)
        if sock is None or not self._sendto(sock, DATA_MAGIC + envelope, path.addr):
            return False
        self.counters["direct_out"] += 1
        return True

    def on_relay(self, peer: str, data: bytes) -> None:
        """A disco packet that came through the relay from ``peer``."""
        key = self._key_of(peer)
        if key is None:
            self.counters["unknown_sender"] += 1
            return
        try:
            msg = self.boxes.open(data, key)  # also refuses a packet claiming another key
        except DiscoError:
            self.counters["forged"] += 1
            return
        self._disco(peer, msg, RELAY, ("0.0.0.0", 0))

    async def probe(self, peer: str, timeout: float = 2.0) -> tuple[str, float | None]:
        """One ping on the current path: ("relay" or the direct address, RTT or None)."""
        key = self._key_of(peer)
        if key is None:
            return ("unknown", None)
        tx = new_tx()
        future: asyncio.Future[float] = self._loop.create_future()
        self._probes[tx] = (peer, future)
        packet = self.boxes.seal(key, ping(tx))
        path = self.route(peer)
        sock = self._socket(peer, path.sock) if path else None
        if path is not None and sock is not None:
            via = f"{path.addr[0]}:{path.addr[1]}"
            self._sendto(sock, packet, path.addr)
        else:
            via = "relay"
            self._relay(peer, packet)
        start = self._loop.time()
        try:
            await asyncio.wait_for(future, timeout)
            return (via, self._loop.time() - start)
        except TimeoutError:
            return (via, None)
        finally:
            self._probes.pop(tx, None)

    # -- packets in ------------------------------------------------------------------

    def _readable(self, sock: socket.socket, sock_id: int, owner: str) -> None:
        for _ in range(64):
            try:
                data, addr = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ICMP errors on some kernels: nothing to read
            self._datagram(data, (addr[0], addr[1]), sock_id, owner)

    def _datagram(self, data: bytes, addr: Addr, sock_id: int, owner: str) -> None:
        if is_data(data):
            self.counters["direct_in"] += 1
            self._on_data(data[len(DATA_MAGIC) :], addr)
            return
        if is_disco(data):
            try:
                key = sender_key(data)
            except DiscoError:
                self.counters["bad_packets"] += 1
                return
            peer = self._peer_of(key)
            if peer is None or (owner and peer != owner):
                self.counters["unknown_sender"] += 1
                return
            try:
                msg = self.boxes.open(data, key)
            except DiscoError:
                self.counters["forged"] += 1
                return
            self._disco(peer, msg, sock_id, addr)
            return
        if sock_id == MAIN and codec.is_stun(data):
            try:
                decoded = codec.decode(data)
            except Exception:
                self.counters["bad_packets"] += 1
                return
            future = self._stun.get(decoded.message.transaction_id)
            if future is None or future.done():
                self.counters["stun_unmatched"] += 1
                return
            future.set_result(decoded.message)
            return
        self.counters["bad_packets"] += 1

    def _disco(self, peer: str, msg: dpb.Disco, sock_id: int, addr: Addr) -> None:
        now = self._loop.time()
        kind = msg.WhichOneof("kind")
        core = self._core(peer)
        if kind == "ping":
            core.ping(now, sock_id, addr, msg.ping.tx_id)
        elif kind == "pong":
            probe = self._probes.get(msg.pong.tx_id)
            if probe is not None and probe[0] == peer:
                if not probe[1].done():
                    probe[1].set_result(now)
            elif sock_id != RELAY:
                rtt = core.pong(now, sock_id, addr, msg.pong.tx_id)
                if rtt is not None and sock_id == MAIN:
                    self._learn_reflexive(msg.pong.src)
        elif kind == "call_me_maybe":
            cands = parse_call_me_maybe(msg.call_me_maybe)
            core.call_me_maybe(now, cands, msg.call_me_maybe.reply)
        self._run(peer)

    def _learn_reflexive(self, src: npb.Address) -> None:
        if self.local is None:
            return
        ip, port = src.ip, src.port
        if not 0 < port < 65536 or (ip, port) in (self.local.host, self.local.mapped, *self.local.reflexive):
            return
        if len(ip.split(".")) != 4:
            return
        self.local = replace(self.local, reflexive=(*self.local.reflexive, (ip, port))[-MAX_REFLEXIVE:])
        for core in self.peers.values():
            core.local = self.local.candidates()

    # -- packets out -----------------------------------------------------------------

    def _core(self, peer: str) -> PeerPath:
        core = self.peers.get(peer)
        if core is None:
            core = self.peers[peer] = PeerPath(peer, self.keepalive)
            if self.local is not None:
                core.local = self.local.candidates()
        return core

    def _run(self, peer: str) -> None:
        core = self.peers.get(peer)
        if core is None:
            return
        for out in core.poll(self._loop.time()):
            self._do(peer, out)
        self._wake.set()

    def _do(self, peer: str, out: object) -> None:
        key = self._key_of(peer)
        if isinstance(out, PathChanged):
            self._on_change(peer, out.path, out.reason)
            return
        if isinstance(out, CloseSockets):
            self._close_extra(peer, out.keep)
            return
        if key is None:
            return
        if isinstance(out, SendPing):
            packet = self.boxes.seal(key, ping(out.tx))
            sock = self._socket(peer, out.sock)
            for addr in out.addrs:
                if out.sock == RELAY:
                    self._relay(peer, packet)
                elif sock is not None:
                    self._sendto(sock, packet, addr)
        elif isinstance(out, SendPong):
            packet = self.boxes.seal(key, pong(out.tx, out.addr))
            if out.sock == RELAY:
                self._relay(peer, packet)
            else:
                sock = self._socket(peer, out.sock)
                if sock is not None:
                    self._sendto(sock, packet, out.addr)
        elif isinstance(out, SendCallMeMaybe):
            if self.local is None:
                # STUN has not answered yet: send it (with the candidates) when it has.
                self._cmm_waiting[peer] = self._cmm_waiting.get(peer, True) and out.reply
                return
            self._relay(peer, self.boxes.seal(key, call_me_maybe(self.local.candidates(), out.reply)))

    def _socket(self, peer: str, sock_id: int) -> socket.socket | None:
        if sock_id == MAIN:
            return self._sock
        if sock_id == RELAY:
            return None
        socks = self._extra.setdefault(peer, {})
        sock = socks.get(sock_id)
        if sock is None:
            try:
                sock = socks[sock_id] = self._open(0, sock_id, peer)
            except OSError:  # out of file descriptors: fewer birthday mappings this time
                self.counters["send_errors"] += 1
                return None
        return sock

    def _close_extra(self, peer: str, keep: frozenset[int]) -> None:
        socks = self._extra.get(peer, {})
        for sock_id in [s for s in socks if s not in keep]:
            sock = socks.pop(sock_id)
            self._loop.remove_reader(sock.fileno())
            sock.close()
        if not socks:
            self._extra.pop(peer, None)

    def _sendto(self, sock: socket.socket | None, data: bytes, addr: Addr) -> bool:
        if sock is None:
            return False
        try:
            sock.sendto(data, addr)
            return True
        except OSError:  # unreachable network, full buffer: the ARQ above copes
            self.counters["send_errors"] += 1
            return False

    def _key_of(self, peer: str) -> bytes | None:
        for key, name in self._key_cache.items():
            if name == peer:
                return key
        self._reload_keys()
        return next((k for k, n in self._key_cache.items() if n == peer), None)

    def _peer_of(self, key: bytes) -> str | None:
        name = self._key_cache.get(key)
        if name is None:
            self._reload_keys()
            name = self._key_cache.get(key)
        return name

    def _reload_keys(self) -> None:
        # At most once a second: packets under strangers' keys must not each cost a query.
        now = self._loop.time()
        if now - self._keys_loaded >= 1.0:
            self._key_cache, self._keys_loaded = self._keys(), now

    def forget_keys(self) -> None:
        """Buddies or keys changed: read the pinned keys of buddies again."""
        self._key_cache, self._keys_loaded = self._keys(), self._loop.time()

    async def _ticker(self) -> None:
        # A timer handle and an Event rather than wait_for: on Python 3.11, wait_for
        # can swallow a cancel that races with the event, and close() would hang.
        while True:
            dues = [d for d in (c.next_timer() for c in self.peers.values()) if d is not None]
            timer = self._loop.call_at(min(dues), self._wake.set) if dues else None
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()
            self._wake.clear()
            for peer in list(self.peers):
                core = self.peers[peer]
                for out in core.poll(self._loop.time()):
                    self._do(peer, out)


def _source_ip(server: Addr) -> str:
    """Our address on the route to ``server`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(server)
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"
