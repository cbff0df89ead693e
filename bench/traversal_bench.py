"""NAT traversal benchmark: direct-path success and time to direct, per router kind.

Runs natlab scenarios (real `rendezvous serve`, two `p2pim chat` processes, real
kernel NATs) ``--runs`` times each, for each router kind:

* ``textbook``: home routers that drop unsolicited UDP at their input;
* ``open+hop``: plain masquerade gateways (no input firewall: their stack answers
  ICMP and conntrack keeps the entry), with a core router between the NATs;
* ``open``: the same routers on one shared segment, no router between them;
* ``portmap PCP`` / ``portmap UPnP``: bob's router runs Debian's miniupnpd;
* ``IPv6``: both hosts also have global IPv6 behind stateful firewalls;
* ``NAT444``: home NATs behind a carrier-grade NAT.

Reports, per scenario and kind, how many runs went direct, the median and worst
time from both online to the first direct path, and whether every message
arrived exactly once. Prints a table; saves JSON to bench/results/traversal.json.
Needs root (natlab).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from natlab.matrix import NAT444, OPEN, TEXTBOOK, Result, Routers, nat444_scenario, run_scenario
from natlab.netns import missing_requirements

OUT = Path(__file__).parent / "results" / "traversal.json"
OPEN_NO_HOP = Routers(input_firewall=False, hop=False)
PAIRS = [
    ("restricted", "port-restricted"),
    ("port-restricted", "port-restricted"),
    ("port-restricted", "symmetric"),
    ("restricted", "symmetric"),
    ("symmetric", "symmetric"),
]


def scenarios() -> list[tuple[str, str, Callable[[int], Result]]]:
    """(scenario, router kind, run(messages)) for every case the README's table shows."""
    out: list[tuple[str, str, Callable[[int], Result]]] = []
    for kind, routers in (("textbook", TEXTBOOK), ("open+hop", OPEN), ("open", OPEN_NO_HOP)):
        for a, b in PAIRS:
            out.append((f"{a} / {b}", kind, partial(_pair, a, b, routers)))
    for kind, routers in (
        ("portmap PCP", Routers(hop=True, portmap="b")),
        ("portmap UPnP", Routers(hop=True, portmap="b", portmap_kind="upnp")),
        ("IPv6", Routers(ipv6=True)),
    ):
        for a, b in (("symmetric", "symmetric"), ("port-restricted", "symmetric")):
            out.append((f"{a} / {b}", kind, partial(_pair, a, b, routers)))
    for name in NAT444:
        out.append((name, "NAT444", partial(_nat444, name)))
    return out


def _pair(a: str, b: str, routers: Routers, messages: int) -> Result:
    return run_scenario(a, b, messages, routers=routers)


def _nat444(name: str, messages: int) -> Result:
    return nat444_scenario(name, messages)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per scenario (default 5)")
    parser.add_argument("--messages", type=int, default=30, help="messages each way per run (0.1 s apart)")
    parser.add_argument("--kinds", help="only these router kinds, comma-separated (default: all)")
    args = parser.parse_args()
    reason = missing_requirements()
    if reason:
        print(f"traversal bench needs natlab: {reason}")
        return 1
    kinds = set(args.kinds.split(",")) if args.kinds else None
    rows = []
    started = time.monotonic()
    print(f"{'scenario':<34} {'routers':<13} {'direct':>7} {'median':>8} {'worst':>7} {'exactly once':>13}")
    for scenario, kind, run in scenarios():
        if kinds is not None and kind not in kinds:
            continue
        results = [run(args.messages) for _ in range(args.runs)]
        times = [r.direct_after_s for r in results if r.direct and r.direct_after_s is not None]
        row = {
            "scenario": scenario,
            "routers": kind,
            "runs": len(results),
            "direct": sum(1 for r in results if r.direct),
            "via_ipv6": sum(1 for r in results if r.direct and r.addr_a.startswith("[")),
            "direct_after_s_median": round(statistics.median(times), 3) if times else None,
            "direct_after_s_max": round(max(times), 3) if times else None,
            "exactly_once": sum(1 for r in results if r.exactly_once and not r.error),
            "errors": [r.error for r in results if r.error],
        }
        rows.append(row)
        med = f"{row['direct_after_s_median']:.2f} s" if times else "-"
        worst = f"{row['direct_after_s_max']:.2f} s" if times else "-"
        print(
            f"{scenario:<34} {kind:<13} {row['direct']:>3}/{row['runs']:<3} {med:>8} {worst:>7} "
            f"{row['exactly_once']:>6}/{row['runs']}",
            flush=True,
        )
    OUT.parent.mkdir(exist_ok=True)
    summary = {"runs": args.runs, "messages": args.messages, "seconds": round(time.monotonic() - started)}
    OUT.write_text(json.dumps({**summary, "rows": rows}, indent=2))
    print(f"saved {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
