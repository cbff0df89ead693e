"""Wall time and correctness of `p2pim nat` vs pystun3 behind each natlab NAT profile.

Both run as a user would (whole process, Python start-up included) inside the
host namespace, against our `rendezvous stun` in the public segment, one at a
time so they do not compete for the two cores. Median of N runs per profile.
Needs root (natlab). Prints a table and saves JSON to bench/results/nat.json.

    python bench/nat_bench.py [--runs 5] [--profiles none,full-cone,...]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from natlab.classify import STUN_IP, STUN_PORT, stun_server, tool  # noqa: E402
from natlab.profiles import PROFILES, NatProfile  # noqa: E402
from natlab.topology import standard  # noqa: E402

PYSTUN3_LABELS = {
    "none": "Open Internet",
    "full-cone": "Full Cone",
    "restricted": "Restric NAT",
    "port-restricted": "Restric Port NAT",
    "symmetric": "Symmetric NAT",
}
TARGET_SPEEDUP = 15.0


def timed(topo, host: str, argv: list[str]) -> tuple[float, str, int]:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    proc = topo.run(host, argv, timeout=120)
    return time.monotonic() - t0, proc.stdout, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "nat.json"))
    args = ap.parse_args()
    kinds = args.profiles.split(",")
    profiles = [NatProfile(k) for k in kinds]
    rows = []
    with standard(None, profiles) as topo, stun_server(topo):
        for i, prof in enumerate(profiles, 1):
            host = f"h{i}"
            host_ip = topo.nodes[host].ip
            expected = prof.expected()
            ours, theirs = [], []
            for _ in range(args.runs):
                secs, out, code = timed(
                    topo, host, [tool("p2pim"), "nat", "--json", "--server", f"{STUN_IP}"]
                )
                rep = json.loads(out) if out.strip() else {}
                ok = code == 0 and all(rep.get(k) == v for k, v in expected.items())
                ours.append({"seconds": secs, "ok": ok, "label": rep.get("label")})
                port = str(random.randint(20000, 60000))
                argv = [tool("pystun3"), "-H", STUN_IP, "-P", str(STUN_PORT), "-i", host_ip, "-p", port]
                secs, out, code = timed(topo, host, argv)
                label = next(
                    (ln.split(": ", 1)[1] for ln in out.splitlines() if ln.startswith("NAT Type")), None
                )
                theirs.append({"seconds": secs, "ok": label == PYSTUN3_LABELS[prof.kind], "label": label})
            row = {
                "profile": prof.kind,
                "p2pim_median_s": statistics.median(r["seconds"] for r in ours),
                "p2pim_right": sum(r["ok"] for r in ours),
                "p2pim_labels": sorted({str(r["label"]) for r in ours}),
                "pystun3_median_s": statistics.median(r["seconds"] for r in theirs),
                "pystun3_right": sum(r["ok"] for r in theirs),
                "pystun3_labels": sorted({str(r["label"]) for r in theirs}),
                "runs": args.runs,
            }
            row["speedup"] = row["pystun3_median_s"] / row["p2pim_median_s"]
            rows.append(row)
            print(f"  {prof.kind}: done", file=sys.stderr, flush=True)

    total_ours = sum(r["p2pim_median_s"] for r in rows)
    total_theirs = sum(r["pystun3_median_s"] for r in rows)
    summary = {
        "p2pim_total_s": total_ours,
        "pystun3_total_s": total_theirs,
        "speedup_total": total_theirs / total_ours,
        "p2pim_all_right": all(r["p2pim_right"] == r["runs"] for r in rows),
        "pystun3_all_right": all(r["pystun3_right"] == r["runs"] for r in rows),
        "target_speedup": TARGET_SPEEDUP,
    }
    print(f"\n{'profile':<16} {'p2pim nat':>10} {'right':>6} {'pystun3':>10} {'right':>6} {'speedup':>8}")
    for r in rows:
        print(
            f"{r['profile']:<16} {r['p2pim_median_s']:>9.2f}s {r['p2pim_right']:>3}/{r['runs']:<2}"
            f" {r['pystun3_median_s']:>9.2f}s {r['pystun3_right']:>3}/{r['runs']:<2} {r['speedup']:>7.1f}x"
        )
    print(
        f"{'all profiles':<16} {total_ours:>9.2f}s {'':>6} {total_theirs:>9.2f}s {'':>6} "
        f"{summary['speedup_total']:>7.1f}x  (target {TARGET_SPEEDUP:g}x)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "when": time.strftime("%F %T"),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
