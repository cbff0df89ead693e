"""LAN mode benchmark (root, natlab): discovery time and message latency on one LAN.

Two hosts on one natlab LAN bridge run `p2pim lan --json`. Discovery: bob
starts (five times, as a new process each time) and we time from his "ready"
to alice's "bob is here". Latency: alice sends 100 messages one at a time;
each is timed from the line written to alice's stdin to bob printing it
(both clocks are this machine's). Prints a table and saves JSON to
bench/results/lan.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from natlab.classify import tool
from natlab.matrix import JsonProcess
from natlab.netns import missing_requirements
from natlab.profiles import NatProfile
from natlab.topology import Topology, new_prefix

OUT = Path(__file__).parent / "results" / "lan.json"


def main() -> int:
    reason = missing_requirements()
    if reason:
        print(f"lan bench skipped: {reason}")
        return 0
    topo = Topology(new_prefix())
    tmp = tempfile.mkdtemp(prefix="p2pim-lan-bench-")
    procs: list[JsonProcess] = []

    def start(node: str, name: str) -> JsonProcess:
        env = {**os.environ, "XDG_DATA_HOME": f"{tmp}/{name}"}
        argv = [tool("p2pim"), "lan", "--json", "--name", name, "--no-ipmsg", "--linger", "2"]
        proc = JsonProcess(topo, node, argv, env)
        procs.append(proc)
        if proc.wait(lambda e: e.get("event") == "ready", 15) is None:
            raise RuntimeError(f"p2pim lan did not start on {node}")
        return proc

    try:
        topo.add_nat("nat1", NatProfile("port-restricted"))
        topo.add_host("h1", "nat1")
        topo.add_host("h1b", "nat1")
        alice = start("h1", "alice")
        discovery = []
        launched = []
        for run in range(5):
            t_launch = time.monotonic()
            bob = start("h1b", "bob")
            ready = bob.log[0][0]
            n_up = run + 1
            seen = None
            end = time.monotonic() + 5
            while time.monotonic() < end:
                ups = [
                    at
                    for at, e in alice.log
                    if e.get("event") == "peer" and e.get("up") and e.get("name") == "bob"
                ]
                if len(ups) >= n_up:
                    seen = ups[n_up - 1]
                    break
                time.sleep(0.005)
            if seen is None:
                raise RuntimeError(f"alice did not see bob (run {run}): {alice.log[-5:]}")
            discovery.append(max(0.0, seen - ready))  # the ENTRY goes out just before "ready"
            launched.append(seen - t_launch)
            if run < 4:
                bob.proc.stdin.close()  # type: ignore[union-attr]
                bob.proc.wait(10)
                alice.wait(lambda e: e.get("event") == "peer" and e.get("up") is False, 5)
        latency = []
        for i in range(100):
            text = f"ping {i}"
            t = time.monotonic()
            alice.type(f"bob: {text}")
            got = bob.wait(lambda e, text=text: e.get("event") == "message" and e.get("text") == text, 5)
            if got is None:
                raise RuntimeError(f"message {i} did not arrive")
            latency.append(got - t)
        result = {
            "discovery_ms": [round(d * 1000, 2) for d in discovery],
            "discovery_ms_median": round(statistics.median(discovery) * 1000, 2),
            "discovery_ms_max": round(max(discovery) * 1000, 2),
            "discovery_from_launch_ms_median": round(statistics.median(launched) * 1000, 1),
            "latency_ms_p50": round(statistics.median(latency) * 1000, 2),
            "latency_ms_p99": round(sorted(latency)[98] * 1000, 2),
            "latency_ms_max": round(max(latency) * 1000, 2),
            "messages": len(latency),
        }
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(5)
        topo.down()
    print(
        f"discovery (bob ready -> alice sees bob): median {result['discovery_ms_median']} ms, "
        f"max {result['discovery_ms_max']} ms over 5 starts; from launching bob's process "
        f"(Python start-up included): {result['discovery_from_launch_ms_median']} ms"
    )
    print(
        f"message latency (typed -> shown): p50 {result['latency_ms_p50']} ms, "
        f"p99 {result['latency_ms_p99']} ms over {result['messages']}"
    )
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(f"saved {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
