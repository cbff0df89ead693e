"""The result of `p2pim nat`: one dataclass, rendered as a table or JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .classify import ADVICE, Behaviour, Label
from .portmap import Mapping

Addr = tuple[str, int]


@dataclass
class LifetimeResult:
    """How long an idle UDP binding survived (RFC 5780 §4.6)."""

    #: Longest idle time (s) after which a binding still let the server's answer in.
    alive_for: float | None
    #: Shortest idle time (s) after which a binding was gone; None: none died.
    dead_after: float | None
    #: Keepalive interval this implies (s).
    keepalive: float
    #: Longest idle time tested (s).
    tested_up_to: float


@dataclass
class NatReport:
    """Everything `p2pim nat` found; ``None`` fields could not be measured (see ``notes``)."""

    server: Addr
    #: "rfc5780" (OTHER-ADDRESS), "rfc3489" (CHANGED-ADDRESS), "single-address", or "no answer".
    server_kind: str
    alternate: Addr | None = None
    local: Addr | None = None
    mapped: Addr | None = None
    rtt_ms: float | None = None
    nat_present: bool | None = None
    mapping: Behaviour = Behaviour.UNKNOWN
    filtering: Behaviour = Behaviour.UNKNOWN
    port_preserved: bool | None = None
    hairpin: bool | None = None
    label: Label = Label.UNKNOWN
    lifetime: LifetimeResult | None = None
    #: The routers before the first public one (a TTL ladder; None: silent or not run).
    route: list[str | None] | None = None
    #: What the router granted when asked to forward a port (None: nothing), and what was asked.
    port_mapping: Mapping | None = None
    port_mapping_tried: list[str] = field(default_factory=list)
    #: Our global IPv6 address (None: none); with IPv6 there is no NAT, only a firewall.
    ipv6: str | None = None
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    #: Datagrams that arrived but were not STUN or matched no probe.
    ignored_datagrams: int = 0

    @property
    def responded(self) -> bool:
        return self.mapped is not None

    def to_json(self) -> dict[str, Any]:
        def addr(a: Addr | None) -> str | None:
            return _fmt(a) if a else None

        return {
            "server": addr(self.server),
            "server_kind": self.server_kind,
            "alternate": addr(self.alternate),
            "local": addr(self.local),
            "mapped": addr(self.mapped),
            "rtt_ms": self.rtt_ms,
            "nat_present": self.nat_present,
            "mapping": self.mapping.value,
            "filtering": self.filtering.value,
            "port_preserved": self.port_preserved,
            "hairpin": self.hairpin,
            "label": self.label.value,
            "lifetime": None if self.lifetime is None else dict(self.lifetime.__dict__),
            "route": self.route,
            "nat_layers": self.nat_layers,
            "carrier_grade_nat": self.carrier_grade_nat,
            "port_mapping": None
            if self.port_mapping is None
            else {
                "protocol": self.port_mapping.protocol,
                "external": _fmt(self.port_mapping.external),
                "lifetime": self.port_mapping.lifetime,
            },
            "port_mapping_tried": list(self.port_mapping_tried),
            "ipv6": self.ipv6,
            "notes": list(self.notes),
            "elapsed_s": round(self.elapsed_s, 3),
            "ignored_datagrams": self.ignored_datagrams,
        }

    def render(self) -> str:
        """Human table."""
        kind = {
            "rfc5780": "RFC 5780",
            "rfc3489": "RFC 3489",
            "single-address": "cannot change address",
            "no answer": "no answer",
        }.get(self.server_kind, self.server_kind)
        head = f"STUN server {_fmt(self.server)} ({kind}"
        if self.alternate:
            head += f", alternate {_fmt(self.alternate)}"
        if self.rtt_ms is not None:
            head += f", RTT {self.rtt_ms:.1f} ms"
        head += ")"
        rows = [
            ("NAT type", self.label.value),
            ("Mapped address", _fmt(self.mapped) if self.mapped else "-"),
            ("Local address", _fmt(self.local) if self.local else "-"),
            ("Behind a NAT", _yesno(self.nat_present)),
            ("Mapping", self.mapping.value),
            ("Filtering", self.filtering.value),
            ("Port preservation", self._nat_only(self.port_preserved)),
            ("Hairpinning", self._nat_only(self.hairpin)),
            ("Binding lifetime", self._lifetime_text()),
            ("Route out", self._route_text()),
            ("Port mapping", self._portmap_text()),
            ("IPv6", f"{self.ipv6}, global (no NAT; p2pim punches over it first)" if self.ipv6 else "none"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [head, ""] + [f"  {k:<{width}}  {v}" for k, v in rows]
        lines += ["", f"  {ADVICE[self.label]}"]
        lines += [f"  note: {n}" for n in self.notes]
        took = f"{self.elapsed_s * 1000:.0f} ms" if self.elapsed_s < 1 else f"{self.elapsed_s:.1f} s"
        lines.append(f"  (tests took {took})")
        return "\n".join(lines)

    @property
    def nat_layers(self) -> int | None:
        """Routers with private or shared addresses before the Internet: 2+ is a double NAT
        (or a router of the LAN's own behind the NAT: the ladder cannot tell the two apart)."""
        return None if self.route is None else len(self.route)

    @property
    def carrier_grade_nat(self) -> bool | None:
        """A router on the way in RFC 6598's shared space (100.64.0.0/10): the ISP's NAT."""
        if self.route is None:
            return None
        return any(hop is not None and hop.startswith(_SHARED_PREFIXES) for hop in self.route)

    def _portmap_text(self) -> str:
        m = self.port_mapping
        if m is not None:
            return f"{m.protocol} (the router forwarded {_fmt(m.external)}; given back)"
        if not self.port_mapping_tried:
            return "n/a (no NAT)" if self.nat_present is False else "not asked (no default gateway)"
        return f"none ({', '.join(self.port_mapping_tried)} asked, no mapping)"

    def _route_text(self) -> str:
        if self.route is None:
            return "unknown (the routers on the way did not answer)"
        hops = ", ".join(h or "?" for h in self.route) or "none"
        text = f"{len(self.route)} router(s) before the Internet ({hops})"
        if self.carrier_grade_nat:
            text += "; carrier-grade NAT (100.64.0.0/10): double NAT"
        elif len(self.route) >= 2:
            text += "; double NAT likely"
        return text

    def _nat_only(self, v: bool | None) -> str:
        return "n/a (no NAT)" if self.nat_present is False else _yesno(v)

    def _lifetime_text(self) -> str:
        lt = self.lifetime
        if lt is None:
            return "not measured (--lifetime)"
        if lt.alive_for is None and lt.dead_after is None:
            return "unknown"
        if lt.dead_after is None:
            span = f"over {lt.alive_for:g} s (tested up to {lt.tested_up_to:g} s)"
        elif lt.alive_for is None:
            span = f"under {lt.dead_after:g} s"
        else:
            span = f"{lt.alive_for:g}-{lt.dead_after:g} s"
        return f"{span}; keepalive every {lt.keepalive:g} s"


_SHARED_PREFIXES = tuple(f"100.{n}." for n in range(64, 128))


def _fmt(a: Addr) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def _yesno(v: bool | None) -> str:
    return "unknown" if v is None else ("yes" if v else "no")
