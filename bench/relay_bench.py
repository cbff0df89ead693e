"""Relay throughput and latency, and server memory per idle client, for one rendezvous process.

Runs a real ``rendezvous serve`` (loopback, throwaway database) and drives it
over real WebSockets with the wire protocol (raw frames, no client database)
from ``--generators`` processes of their own, each with its share of the
clients and pairs (a pair's sender and receiver in one process, which times
it): the load generator must not be the thing measured. One generator process
is what this bench did before (its own queueing in the figures).

1. Memory: RSS of the server before any client, then with ``--clients``
   logged-in idle connections; the difference per client.
2. Relay: ``--pairs`` buddy pairs among those clients; for each offered rate
   in ``--rates`` the senders relay 200-byte datagrams (the size of a short
   sealed text) at that rate for ``--seconds``; the receivers time each one.
   Reports achieved messages/s, p50/p99 latency and loss.

``--setup`` chooses what serves them (``all``: each in turn, side by side):

- ``sqlite``: one process on the embedded SQLite default (the figure README quotes);
- ``postgres``: one process on PostgreSQL (a real ``postgres`` of the bench's own);
- ``workers2``: ``--workers 2`` on one port (SO_REUSEPORT) over PostgreSQL and NATS:
  a pair's two clients land on either worker, so about half the messages cross the bus;
- ``nodes3``: three nodes (processes, ports) over PostgreSQL and NATS, each pair's
  sender on one node and receiver on the next: every message crosses the bus.

Server CPU per message is the nodes' own (their processes); the bus's (nats-server)
is reported beside it. Bounded: every phase has a fixed count and duration and ends by
itself. Prints a table and saves JSON to bench/results/relay.json (``sqlite``) or
bench/results/cluster.json (``all``).

    python bench/relay_bench.py [--setup sqlite|postgres|workers2|nodes3|all] [--clients 5000]
                                [--pairs 100] [--rates 5000,8000,10000,12000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import resource
import struct
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from websockets.asyncio.client import ClientConnection  # noqa: E402

from bench import wire  # noqa: E402
from bench.services import Nats, Postgres  # noqa: E402
from natlab.transfer import cpu_seconds  # noqa: E402
from p2pim.identity import Identity  # noqa: E402
from p2pim.wire import control_pb2 as pb  # noqa: E402
from rendezvous.db import Database  # noqa: E402
from rendezvous.passwords import PasswordHasher  # noqa: E402

PASSWORD = "bench password"
PAYLOAD = 200
TARGET_RATE = 10_000
TARGET_P99_MS = 50.0
TARGET_KB_PER_CLIENT = 20.0
TICK = 0.005
TARGET_CROSS_P99_MS = 50.0  # across nodes
SETUPS = ("sqlite", "postgres", "workers2", "nodes3")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def prepare_db(path: Path | str, n: int) -> list[Identity]:
    """Accounts and buddy pairs written directly (setup, not measured)."""
    db = Database(path)
    pw_hash = PasswordHasher("min").hash(PASSWORD)
    idents = [Identity.generate() for _ in range(n)]
    with db.transaction():
        for i, ident in enumerate(idents):
            db.conn.execute(
                "INSERT INTO users (username, pw_hash, identity_key, created_ms) VALUES (?, ?, ?, 0)",
                (f"u{i}", pw_hash, ident.public_key),
            )
            db.conn.execute(  # its first device (the one holding the identity key)
                "INSERT INTO devices (user_id, device_key, name, created_ms) VALUES (?, ?, 'bench', 0)",
                (i + 1, ident.public_key),
            )
        for i in range(0, n - 1, 2):
            db.conn.execute("INSERT INTO relations VALUES (?, ?, 'mutual')", (i + 1, i + 2))
            db.conn.execute("INSERT INTO relations VALUES (?, ?, 'mutual')", (i + 2, i + 1))
    db.close()
    return idents


def source_address(i: int) -> str:
    """Clients come from 200 loopback addresses (25 each), as users come from many: the
    server's per-address caps (new connections: 10/s, bursts of 50) stay at their defaults."""
    return f"127.0.{10 + i % 200}.1"


async def login(url: str, i: int, ident: Identity) -> ClientConnection:
    return await wire.login(url, f"u{i}", ident, PASSWORD, local=source_address(i))


