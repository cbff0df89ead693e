"""Direct-path benchmark.

Part 1 (root, natlab): runs `natlab matrix` and reports, per NAT pair, the
time to the first delivered message (target: one relay round trip, no wait
for punching) and the time until the path went direct (target: under 1 s for
endpoint-independent pairs).

Part 2 (loopback, no root): two real clients with a direct path; disco RTT
over the direct path vs the relay, and messages/s sent direct with every
delivered receipt awaited.

Prints a table and saves JSON to bench/results/paths.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from natlab.netns import missing_requirements
from p2pim.client import Client, Receipt
from p2pim.profile import Profile
from tests.conftest import RendezvousProcess, free_udp_ports

OUT = Path(__file__).parent / "results" / "paths.json"
EIM = {"none", "full-cone", "restricted", "port-restricted"}


def matrix_part(messages: int) -> dict[str, object]:
    from natlab.matrix import run_matrix

    results = run_matrix(messages=messages)
    rows = [r.as_dict() for r in results]
    firsts = [r.first_message_s for r in results if r.first_message_s is not None]
    eim_direct = [
        r.direct_after_s for r in results if {r.a, r.b} <= EIM | {"same-lan"} and r.direct_after_s is not None
    ]
    print(f"{'pair':<34} {'path':<7} {'first msg':>10} {'direct after':>12}")
    for r in results:
        first = f"{r.first_message_s * 1000:.1f} ms" if r.first_message_s is not None else "-"
        direct = f"{r.direct_after_s:.3f} s" if r.direct_after_s is not None else "-"
        print(f"{r.name:<34} {'direct' if r.direct else 'relay':<7} {first:>10} {direct:>12}")
    summary = {
        "first_message_ms_max": round(max(firsts) * 1000, 2) if firsts else None,
        "first_message_ms_median": round(statistics.median(firsts) * 1000, 2) if firsts else None,
        "direct_after_s_max_eim": max(eim_direct) if eim_direct else None,
        "direct_after_s_median_eim": statistics.median(eim_direct) if eim_direct else None,
    }
    print(json.dumps(summary))
    return {"scenarios": rows, **summary}


async def loopback_part(probes: int, messages: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        stun, alt = free_udp_ports(2)
        srv = RendezvousProcess(
            Path(tmp) / "s.db",
            ("--stun-ip", "127.0.0.1", "--stun-port", str(stun), "--stun-alt-port", str(alt)),
        )
        try:
            clients = []
            for name in ("alice", "bob"):
                c = Client(srv.url, Profile(name, Path(tmp) / "p"))
                await c.connect()
                await c.register(name, "bench-password")
                await c.login(name, "bench-password")
                clients.append(c)
            a, b = clients
            await a.buddy_add("bob")
            await b.buddy_accept("alice")
            await a.buddies()
            for _ in range(100):
                if a.path_to("bob")[0] == "direct" and b.path_to("alice")[0] == "direct":
                    break
                await asyncio.sleep(0.05)
            assert a.paths is not None
            direct = [rtt for _, rtt in [await a.paths.probe("bob") for _ in range(probes)] if rtt]
            path = a.paths.route("bob")
            a.paths.peers["bob"].path = None  # probe the relay for comparison
            relay = [rtt for _, rtt in [await a.paths.probe("bob") for _ in range(probes)] if rtt]
            a.paths.peers["bob"].path = path
            receipts: asyncio.Queue[bytes] = asyncio.Queue()

            async def pump() -> None:
                async for ev in a.events():
                    if isinstance(ev, Receipt) and ev.kind == "delivered":
                        for m in ev.msg_ids:
                            receipts.put_nowait(m)

            reader = asyncio.create_task(pump())
            # Latency: one message at a time, send() to the delivered receipt (both sides
            # commit to SQLite on the way: this is what a user waits for).
            latency = []
            for i in range(200):
                t = time.perf_counter()
                mid = await a.send("bob", f"latency {i}")
                while await receipts.get() != mid:
                    pass
                latency.append(time.perf_counter() - t)
            # Throughput: at most WINDOW messages unacknowledged.
            window, sent, done = 64, 0, 0
            start = time.perf_counter()
            while done < messages:
                while sent < messages and sent - done < window:
                    await a.send("bob", f"bench {sent}")
                    sent += 1
                await receipts.get()
                done += 1
            elapsed = time.perf_counter() - start
            reader.cancel()
            out = {
                "direct_rtt_ms_p50": round(statistics.median(direct) * 1000, 3),
                "direct_rtt_ms_p99": round(sorted(direct)[int(len(direct) * 0.99) - 1] * 1000, 3),
                "relay_rtt_ms_p50": round(statistics.median(relay) * 1000, 3),
                "relay_rtt_ms_p99": round(sorted(relay)[int(len(relay) * 0.99) - 1] * 1000, 3),
                "message_to_receipt_ms_p50": round(statistics.median(latency) * 1000, 2),
                "message_to_receipt_ms_p99": round(sorted(latency)[int(len(latency) * 0.99) - 1] * 1000, 2),
                "messages": messages,
                "window": window,
                "messages_per_s_direct_acknowledged": round(messages / elapsed, 1),
                "sent_direct": a.counters["sent_direct"],
                "sent_relay": a.counters["sent_relay"],
            }
            for c in clients:
                await c.close()
        finally:
            srv.stop()
    print(json.dumps(out))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100, help="matrix messages each way")
    parser.add_argument("--no-lab", action="store_true", help="skip the natlab part")
    parser.add_argument("--keep-matrix", action="store_true", help="reuse the matrix part of the last run")
    args = parser.parse_args()
    results: dict[str, object] = {}
    reason = missing_requirements()
    if args.keep_matrix and OUT.exists():
        results["matrix"] = json.loads(OUT.read_text())["matrix"]
    elif args.no_lab or reason:
        print(f"natlab part skipped: {reason or '--no-lab'}")
    else:
        results["matrix"] = matrix_part(args.messages)
    results["loopback"] = asyncio.run(loopback_part(500, 2000))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    print(f"saved {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
