"""The wire schema: generated code is current, and NatReport crosses it intact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from p2pim.nat.classify import Behaviour, Label
from p2pim.nat.report import LifetimeResult, NatReport
from p2pim.nat.wire import behaviour_from_proto, to_proto
from p2pim.wire import nat_pb2

ROOT = Path(__file__).resolve().parents[2]
WIRE = ROOT / "p2pim" / "wire"


def test_generated_code_is_current(tmp_path: Path) -> None:
    plugin = Path(sys.executable).parent / "protoc-gen-mypy"
    protos = sorted(WIRE.glob("*.proto"))
    assert {p.name for p in protos} >= {"nat.proto", "control.proto", "envelope.proto"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"--python_out={tmp_path}",
            f"--plugin=protoc-gen-mypy={plugin}",
            f"--mypy_out={tmp_path}",
            *(str(p.relative_to(ROOT)) for p in protos),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    for proto in protos:
        for name in (proto.stem + "_pb2.py", proto.stem + "_pb2.pyi"):
            fresh = tmp_path / "p2pim" / "wire" / name
            assert fresh.read_text() == (WIRE / name).read_text(), f"{name} is stale: run `make proto`"


def test_report_round_trip() -> None:
    rep = NatReport(
        server=("203.0.113.10", 3478),
        server_kind="rfc5780",
        mapped=("203.0.113.101", 4000),
        nat_present=True,
        mapping=Behaviour.ENDPOINT_INDEPENDENT,
        filtering=Behaviour.ADDRESS_AND_PORT_DEPENDENT,
        port_preserved=True,
        hairpin=None,
        label=Label.PORT_RESTRICTED_CONE,
        lifetime=LifetimeResult(alive_for=30.0, dead_after=45.0, keepalive=24.0, tested_up_to=120.0),
    )
    msg = nat_pb2.NatBehaviour.FromString(to_proto(rep).SerializeToString())
    back = behaviour_from_proto(msg)
    assert back == {
        "mapped": ("203.0.113.101", 4000),
        "nat_present": True,
        "mapping": Behaviour.ENDPOINT_INDEPENDENT,
        "filtering": Behaviour.ADDRESS_AND_PORT_DEPENDENT,
        "port_preserved": True,
        "hairpin": None,
        "label": "port-restricted cone",
        "keepalive_s": 24,
    }
    assert msg.binding_lifetime_s == 30


def test_unknown_enum_values_from_newer_peers_read_as_unknown() -> None:
    msg = nat_pb2.NatBehaviour.FromString(bytes([0x18, 0x09]))  # mapping = 9, not in our enum
    assert behaviour_from_proto(msg)["mapping"] is Behaviour.UNKNOWN
