"""NAT traversal benchmark: direct-path success and time to direct, per router kind.

Runs natlab scenarios (real `rendezvous serve`, two `p2pim chat` processes, real
kernel NATs) ``--runs`` times each, for each router kind:

* ``textbook``: home routers that drop unsolicited UDP at their input;
* ``open+hop``: plain masquerade gateways (no input firewall: their stack answers
  ICMP and conntrack keeps the entry), with a core router between the NATs;
* ``open``: the same routers on one shared segment, no router between them.

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from natlab.matrix import OPEN, TEXTBOOK, Routers, run_scenario
from natlab.netns import missing_requirements

OUT = Path(__file__).parent / "results" / "traversal.json"
KINDS = {"textbook": TEXTBOOK, "open+hop": OPEN, "open": Routers(input_firewall=False, hop=False)}
PAIRS = [
    ("restricted", "port-restricted"),
    ("port-restricted", "port-restricted"),
    ("port-restricted", "symmetric"),
    ("restricted", "symmetric"),
    ("symmetric", "symmetric"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per scenario and router kind")
    parser.add_argument("--messages", type=int, default=40, help="messages each way per run (0.1 s apart)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="router kinds (default: %(default)s)")
    args = parser.parse_args()
    reason = missing_requirements()
    if reason:
        print(f"traversal bench needs natlab: {reason}")
        return 1
    rows = []
    started = time.monotonic()
    print(f"{'scenario':<34} {'routers':<9} {'direct':>7} {'median':>8} {'worst':>7} {'exactly once':>13}")
    for kind in args.kinds.split(","):
        routers = KINDS[kind]
        for a, b in PAIRS:
            results = [run_scenario(a, b, args.messages, routers=routers) for _ in range(args.runs)]
            times = [r.direct_after_s for r in results if r.direct and r.direct_after_s is not None]
            row = {
                "scenario": f"{a} / {b}",
                "routers": kind,
                "runs": len(results),
                "direct": sum(1 for r in results if r.direct),
                "direct_after_s_median": round(statistics.median(times), 3) if times else None,
                "direct_after_s_max": round(max(times), 3) if times else None,
                "exactly_once": sum(1 for r in results if r.exactly_once and not r.error),
                "errors": [r.error for r in results if r.error],
            }
            rows.append(row)
            med = f"{row['direct_after_s_median']:.2f} s" if times else "-"
            worst = f"{row['direct_after_s_max']:.2f} s" if times else "-"
            print(
                f"{row['scenario']:<34} {kind:<9} {row['direct']:>3}/{row['runs']:<3} {med:>8} {worst:>7} "
                f"{row['exactly_once']:>6}/{row['runs']}",
                flush=True,
            )
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "runs": args.runs,
                "messages": args.messages,
                "seconds": round(time.monotonic() - started),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"saved {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
