"""File transfer benchmark: MB/s through real NATs, p2pim against bare qh3 and plain TCP.

In natlab (root), each run on fresh namespaces, alternated so the machine's noise
falls on all of them alike:

* ``p2pim direct``: `p2pim send-file` (alice, port-restricted NAT) to `p2pim listen
  --auto-accept` (bob, full-cone NAT): QUIC on the punched path, with everything p2pim
  does (read, chunk hashes, frames, .part writes, fsync every 256 KiB, the final hash);
* ``p2pim relay``: the same between two symmetric NATs (no direct path), through
  `rendezvous serve` with its per-user limit lifted (``--relay-kbps`` very high), so the
  relay itself is measured, not the operator's limit;
* ``bare qh3``: qh3 alone (same datagram size, an Ed25519 certificate) from alice's host
  through her NAT to a server on the public segment: the QUIC library's ceiling here;
* ``plain TCP``: the same with a TCP socket.

Reports the median MB/s of ``--runs`` runs and the ratio to bare qh3 (goal: direct at
least 80% of it). Saves JSON to bench/results/files.json. Time is from bob's accept (or
the reference's first byte) to the whole file there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from natlab.matrix import STUN_IP, new_prefix, profile
from natlab.netns import missing_requirements
from natlab.topology import standard
from natlab.transfer import run_transfer

OUT = Path(__file__).parent / "results" / "files.json"
PEER = Path(__file__).with_name("copy_peer.py")
PORT = 45678


def reference(kind: str, size: int) -> float | None:
    """Seconds for ``size`` bytes from alice's host to the public segment (``quic`` or ``tcp``)."""
    topo = standard(new_prefix(), [profile("port-restricted"), profile("full-cone", side="b")])
    server = None
    try:
        server = topo.popen(
            "rdv", [sys.executable, str(PEER), f"{kind}-server", str(PORT), str(size)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            return None
        out = subprocess.run(
            topo.cmd("h1", [sys.executable, str(PEER), f"{kind}-client", STUN_IP, str(PORT), str(size)]),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(5)
        topo.down()


def p2pim(kind: str, size: int) -> tuple[float | None, dict[str, object]]:
    if kind == "direct":
        r = run_transfer("port-restricted", "full-cone", size=size)
    else:
        r = run_transfer("symmetric", "symmetric", size=size, server_args=("--relay-kbps", "100000000"))
    ok = r.arrived and not r.error
    return (r.seconds if ok else None), {"direct_bytes": r.direct_bytes, "error": r.error, "path": r.path}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--mib", type=int, default=256, help="file size in MiB (default 256)")
    args = parser.parse_args()
    reason = missing_requirements()
    if reason:
        print(f"files bench needs natlab: {reason}")
        return 1
    size = args.mib * 1024 * 1024
    kinds = ["p2pim direct", "p2pim relay", "bare qh3", "plain TCP"]
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    notes: dict[str, list[dict[str, object]]] = {k: [] for k in kinds}
    started = time.monotonic()
    for run in range(args.runs):
        for kind in kinds:
            if kind.startswith("p2pim"):
                took, note = p2pim(kind.split()[1], size)
                notes[kind].append(note)
            else:
                took = reference("quic" if "qh3" in kind else "tcp", size)
            if took is not None:
                seconds[kind].append(took)
            print(f"run {run + 1} {kind:<13} {took if took is not None else 'failed'} s", flush=True)
    rows = []
    base = statistics.median(seconds["bare qh3"]) if seconds["bare qh3"] else None
    print(f"\n{args.mib} MiB, median of {args.runs}")
    print(f"{'':<14} {'MB/s':>8} {'vs bare qh3':>12} {'runs':>5}")
    for kind in kinds:
        times = seconds[kind]
        med = statistics.median(times) if times else None
        mbs = round(size / med / 1e6, 1) if med else None
        ratio = round(base / med, 2) if med and base else None
        rows.append({"kind": kind, "mb_s": mbs, "vs_bare_qh3": ratio, "seconds": times, "notes": notes[kind]})
        print(
            f"{kind:<14} {mbs if mbs else '-':>8} {ratio if ratio else '-':>12} {len(times):>3}/{args.runs}"
        )
    OUT.parent.mkdir(exist_ok=True)
    summary = {"mib": args.mib, "runs": args.runs, "seconds": round(time.monotonic() - started)}
    OUT.write_text(json.dumps({**summary, "rows": rows}, indent=2))
    print(f"saved {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