async def relay_run(
    conns: dict[int, ClientConnection], pairs: list[int], rate: float, seconds: float
) -> tuple[int, int, list[float], float]:
    """Pair p's sender u(2p) relays to u(2p+1), for the ``pairs`` given, at ``rate``
    messages/s in all; returns (sent, received, latencies in s, seconds elapsed)."""
    latencies: list[float] = []
    received = 0
    stop = asyncio.Event()

    async def receiver(ws: ClientConnection) -> None:
        nonlocal received
        async for frame in wire.frames(ws, stop, poll=0.5):
            if frame.WhichOneof("body") == "relay_in":
                (sent,) = struct.unpack_from("!d", frame.relay_in.data)
                latencies.append(time.perf_counter() - sent)
                received += 1

    receivers = [asyncio.create_task(receiver(conns[2 * p + 1])) for p in pairs]
    pad = b"\0" * (PAYLOAD - 8)
    sent = 0
    t0 = time.perf_counter()
    next_tick = t0
    while (now := time.perf_counter()) < t0 + seconds:
        due = int((now - t0) * rate) - sent
        for _ in range(due):
            p = pairs[sent % len(pairs)]
            data = struct.pack("!d", time.perf_counter()) + pad
            frame = pb.Frame(relay=pb.Relay(to=f"u{2 * p + 1}", data=data))
            await conns[2 * p].send(frame.SerializeToString())
            sent += 1
        next_tick += TICK
        await asyncio.sleep(max(0.0, next_tick - time.perf_counter()))
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(1.0)  # stragglers
    stop.set()
    await asyncio.gather(*receivers)
    return sent, received, latencies, elapsed


