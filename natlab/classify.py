"""`natlab classify`: behind each NAT profile, run `p2pim nat` against the
rendezvous STUN service and compare what it reports with what the NAT is.

natlab imports neither p2pim nor rendezvous: it runs their commands inside the
namespaces exactly as a user would, and reads `p2pim nat --json`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .netns import LabError
from .profiles import NatProfile
from .topology import Topology, standard

STUN_IP, STUN_ALT_IP = "203.0.113.10", "203.0.113.11"
STUN_PORT = 3478
FIELDS = ("label", "mapping", "filtering", "nat_present", "port_preserved", "hairpin")


def tool(name: str) -> str:
    """The console script ``name``: beside this Python first (a venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise LabError(f"`{name}` is not installed (pip install -e .)")
    return found


@contextmanager
def stun_server(
    topo: Topology, node: str = "rdv", extra: Sequence[str] = ()
) -> Iterator[subprocess.Popen[str]]:
    """`rendezvous stun` on both of ``node``'s addresses, until the block ends."""
    n = topo.nodes[node]
    argv = [tool("rendezvous"), "stun", "--ip", n.addresses[0], "--port", str(STUN_PORT)]
    if len(n.addresses) > 1:
        argv += ["--alt-ip", n.addresses[1]]
    proc = topo.popen(node, [*argv, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        if "STUN on" not in banner:
            proc.kill()
            raise LabError(f"rendezvous stun did not start: {banner.strip()}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Row:
    """One profile: what was expected, what `p2pim nat` said, and the verdict."""

    host: str
    profile: NatProfile
    expected: dict[str, object]
    observed: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0
    exit_code: int | None = None
    error: str | None = None

    @property
    def mismatches(self) -> list[str]:
        if self.error:
            return ["error"]
        return [k for k, v in self.expected.items() if self.observed.get(k) != v]

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def as_dict(self) -> dict[str, object]:
        return {
            "host": self.host,
            "profile": self.profile.as_dict(),
            "expected": self.expected,
            "observed": {k: self.observed.get(k) for k in FIELDS},
            "mapped": self.observed.get("mapped"),
            "seconds": round(self.seconds, 3),
            "exit_code": self.exit_code,
            "error": self.error,
            "ok": self.ok,
        }


def run_nat(topo: Topology, hosts: Sequence[str], extra: Sequence[str] = ()) -> dict[str, tuple]:
    """`p2pim nat --json` on each host at once; host -> (exit, json or None, seconds, stderr)."""
    argv = [tool("p2pim"), "nat", "--json", "--server", f"{STUN_IP}:{STUN_PORT}", *extra]
    started = {}
    for h in hosts:
        started[h] = (time.monotonic(), topo.popen(h, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out: dict[str, tuple] = {}
    for h, (t0, proc) in started.items():
        stdout, stderr = proc.communicate(timeout=900)
        secs = time.monotonic() - t0
        try:
            parsed = json.loads(stdout)
        except ValueError:
            parsed = None
        out[h] = (proc.returncode, parsed, secs, stderr.strip())
    return out


def classify(profiles: Sequence[NatProfile], prefix: str | None = None) -> list[Row]:
    """Build the standard topology, run `p2pim nat` behind every profile, tear down."""
    with standard(prefix, profiles) as topo, stun_server(topo):
        hosts = [f"h{i}" for i in range(1, len(profiles) + 1)]
        results = run_nat(topo, hosts)
        rows = []
        for host, prof in zip(hosts, profiles, strict=True):
            code, parsed, secs, stderr = results[host]
            row = Row(host, prof, prof.expected(), seconds=secs, exit_code=code)
            if parsed is None:
                row.error = stderr or f"exit {code}, no JSON"
            else:
                row.observed = parsed
            rows.append(row)
        return rows


def render(rows: Sequence[Row]) -> str:
    """Expected vs observed, one line per profile and field that matters."""

    def show(v: object) -> str:
        return "-" if v is None else ("yes" if v is True else "no" if v is False else str(v))

    lines = [f"{'profile':<26} {'field':<15} {'expected':<27} {'observed':<27} ok"]
    for r in rows:
        name = (
            r.profile.kind
            + (" +hairpin" if r.profile.hairpin else "")
            + (" +block" if r.profile.block_udp else "")
        )
        if r.error:
            lines.append(f"{name:<26} {'-':<15} {'-':<27} {'ERROR: ' + r.error[:60]}")
            continue
        for i, (k, v) in enumerate(r.expected.items()):
            o = r.observed.get(k)
            mark = "ok" if o == v else "MISMATCH"
            lines.append(f"{name if i == 0 else '':<26} {k:<15} {show(v):<27} {show(o):<27} {mark}")
        lines.append(f"{'':<26} {'time':<15} {'':<27} {r.seconds:.2f} s")
    good = sum(r.ok for r in rows)
    lines.append(f"\n{good}/{len(rows)} profiles classified correctly")
    return "\n".join(lines)
