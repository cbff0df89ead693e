"""An in-memory world for sans-IO cores: client sockets, an RFC 4787 NAT model,
and the real STUN server core, on a fake clock. Deterministic (seeded loss).

This is the sans-IO test style of DESIGN.md (aioquic's two in-memory peers);
the kernel NATs in natlab are what prove the same behaviour for real.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from rendezvous.stun_server import StunServerCore

Addr = tuple[str, int]
PUBLIC_IP = "192.0.2.99"
LAN_IP = "10.0.0.2"


@dataclass
class SimNat:
    """mapping: eim | adm | apdm; filtering: eif | adf | apdf."""

    mapping: str = "eim"
    filtering: str = "apdf"
    hairpin: bool = False
    preserve_ports: bool = True
    timeout: float = 120.0
    public_ip: str = PUBLIC_IP
    # key -> [public port, last used]
    _bindings: dict[tuple, list] = field(default_factory=dict)
    # public port -> internal addr
    _owner: dict[int, Addr] = field(default_factory=dict)
    # public port -> {remote key: last used}
    _permits: dict[int, dict[object, float]] = field(default_factory=dict)
    _ports: itertools.count = field(default_factory=lambda: itertools.count(50000, 7))

    def _key(self, src: Addr, dst: Addr) -> tuple:
        return {"eim": (src,), "adm": (src, dst[0]), "apdm": (src, dst)}[self.mapping]

    def outbound(self, src: Addr, dst: Addr, now: float) -> Addr:
        key = self._key(src, dst)
        b = self._bindings.get(key)
        if b is None or now - b[1] > self.timeout:
            port = src[1] if self.preserve_ports and src[1] not in self._owner else next(self._ports)
            if self.mapping != "eim" and not self.preserve_ports:
                port = next(self._ports)
            b = [port, now]
            self._bindings[key] = b
            self._owner[port] = src
            self._permits[port] = {}
        b[1] = now
        remote = {"eif": None, "adf": dst[0], "apdf": dst}[self.filtering]
        self._permits[b[0]][remote] = now
        return (self.public_ip, b[0])

    def inbound(self, src: Addr, public_port: int, now: float) -> Addr | None:
        permits = self._permits.get(public_port)
        if permits is None:
            return None
        remote = {"eif": None, "adf": src[0], "apdf": src}[self.filtering]
        seen = permits.get(remote)
        if seen is None or now - seen > self.timeout:
            return None
        return self._owner[public_port]

    def hairpin_target(self, public_port: int) -> Addr | None:
        return self._owner.get(public_port) if self.hairpin else None


class World:
    """Moves datagrams between a core's sockets, a NAT (or none) and a STUN server core."""

    def __init__(
        self,
        server: StunServerCore | None,
        nat: SimNat | None,
        one_way: float = 0.010,
        loss: float = 0.0,
        seed: int = 1,
        wrong_source: bool = False,
    ) -> None:
        self.server = server
        self.nat = nat
        self.one_way = one_way
        self.loss = loss
        self.rng = random.Random(seed)
        self.wrong_source = wrong_source  # a broken server answering change requests from the primary
        self.local: dict[str, Addr] = {}
        self._by_addr: dict[Addr, str] = {}
        self._queue: list[tuple[float, int, str, bytes, Addr]] = []
        self._seq = itertools.count()
        self._next_port = itertools.count(40000)

    def open(self, labels) -> dict[str, Addr]:  # type: ignore[no-untyped-def]
        for label in labels:
            addr = (LAN_IP if self.nat else PUBLIC_IP, next(self._next_port))
            self.local[label] = addr
            self._by_addr[addr] = label
        return self.local

    def _lost(self) -> bool:
        return self.loss > 0 and self.rng.random() < self.loss

    def send(self, label: str, data: bytes, dst: Addr, now: float) -> None:
        src = self.local[label]
        if self._lost():
            return
        if self.nat and dst[0] == self.nat.public_ip:
            mapped = self.nat.outbound(src, dst, now)
            target = self.nat.hairpin_target(dst[1])
            if target in self._by_addr:
                self._deliver(now + 2 * self.one_way, self._by_addr[target], data, mapped)
            return
        mapped = self.nat.outbound(src, dst, now) if self.nat else src
        if self.server is None:
            return
        out = self.server.handle(data, dst, mapped, now + self.one_way)
        if out is None or self._lost():
            return
        source = (self.server.ip, self.server.port) if self.wrong_source else out.sock
        arrive = now + 2 * self.one_way
        if self.nat:
            if out.addr[0] != self.nat.public_ip:
                return
            internal = self.nat.inbound(source, out.addr[1], arrive)
            if internal is None or internal not in self._by_addr:
                return
            self._deliver(arrive, self._by_addr[internal], out.data, source)
        elif out.addr in self._by_addr:
            self._deliver(arrive, self._by_addr[out.addr], out.data, source)

    def _deliver(self, at: float, label: str, data: bytes, source: Addr) -> None:
        heapq.heappush(self._queue, (at, next(self._seq), label, data, source))

    def run(self, core, now: float = 0.0, limit: float = 3600.0) -> float:  # type: ignore[no-untyped-def]
        """Drive ``core`` until done; returns the fake time at the end."""
        while not core.done and now < limit:
            core.handle_timer(now)
            for dg in core.datagrams_to_send(now):
                self.send(dg.sock, dg.data, dg.addr, now)
            if core.done:
                break
            times = [t for t in (core.get_timer(),) if t is not None]
            if self._queue:
                times.append(self._queue[0][0])
            if not times:
                break
            now = max(now, min(times))
            while self._queue and self._queue[0][0] <= now:
                _, _, label, data, source = heapq.heappop(self._queue)
                core.receive_datagram(label, data, source, now)
        return now
