"""NatReport <-> the wire schema's NatBehaviour (endpoint publication to the rendezvous).

Only what a buddy needs to plan hole punching crosses the wire: no local
addresses (those travel as host candidates, separately, by choice of the user).
"""

from __future__ import annotations

from p2pim.wire import nat_pb2

from .classify import Behaviour
from .report import NatReport

_BEHAVIOUR = {
    Behaviour.UNKNOWN: nat_pb2.BEHAVIOUR_UNKNOWN,
    Behaviour.ENDPOINT_INDEPENDENT: nat_pb2.ENDPOINT_INDEPENDENT,
    Behaviour.ADDRESS_DEPENDENT: nat_pb2.ADDRESS_DEPENDENT,
    Behaviour.ADDRESS_AND_PORT_DEPENDENT: nat_pb2.ADDRESS_AND_PORT_DEPENDENT,
}
_BEHAVIOUR_BACK = {v: k for k, v in _BEHAVIOUR.items()}


def _tri(v: bool | None) -> nat_pb2.Tristate.ValueType:
    return nat_pb2.TRISTATE_UNKNOWN if v is None else (nat_pb2.YES if v else nat_pb2.NO)


def _untri(v: nat_pb2.Tristate.ValueType) -> bool | None:
    return None if v == nat_pb2.TRISTATE_UNKNOWN else v == nat_pb2.YES


def to_proto(report: NatReport) -> nat_pb2.NatBehaviour:
    msg = nat_pb2.NatBehaviour(
        nat_present=bool(report.nat_present),
        mapping=_BEHAVIOUR[report.mapping],
        filtering=_BEHAVIOUR[report.filtering],
        port_preserved=_tri(report.port_preserved),
        hairpin=_tri(report.hairpin),
        label=report.label.value,
    )
    if report.mapped:
        msg.mapped.ip, msg.mapped.port = report.mapped
    if report.lifetime:
        msg.binding_lifetime_s = int(report.lifetime.alive_for or 0)
        msg.keepalive_s = int(report.lifetime.keepalive)
    return msg


def behaviour_from_proto(msg: nat_pb2.NatBehaviour) -> dict[str, object]:
    """The fields a path planner needs, in the report's own types."""
    return {
        "mapped": (msg.mapped.ip, msg.mapped.port) if msg.HasField("mapped") else None,
        "nat_present": msg.nat_present,
        "mapping": _BEHAVIOUR_BACK.get(msg.mapping, Behaviour.UNKNOWN),
        "filtering": _BEHAVIOUR_BACK.get(msg.filtering, Behaviour.UNKNOWN),
        "port_preserved": _untri(msg.port_preserved),
        "hairpin": _untri(msg.hairpin),
        "label": msg.label,
        "keepalive_s": msg.keepalive_s or None,
    }
