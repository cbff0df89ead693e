"""Verdicts from synthetic probe results (RFC 5780 §4.3/§4.4, RFC 3489 labels)."""

from __future__ import annotations

import pytest

from p2pim.nat.classify import (
    Behaviour,
    Label,
    classic_label,
    filtering_behaviour,
    keepalive_for,
    mapping_behaviour,
)

EIM, ADM, APDM, UNK = (
    Behaviour.ENDPOINT_INDEPENDENT,
    Behaviour.ADDRESS_DEPENDENT,
    Behaviour.ADDRESS_AND_PORT_DEPENDENT,
    Behaviour.UNKNOWN,
)
M = ("203.0.113.5", 4000)
M_OTHER = ("203.0.113.5", 4001)
M_THIRD = ("203.0.113.5", 4002)


@pytest.mark.parametrize(
    ("m1", "m2", "m3", "expected"),
    [
        (M, M, M, EIM),
        (M, M, None, EIM),  # test III is not needed once I == II
        (M, M_OTHER, M_OTHER, ADM),
        (M, M_OTHER, M_THIRD, APDM),
        (M, None, None, UNK),
        (M, M_OTHER, None, UNK),
        (None, None, None, UNK),
    ],
)
def test_mapping(m1, m2, m3, expected) -> None:  # type: ignore[no-untyped-def]
    assert mapping_behaviour(m1, m2, m3) is expected


@pytest.mark.parametrize(
    ("both", "port", "expected"),
    [
        (True, True, EIM),
        (True, None, EIM),
        (False, True, ADM),
        (False, False, APDM),
        (None, False, UNK),
        (False, None, UNK),
    ],
)
def test_filtering(both, port, expected) -> None:  # type: ignore[no-untyped-def]
    assert filtering_behaviour(both, port) is expected


@pytest.mark.parametrize(
    ("responded", "nat", "mapping", "filtering", "label"),
    [
        (False, None, UNK, UNK, Label.BLOCKED),
        (True, False, EIM, EIM, Label.OPEN_INTERNET),
        (True, False, EIM, APDM, Label.SYMMETRIC_UDP_FIREWALL),
        (True, False, EIM, ADM, Label.SYMMETRIC_UDP_FIREWALL),
        (True, True, EIM, EIM, Label.FULL_CONE),
        (True, True, EIM, ADM, Label.RESTRICTED_CONE),
        (True, True, EIM, APDM, Label.PORT_RESTRICTED_CONE),
        (True, True, APDM, APDM, Label.SYMMETRIC),
        (True, True, ADM, EIM, Label.SYMMETRIC),  # RFC 3489 calls every non-EIM mapping symmetric
        (True, True, EIM, UNK, Label.UNKNOWN),
        (True, True, UNK, EIM, Label.UNKNOWN),
        (True, False, EIM, UNK, Label.UNKNOWN),
    ],
)
def test_classic_label(responded, nat, mapping, filtering, label) -> None:  # type: ignore[no-untyped-def]
    assert classic_label(responded, nat, mapping, filtering) is label


def test_keepalive() -> None:
    assert keepalive_for(None, None) == 25.0
    assert keepalive_for(30.0, 45.0) == 24.0
    assert keepalive_for(None, 2.0) == 1.0
    assert keepalive_for(120.0, None) == 96.0