def summary(rate: int, sent: int, received: int, latencies: list[float], elapsed: float) -> dict[str, float]:
    lat = sorted(latencies)
    return {
        "offered_per_s": rate,
        "sent": sent,
        "received": received,
        "lost": sent - received,
        "achieved_per_s": round(received / elapsed),
        "p50_ms": round(1000 * lat[len(lat) // 2], 2) if lat else -1,
        "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 2) if lat else -1,
        "max_ms": round(1000 * lat[-1], 2) if lat else -1,
    }


def generator(pipe: Connection, urls: dict[int, str], seeds: dict[int, bytes], pairs: list[int]) -> None:
    """One load-generator process: logs its clients in, then runs what the parent asks."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(50)

        async def one(i: int) -> tuple[int, ClientConnection]:
            async with sem:
                return i, await login(urls[i], i, Identity.from_seed(seeds[i]))

        conns = dict(await asyncio.gather(*(one(i) for i in seeds)))
        pipe.send("ready")
        while True:
            order = await loop.run_in_executor(None, pipe.recv)
            if order[0] == "run":
                pipe.send(await relay_run(conns, pairs, order[1], order[2]))
            else:
                await asyncio.gather(*(c.close() for c in conns.values()))
                pipe.send("closed")
                return

    asyncio.run(main())


def start_generators(
    urls: dict[int, str], idents: list[Identity], pairs: int, count: int
) -> list[tuple[multiprocessing.process.BaseProcess, Connection]]:
    """``count`` generator processes: pair p (clients 2p, 2p+1) in process p % count, the idle
    clients spread over them."""
    ctx = multiprocessing.get_context("spawn")
    out = []
    for g in range(count):
        mine = [p for p in range(pairs) if p % count == g]
        members = {2 * p for p in mine} | {2 * p + 1 for p in mine}
        idle = [i for i in range(2 * pairs, len(idents)) if i % count == g]
        seeds = {i: idents[i].seed for i in sorted(members | set(idle))}
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=generator, args=(child, {i: urls[i] for i in seeds}, seeds, mine), daemon=True
        )
        proc.start()
        out.append((proc, parent))
    for _, pipe in out:
        if pipe.recv() != "ready":
            raise RuntimeError("a generator did not log its clients in")
    return out


class Servers:
    """What serves the clients in one setup: the node processes, and PostgreSQL and NATS
    when the setup needs them (each a process of this bench's own, stopped at the end)."""

    def __init__(self, setup: str, tmp: Path) -> None:
        self.setup = setup
        self.tmp = tmp
        self.postgres = Postgres() if setup != "sqlite" else None
        self.nats = Nats() if setup in ("workers2", "nodes3") else None
        self.db = self.postgres.new_database() if self.postgres else str(tmp / "server.db")
        self.procs: list[subprocess.Popen[str]] = []
        self.ports: list[int] = []

    def start(self) -> None:
        common = [
            *("--no-stun", "--kdf-cost", "min", "--heartbeat", "60", "--db", self.db),
            *("--login-ip-rate", "1000000", "--login-ip-burst", "1000000"),
        ]
        if self.nats is not None:
            common += ["--bus", self.nats.url]
        count = 3 if self.setup == "nodes3" else 1
        for n in range(count):
            port = wire.free_port()
            argv = [
                sys.executable,
                "-m",
                "rendezvous",
                "serve",
                "--port",
                str(port),
                *common,
                "--node",
                f"b{n}",
            ]
            if self.setup == "workers2":
                argv += ["--workers", "2"]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            banner = proc.stdout.readline()
            if self.setup == "workers2":  # the supervisor speaks first, then each worker
                banner = proc.stdout.readline() + proc.stdout.readline()
            assert "control on" in banner, banner
            self.procs.append(proc)
            self.ports.append(port)

    def url_of(self, i: int, pairs: int) -> str:
        """Client ``i``'s node: with three nodes, pair p's sender on node p % 3 and its
        receiver on the next one (every message crosses the bus); idle clients spread."""
        n = len(self.ports)
        if n == 1:
            return f"ws://127.0.0.1:{self.ports[0]}"
        node = (i // 2 + i % 2) % n if i < 2 * pairs else i % n
        return f"ws://127.0.0.1:{self.ports[node]}"

    def pids(self) -> list[int]:
        """The processes that serve (with ``--workers``, the workers, not their supervisor)."""
        out = []
        for proc in self.procs:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            out += [int(c) for c in children] if self.setup == "workers2" else [proc.pid]
        return out

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        if self.nats is not None:
            self.nats.stop()
        if self.postgres is not None:
            self.postgres.stop()


async def bench(args: argparse.Namespace, setup: str) -> dict[str, object]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2 * args.clients + 100:
        raise SystemExit(f"need {2 * args.clients + 100} file descriptors, the limit is {hard}")
    tmp = Path(tempfile.mkdtemp(prefix="p2pim-bench-"))
    servers = Servers(setup, tmp)
    print(f"[{setup}] preparing {args.clients} accounts ...", flush=True)
    idents = prepare_db(servers.db, args.clients)
    runs: list[dict[str, float]] = []
    try:
        servers.start()
        urls = {i: servers.url_of(i, args.pairs) for i in range(args.clients)}
        # Warm each node's code paths with one client, so the baseline includes them.
        for port in servers.ports:
            warm = await login(f"ws://127.0.0.1:{port}", 0, idents[0])
            await warm.close()
        await asyncio.sleep(1)
        pids = servers.pids()
        base = sum(rss_kb(p) for p in pids)
        t0 = time.perf_counter()
        gens = await asyncio.get_running_loop().run_in_executor(
            None, start_generators, urls, idents, args.pairs, args.generators
        )
        login_s = time.perf_counter() - t0
        await asyncio.sleep(3)  # idle
        loaded = sum(rss_kb(p) for p in pids)
        per_client = (loaded - base) / args.clients
        print(
            f"[{setup}] {args.clients} clients logged in in {login_s:.1f} s; "
            f"server RSS {base / 1024:.1f} MiB -> "
            f"{loaded / 1024:.1f} MiB: {per_client:.1f} KiB per idle client "
            f"(target < {TARGET_KB_PER_CLIENT})",
            flush=True,
        )
        bus_pid = servers.nats.proc.pid if servers.nats and servers.nats.proc else None
        for rate in args.rates:
            cpu0 = sum(cpu_seconds(p) for p in pids)
            bus0 = cpu_seconds(bus_pid) if bus_pid else 0.0
            for _, pipe in gens:
                pipe.send(("run", rate / len(gens), args.seconds))
            parts = [await asyncio.get_running_loop().run_in_executor(None, pipe.recv) for _, pipe in gens]
            r = summary(
                rate, sum(p[0] for p in parts), sum(p[1] for p in parts),
                [x for p in parts for x in p[2]], max(p[3] for p in parts),
            )  # fmt: skip
            # The server's own CPU per relayed message: steadier than latency on a shared box.
            received = max(1, int(r["received"]))
            r["server_cpu_us_per_msg"] = round(1e6 * (sum(cpu_seconds(p) for p in pids) - cpu0) / received, 1)
            if bus_pid:
                r["bus_cpu_us_per_msg"] = round(1e6 * (cpu_seconds(bus_pid) - bus0) / received, 1)
            runs.append(r)
            print(
                f"[{setup}] offered {rate:>6}/s: achieved {r['achieved_per_s']:>6}/s, "
                f"p50 {r['p50_ms']:6.2f} ms, "
                f"p99 {r['p99_ms']:6.2f} ms, lost {r['lost']}, "
                f"server CPU {r['server_cpu_us_per_msg']} us/msg"
                + (f", bus {r['bus_cpu_us_per_msg']} us/msg" if bus_pid else ""),
                flush=True,
            )
        for proc, pipe in gens:
            pipe.send(("close",))
            pipe.recv()
            proc.join(10)
    finally:
        servers.stop()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    target = TARGET_P99_MS if setup in ("sqlite", "postgres") else TARGET_CROSS_P99_MS
    ok_runs = [r for r in runs if r["p99_ms"] < target and r["lost"] == 0]
    best = max((r["achieved_per_s"] for r in ok_runs), default=0)
    return {
        "setup": setup,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "clients": args.clients,
        "login_s": round(login_s, 2),
        "server_rss_base_kib": base,
        "server_rss_loaded_kib": loaded,
        "kib_per_idle_client": round(per_client, 2),
        "memory_target_met": per_client < TARGET_KB_PER_CLIENT,
        "pairs": args.pairs,
        "payload_bytes": PAYLOAD,
        "runs": runs,
        "best_rate_with_p99_under_target": best,
        "throughput_target_met": best >= TARGET_RATE,
        "generators": args.generators,
        "note": "the load generator's processes, the nodes, PostgreSQL and NATS share the machine's cores",
    }


def compare(results: dict[str, dict[str, object]]) -> dict[str, object]:
    """Each setup against the embedded default, at each offered rate: p99 and CPU ratios."""
    base = {r["offered_per_s"]: r for r in results["sqlite"]["runs"]} if "sqlite" in results else {}  # type: ignore[index, union-attr]
    out: dict[str, object] = {}
    for setup, res in results.items():
        rows = []
        for r in res["runs"]:  # type: ignore[attr-defined]
            b = base.get(r["offered_per_s"])
            if b is None:
                continue
            rows.append({
                "offered_per_s": r["offered_per_s"],
                "p99_ratio": round(r["p99_ms"] / b["p99_ms"], 2) if b["p99_ms"] > 0 else None,
                "p99_extra_ms": round(r["p99_ms"] - b["p99_ms"], 2),
                "cpu_ratio": round(r["server_cpu_us_per_msg"] / b["server_cpu_us_per_msg"], 2),
            })  # fmt: skip
        out[setup] = rows
    return out


def print_comparison(results: dict[str, dict[str, object]]) -> None:
    print("\nsetup      offered  achieved   p50 ms   p99 ms  lost  server us/msg  bus us/msg  KiB/client")
    for setup, res in results.items():
        for r in res["runs"]:  # type: ignore[attr-defined]
            print(
                f"{setup:<9} {r['offered_per_s']:>8} {r['achieved_per_s']:>9} {r['p50_ms']:>8.2f} "
                f"{r['p99_ms']:>8.2f} {r['lost']:>5} {r['server_cpu_us_per_msg']:>14} "
                f"{r.get('bus_cpu_us_per_msg', '-'):>11} {res['kib_per_idle_client']:>11}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument(
        "--rates", type=lambda s: [int(x) for x in s.split(",")], default=[5000, 8000, 10000, 12000]
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--generators", type=int, default=2, help="load-generator processes (default 2)")
    parser.add_argument(
        "--setup", choices=(*SETUPS, "all"), default="sqlite", help="what serves (default sqlite)"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON file (default bench/results/relay.json or cluster.json)"
    )
    args = parser.parse_args()
    if args.clients < 2 * args.pairs:
        parser.error("--clients must be at least 2 * --pairs")
    setups = list(SETUPS) if args.setup == "all" else [args.setup]
    results = {setup: asyncio.run(bench(args, setup)) for setup in setups}
    out = args.out or ROOT / "bench" / "results" / ("relay.json" if setups == ["sqlite"] else "cluster.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = (
        results["sqlite"] if setups == ["sqlite"] else {"setups": results, "comparison": compare(results)}
    )
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")
    if len(setups) > 1:
        print_comparison(results)
    for setup, r in results.items():
        target = TARGET_P99_MS if setup in ("sqlite", "postgres") else TARGET_CROSS_P99_MS
        print(
            f"{setup}: {TARGET_RATE}/s at p99 < {target} ms: "
            f"{'met' if r['throughput_target_met'] else 'NOT met'} "
            f"(best {r['best_rate_with_p99_under_target']}/s); "
            f"{r['kib_per_idle_client']} KiB per idle client"
        )


if __name__ == "__main__":
    main()
