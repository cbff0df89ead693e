"""NAT behaviour discovery (RFC 5780 §4), sans-IO.

Four fresh sockets, so that no test's NAT state spoils another's:

=============  ==============================================================
``map``        binding to the primary address (test I) -> mapped address M1,
               the server's alternate address and the RTT; then, in parallel,
               to alternate IP / primary port (M2) and alternate IP and port
               (M3): mapping behaviour (§4.3), port preservation
``filter-ip``  CHANGE-REQUEST ip+port: does an answer from the other IP and
               port get in? (§4.4 test II)
``filter-port`` CHANGE-REQUEST port: from the same IP, other port? (test III)
``hairpin``    a binding request sent to M1: does it arrive on ``map``? (§4.5)
=============  ==============================================================

Everything after test I runs at once. A test that gets no answer is negative
only after :meth:`Timings.negative_wait`, several RTTs measured by test I with
five transmissions inside it, so one lost packet does not flip a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pim.stun import codec
from p2pim.stun.codec import CHANGE_IP, CHANGE_PORT, Addr
from p2pim.stun.transaction import ClientTransaction

from .classify import Behaviour, classic_label, filtering_behaviour, mapping_behaviour
from .probes import Outcome, Probe, ProbePlanner, ProbeSet
from .report import NatReport

SOCKETS = ("map", "filter-ip", "filter-port", "hairpin")


@dataclass(frozen=True)
class Timings:
    """Retransmission schedule; passed in so tests can shorten or fake it."""

    #: First retransmission of test I. RFC 8489's 500 ms suits unknown paths;
    #: we are waiting on a person, and the answer gives us the real RTT.
    first_rto: float = 0.1
    #: No answer to test I within this: "blocked" (the issue asks for seconds).
    give_up: float = 3.0
    #: A negative verdict waits this many RTTs ...
    negative_rtts: float = 8.0
    #: ... but at least this long (scheduler jitter, delayed ACK-like NAT paths) ...
    negative_min: float = 0.25
    #: ... and at most this long.
    negative_max: float = 2.0
    #: Transmissions inside that wait (loss tolerance: 5 sends at 10% loss each
    #: way all fail with probability ~2.5e-4).
    negative_sends: int = 5

    def negative_wait(self, rtt: float | None) -> float:
        if rtt is None:
            return self.negative_max
        return min(self.negative_max, max(self.negative_min, rtt * self.negative_rtts))


def binding_probe(
    name: str,
    sock: str,
    dest: Addr,
    now: float,
    rto: float,
    wait: float,
    sends: int,
    change: int = 0,
    response_port: int | None = None,
    **kw: object,
) -> Probe:
    """A Binding probe whose transmissions all fall inside ``wait``."""
    tx = ClientTransaction(
        codec.binding_request(change=change, response_port=response_port),
        dest,
        start=now,
        rto=rto,
        deadline=now + wait,
        max_sends=sends,
    )
    return Probe(name, sock, tx, **kw)  # type: ignore[arg-type]


class NatDiscovery(ProbePlanner):
    """Runs the tests in the module docstring against one STUN server."""

    sockets = SOCKETS

    def __init__(
        self, server: Addr, local: dict[str, Addr], now: float, timings: Timings = Timings()
    ) -> None:
        self.server = server
        self.local = local
        self.timings = timings
        self.started_at = now
        self.finished_at: float | None = None
        self.probes = ProbeSet()
        t = timings
        self.test1 = self.probes.add(
            binding_probe("binding", "map", server, now, t.first_rto, t.give_up, 7, fail_on_icmp=True)
        )
        self._phase2: dict[str, Probe] | None = None
        self._notes: list[str] = []

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    # -- planning --------------------------------------------------------
    def _advance(self, now: float) -> None:
        if self._phase2 is None and self.test1.done:
            self._phase2 = {}
            if self.test1.outcome is Outcome.ANSWERED:
                self._start_phase2(now)
        if self._phase2 is not None and self.probes.all_done and self.finished_at is None:
            self.finished_at = now

    @property
    def rtt(self) -> float | None:
        # Karn: an RTT is only known if test I was answered on its first send.
        return self.test1.tx.rtt if self.test1.tx.sends == 1 else None

    def _start_phase2(self, now: float) -> None:
        assert self._phase2 is not None
        t = self.timings
        wait = t.negative_wait(self.rtt)
        rto = wait / 2 ** (t.negative_sends - 1)
        resp = self.test1.tx.response
        assert resp is not None
        alt = codec.other_address(resp)
        ip, port = self.server

        def add(name: str, sock: str, dest: Addr, **kw: object) -> None:
            probe = binding_probe(name, sock, dest, now, rto, wait, t.negative_sends, **kw)  # type: ignore[arg-type]
            self._phase2[name] = self.probes.add(probe)  # type: ignore[index]

        if alt is None:
            self._notes.append(
                "the server gave no alternate address (OTHER-ADDRESS or CHANGED-ADDRESS): "
                "mapping and filtering cannot be tested against it"
            )
        elif alt[0] == ip or alt[1] == port:
            self._notes.append(f"the server's alternate address {alt} is not a different IP and port")
        else:
            add("map-alt-ip", "map", (alt[0], port))
            add("map-alt-both", "map", alt)
            add("filter-ip", "filter-ip", self.server, change=CHANGE_IP | CHANGE_PORT, expect_from=alt)
            add("filter-port", "filter-port", self.server, change=CHANGE_PORT, expect_from=(ip, alt[1]))
        m1 = self.test1.mapped
        if m1 is not None and m1 != self.local["map"]:
            add("hairpin", "hairpin", m1, receive_on="map", expect_request=True)

    # -- verdicts --------------------------------------------------------
    def report(self, now: float | None = None) -> NatReport:
        end = self.finished_at if self.finished_at is not None else (now or self.started_at)
        rep = NatReport(server=self.server, server_kind="no answer", elapsed_s=end - self.started_at)
        rep.local = self.local["map"]
        rep.ignored_datagrams = self.probes.counters.malformed + self.probes.counters.unmatched
        rep.notes = list(self._notes)
        t1 = self.test1
        if t1.outcome is Outcome.ERROR:
            rep.notes.append(f"the server answered with error {t1.error_code}")
        if t1.outcome is not Outcome.ANSWERED or t1.mapped is None:
            if t1.outcome is Outcome.UNREACHABLE:
                rep.notes.append("the server's port is unreachable (ICMP): nothing listens there")
            elif t1.outcome is Outcome.TIMED_OUT:
                rep.notes.append(f"no answer within {self.timings.give_up:g} s")
            rep.label = classic_label(False, None, rep.mapping, rep.filtering)
            return rep

        resp = t1.tx.response
        assert resp is not None
        rep.mapped = t1.mapped
        rep.alternate = codec.other_address(resp)
        if "OTHER-ADDRESS" in resp.attributes:
            rep.server_kind = "rfc5780"
        elif "CHANGED-ADDRESS" in resp.attributes:
            rep.server_kind = "rfc3489"
        else:
            rep.server_kind = "single-address"
        rep.rtt_ms = None if self.rtt is None else round(self.rtt * 1000, 2)
        rep.nat_present = rep.mapped != rep.local
        if rep.nat_present and rep.mapped and rep.local:
            rep.port_preserved = rep.mapped[1] == rep.local[1]

        p = self._phase2 or {}
        m2 = self._mapped(p.get("map-alt-ip"), rep.notes)
        m3 = self._mapped(p.get("map-alt-both"), rep.notes)
        rep.mapping = mapping_behaviour(rep.mapped, m2, m3)
        rep.filtering = filtering_behaviour(
            self._got_through(p.get("filter-ip"), rep.notes),
            self._got_through(p.get("filter-port"), rep.notes),
        )
        if (hp := p.get("hairpin")) is not None:
            rep.hairpin = hp.outcome is Outcome.ANSWERED
        rep.label = classic_label(True, rep.nat_present, rep.mapping, rep.filtering)
        if rep.mapping is Behaviour.UNKNOWN and rep.alternate is not None:
            rep.notes.append("mapping unknown: the alternate address did not answer")
        return rep

    @staticmethod
    def _mapped(probe: Probe | None, notes: list[str]) -> Addr | None:
        if probe is None or probe.outcome is not Outcome.ANSWERED:
            if probe is not None:
                notes.append(f"{probe.name}: {probe.outcome.value} from {probe.tx.destination}")
            return None
        return probe.mapped

    @staticmethod
    def _got_through(probe: Probe | None, notes: list[str]) -> bool | None:
        """True/False for a filtering test; None when it says nothing about the NAT."""
        if probe is None:
            return None
        if probe.outcome is Outcome.ANSWERED:
            return True
        if probe.outcome is Outcome.TIMED_OUT:
            return False
        if probe.outcome is Outcome.ERROR:
            notes.append(f"{probe.name}: the server refused the change request (error {probe.error_code})")
        elif probe.outcome is Outcome.WRONG_SOURCE:
            notes.append(
                f"{probe.name}: the server answered from {probe.tx.response_from}, "
                f"not {probe.expect_from}; it does not honour CHANGE-REQUEST"
            )
        return None
