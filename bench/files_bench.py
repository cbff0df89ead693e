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
least 80% of it), and each side's CPU per MiB (user + system, from /proc for p2pim's
clients, the process's own clock for the references). Time is from bob's accept (or
the reference's first byte) to the whole file there.

Other people's chats while the relay carries a file: a probe (``chat_probe.py``, a
process of its own on the server's segment) relays 200 messages/s between 4 other buddy
pairs through the same `rendezvous serve`, for 5 s before the transfer and for 5 s while
a relayed (symmetric/symmetric) file moves at full speed; p50/p99 of both, side by side.

Then resuming: a direct transfer of ``--resume-mib`` whose receiver (then, in another
run, whose sender) is killed with SIGKILL halfway and started again: the time from the
restart until bob has more than before the kill, and the bytes that went twice.

Saves JSON to bench/results/files.json.
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

from natlab.matrix import CONTROL_PORT, STUN_IP, new_prefix, profile
from natlab.netns import missing_requirements
from natlab.topology import Topology, standard
from natlab.transfer import run_transfer

OUT = Path(__file__).parent / "results" / "files.json"
PEER = Path(__file__).with_name("copy_peer.py")
PROBE = Path(__file__).with_name("chat_probe.py")
PROBE_S = 5
PORT = 45678


Measured = tuple[float, float | None, float | None]  # seconds, sender CPU s, receiver CPU s


def reference(kind: str, size: int) -> Measured | None:
    """``size`` bytes from alice's host to the public segment (``quic`` or ``tcp``)."""
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
        if out.returncode != 0:
            return None
        seconds, cpu = (float(x) for x in out.stdout.split()[-2:])
        server.wait(10)
        said = server.stdout.read().split()
        return seconds, cpu, float(said[said.index("cpu") + 1]) if "cpu" in said else None
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(5)
        topo.down()


def p2pim(kind: str, size: int) -> tuple[Measured | None, dict[str, object]]:
    if kind == "direct":
        r = run_transfer("port-restricted", "full-cone", size=size)
    else:
        r = run_transfer("symmetric", "symmetric", size=size, server_args=("--relay-kbps", "100000000"))
    ok = r.arrived and not r.error and r.seconds is not None
    note = {"direct_bytes": r.direct_bytes, "error": r.error, "path": r.path}
    return ((r.seconds, r.cpu_sender_s, r.cpu_receiver_s) if ok and r.seconds else None), note


def resume(who: str, size: int) -> dict[str, object]:
    """A direct transfer whose ``who`` ("receiver" or "sender") is killed halfway."""
    r = run_transfer(
        "port-restricted", "full-cone", size=size, at=(0.5,), during=lambda topo, frac: f"kill-{who}"
    )
    return {
        "killed": who, "arrived": r.arrived, "error": r.error, "seconds": r.seconds,
        "resume_s": r.resume_seconds[0] if r.resume_seconds else None,
        "resent_sender": r.resent_sender, "resent_receiver": r.resent_receiver,
    }  # fmt: skip


def others_during_relay(size: int) -> dict[str, object]:
    """Other pairs' relayed chat latency on the same server: idle, then during a relayed file."""
    phases: dict[str, object] = {}
    probe: list[subprocess.Popen[str]] = []

    def ask(phase: str) -> None:
        assert probe[0].stdin is not None and probe[0].stdout is not None
        probe[0].stdin.write(f"{phase} {PROBE_S}\n")
        probe[0].stdin.flush()
        phases[phase] = json.loads(probe[0].stdout.readline())

    def before(topo: Topology) -> None:
        url = f"ws://{STUN_IP}:{CONTROL_PORT}"
        probe.append(topo.popen("rdv", [sys.executable, str(PROBE), url], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE))  # fmt: skip
        assert probe[0].stdout is not None
        if probe[0].stdout.readline().strip() != "ready":
            raise RuntimeError("the chat probe did not start")
        ask("idle")

    def during(topo: Topology, fraction: float) -> None:
        ask("transfer")

    try:
        r = run_transfer(
            "symmetric", "symmetric", size=size, at=(0.05,), during=during, before=before,
            server_args=("--relay-kbps", "100000000"),
        )  # fmt: skip
    finally:
        for p in probe:
            p.kill()
            p.wait(5)
    return {"arrived": r.arrived, "error": r.error, "mb_s": r.mb_s, "path": r.path, **phases}


def per_mib(cpu: list[float | None], mib: int) -> float | None:
    """Median CPU milliseconds per MiB."""
    known = [c for c in cpu if c is not None]
    return round(statistics.median(known) * 1000 / mib, 1) if known else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--mib", type=int, default=256, help="file size in MiB (default 256)")
    parser.add_argument("--resume-mib", type=int, default=64, help="file killed halfway, MiB (64)")
    args = parser.parse_args()
    reason = missing_requirements()
    if reason:
        print(f"files bench needs natlab: {reason}")
        return 1
    size = args.mib * 1024 * 1024
    kinds = ["p2pim direct", "p2pim relay", "bare qh3", "plain TCP"]
    measured: dict[str, list[Measured]] = {k: [] for k in kinds}
    notes: dict[str, list[dict[str, object]]] = {k: [] for k in kinds}
    resumes: list[dict[str, object]] = []
    others: list[dict[str, object]] = []
    started = time.monotonic()
    for run in range(args.runs):
        for kind in kinds:
            if kind.startswith("p2pim"):
                took, note = p2pim(kind.split()[1], size)
                notes[kind].append(note)
            else:
                took = reference("quic" if "qh3" in kind else "tcp", size)
            if took is not None:
                measured[kind].append(took)
            print(f"run {run + 1} {kind:<13} {took if took is not None else 'failed'}", flush=True)
        for who in ("receiver", "sender"):
            resumes.append(resume(who, args.resume_mib * 1024 * 1024))
            print(f"run {run + 1} kill -9 {who}: {resumes[-1]}", flush=True)
        others.append(others_during_relay(size))
        print(f"run {run + 1} other chats: {others[-1]}", flush=True)
    rows = []
    base = statistics.median(m[0] for m in measured["bare qh3"]) if measured["bare qh3"] else None
    print(f"\n{args.mib} MiB, median of {args.runs}")
    print(f"{'':<14} {'MB/s':>8} {'vs bare qh3':>12} {'CPU ms/MiB send':>16} {'recv':>6} {'runs':>5}")
    for kind in kinds:
        times = [m[0] for m in measured[kind]]
        med = statistics.median(times) if times else None
        mbs = round(size / med / 1e6, 1) if med else None
        ratio = round(base / med, 2) if med and base else None
        send_cpu = per_mib([m[1] for m in measured[kind]], args.mib)
        recv_cpu = per_mib([m[2] for m in measured[kind]], args.mib)
        rows.append({
            "kind": kind, "mb_s": mbs, "vs_bare_qh3": ratio, "seconds": times,
            "cpu_ms_per_mib_sender": send_cpu, "cpu_ms_per_mib_receiver": recv_cpu,
            "cpu_s": [m[1:] for m in measured[kind]], "notes": notes[kind],
        })  # fmt: skip
        print(
            f"{kind:<14} {mbs if mbs else '-':>8} {ratio if ratio else '-':>12} "
            f"{send_cpu if send_cpu is not None else '-':>16} {recv_cpu if recv_cpu is not None else '-':>6} "
            f"{len(times):>3}/{args.runs}"
        )
    print(f"\nkill -9 halfway through {args.resume_mib} MiB (direct), median of {args.runs}")
    resume_rows = []
    for who in ("receiver", "sender"):
        runs = [r for r in resumes if r["killed"] == who]
        took = [float(r["resume_s"]) for r in runs if r["arrived"] and r["resume_s"] is not None]  # type: ignore[arg-type]
        twice = [max(int(r["resent_sender"]), int(r["resent_receiver"])) for r in runs if r["arrived"]]  # type: ignore[call-overload]
        row = {
            "killed": who, "arrived": sum(bool(r["arrived"]) for r in runs), "runs": len(runs),
            "resume_s": statistics.median(took) if took else None,
            "resent_mib": round(statistics.median(twice) / 2**20, 2) if twice else None, "each": runs,
        }  # fmt: skip
        resume_rows.append(row)
        print(
            f"  {who:<9} whole {row['arrived']}/{row['runs']}, moving again {row['resume_s']} s after the "
            f"restart, {row['resent_mib']} MiB sent twice"
        )
    print(f"\nother chats through the same server (200 msg/s, 4 pairs, {PROBE_S} s each), median of runs")
    chats = {}
    for phase in ("idle", "transfer"):
        got = [o[phase] for o in others if isinstance(o.get(phase), dict)]
        chats[phase] = {
            q: statistics.median(g[q] for g in got if g[q] is not None) if got else None  # type: ignore[index]
            for q in ("p50_ms", "p99_ms", "max_ms")
        }
        lost = sum(int(g["sent"]) - int(g["received"]) for g in got)  # type: ignore[index]
        chats[phase]["lost"] = lost
        print(f"  {phase:<9} p50 {chats[phase]['p50_ms']} ms, p99 {chats[phase]['p99_ms']} ms, "
              f"max {chats[phase]['max_ms']} ms, lost {lost}")  # fmt: skip
    OUT.parent.mkdir(exist_ok=True)
    summary = {"mib": args.mib, "runs": args.runs, "seconds": round(time.monotonic() - started)}
    result = {**summary, "rows": rows, "resume": resume_rows, "other_chats": chats, "other_runs": others}
    OUT.write_text(json.dumps(result, indent=2))
    print(f"saved {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
