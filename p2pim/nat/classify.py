"""NAT behaviour verdicts from probe results: pure functions, no I/O.

Terms are RFC 4787's (mapping and filtering behaviour) as measured by RFC 5780
§4.3 and §4.4; the classic label is RFC 3489's, derived from the same results.
"""

from __future__ import annotations

import enum


class Behaviour(enum.Enum):
    """Mapping or filtering behaviour (RFC 4787 §4.1, §5)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    UNKNOWN = "unknown"


class Label(enum.Enum):
    """The classic RFC 3489 §10.1 NAT type."""

    OPEN_INTERNET = "open internet"
    FULL_CONE = "full cone"
    RESTRICTED_CONE = "restricted cone"
    PORT_RESTRICTED_CONE = "port-restricted cone"
    SYMMETRIC = "symmetric"
    SYMMETRIC_UDP_FIREWALL = "symmetric UDP firewall"
    BLOCKED = "blocked"
    UNKNOWN = "unknown"


Addr = tuple[str, int]


def mapping_behaviour(m1: Addr | None, m2: Addr | None, m3: Addr | None) -> Behaviour:
    """RFC 5780 §4.3 from the mapped addresses seen by three server addresses.

    ``m1``: to primary IP and port; ``m2``: to alternate IP, primary port;
    ``m3``: to alternate IP and port. All from one local socket.
    """
    if m1 is None or m2 is None:
        return Behaviour.UNKNOWN
    if m1 == m2:
        return Behaviour.ENDPOINT_INDEPENDENT
    if m3 is None:
        return Behaviour.UNKNOWN
    if m2 == m3:
        return Behaviour.ADDRESS_DEPENDENT
    return Behaviour.ADDRESS_AND_PORT_DEPENDENT


def filtering_behaviour(change_both: bool | None, change_port: bool | None) -> Behaviour:
    """RFC 5780 §4.4 from whether answers from changed addresses got through.

    ``change_both``: an answer from the other IP and port arrived (True), did
    not (False), or the test could not be run (None); ``change_port`` likewise
    for an answer from the same IP, other port.
    """
    if change_both is True:
        return Behaviour.ENDPOINT_INDEPENDENT
    if change_both is None or change_port is None:
        return Behaviour.UNKNOWN
    if change_port:
        return Behaviour.ADDRESS_DEPENDENT
    return Behaviour.ADDRESS_AND_PORT_DEPENDENT


def classic_label(
    responded: bool, nat_present: bool | None, mapping: Behaviour, filtering: Behaviour
) -> Label:
    """RFC 3489's label, as its decision tree would reach it from the same facts.

    RFC 3489 calls any mapping that is not endpoint-independent "symmetric",
    and a host with its own public address but filtered "symmetric UDP firewall".
    """
    if not responded:
        return Label.BLOCKED
    if nat_present is None:
        return Label.UNKNOWN
    if not nat_present:
        if filtering is Behaviour.ENDPOINT_INDEPENDENT:
            return Label.OPEN_INTERNET
        if filtering is Behaviour.UNKNOWN:
            return Label.UNKNOWN
        return Label.SYMMETRIC_UDP_FIREWALL
    if mapping in (Behaviour.ADDRESS_DEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT):
        return Label.SYMMETRIC
    if mapping is Behaviour.UNKNOWN:
        return Label.UNKNOWN
    return {
        Behaviour.ENDPOINT_INDEPENDENT: Label.FULL_CONE,
        Behaviour.ADDRESS_DEPENDENT: Label.RESTRICTED_CONE,
        Behaviour.ADDRESS_AND_PORT_DEPENDENT: Label.PORT_RESTRICTED_CONE,
        Behaviour.UNKNOWN: Label.UNKNOWN,
    }[filtering]


def keepalive_for(alive_for: float | None, dead_after: float | None) -> float:
    """Keepalive interval implied by a measured binding lifetime.

    Refresh at 80% of the longest idle time a binding was seen to survive, so
    one lost keepalive still leaves margin. A binding that died even at the
    shortest test gets the bound below it halved; no measurement gives the
    conventional 25 s (RFC 4787 REQ-5 asks NATs for at least 2 minutes, but
    many keep UDP bindings only 30 s).
    """
    if alive_for is not None:
        return max(1.0, round(0.8 * alive_for, 1))
    if dead_after is not None:
        return max(1.0, round(dead_after / 2, 1))
    return 25.0


ADVICE = {
    Label.OPEN_INTERNET: "Reachable directly; peers can connect to you.",
    Label.FULL_CONE: "Easy NAT: direct connections work with almost any peer.",
    Label.RESTRICTED_CONE: "Hole punching works with all but symmetric peers.",
    Label.PORT_RESTRICTED_CONE: "Hole punching works with cone peers; symmetric peers need "
    "port guessing or the relay.",
    Label.SYMMETRIC: "Hard NAT: direct paths only to easy peers (by port guessing); "
    "expect the relay with other hard NATs.",
    Label.SYMMETRIC_UDP_FIREWALL: "Public address behind a stateful firewall: you can reach "
    "out, peers must punch in.",
    Label.BLOCKED: "No UDP answer from the server: UDP may be blocked; messages will go through the relay.",
    Label.UNKNOWN: "Not enough answers to classify; see the notes.",
}
