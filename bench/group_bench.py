"""Group fan-out: one rendezvous, a 100-member group, posts at fixed rates.

Runs a real ``rendezvous serve`` (loopback, throwaway database with the accounts and the
group written directly) and drives it from this process over real WebSockets with the
wire protocol (raw frames: the load generator is not what is measured; it runs in a
process of its own, beside the server on the same 2 cores). Sealing is the clients'
business and costs the server nothing, so posts carry 300 opaque bytes (a short sealed
text) with the send time in them.

Two cases: every member online, and half of them away (their copies wait in the store).
For each offered rate a few members post for ``--seconds``; every online member takes
its copies as they are pushed (and acknowledges them, as the client does). Reports
posts/s the server took, p50/p99 time from a post to its *last* online member, the
server's CPU per post and per copy, and the bytes it kept per post for the away half.
Saves JSON to bench/results/groups.json.

    python bench/group_bench.py [--members 100] [--rates 20,50,100] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from websockets.asyncio.client import ClientConnection  # noqa: E402

from bench import wire  # noqa: E402
from bench.relay_bench import PASSWORD, prepare_db  # noqa: E402
from natlab.transfer import cpu_seconds  # noqa: E402
from p2pim.identity import Identity  # noqa: E402
from p2pim.messaging.ids import new_msg_id  # noqa: E402
from p2pim.wire import control_pb2 as pb  # noqa: E402

OUT = ROOT / "bench" / "results" / "groups.json"
PAYLOAD = 300
GID = b"benchgrp"
SENDERS = 4


def add_group(path: Path, members: int) -> None:
    """One group, u0 its owner, everyone else a member (setup, not measured)."""
    db = sqlite3.connect(path)
    with db:
        db.execute("INSERT INTO groups (id, gid, name, seq, created_ms) VALUES (1, ?, 'bench', 1, 0)", (GID,))
        db.executemany(
            "INSERT INTO group_members VALUES (1, ?, ?)",
            [(i + 1, "owner" if i == 0 else "member") for i in range(members)],
        )
    db.close()


async def run(url: str, conns: dict[int, ClientConnection], rate: int, seconds: float, online: int) -> dict:
    """Members 0..SENDERS-1 post at ``rate`` in total; every online member reads and acks."""
    arrivals: dict[bytes, list[float]] = {}
    sent_at: dict[bytes, float] = {}
    stop = asyncio.Event()
    copies = 0

    async def reader(i: int, ws: ClientConnection) -> None:
        nonlocal copies
        async for frame in wire.frames(ws, stop):
            if frame.WhichOneof("body") != "offline_envelope":
                continue
            off = frame.offline_envelope
            if off.sender:
                msg_id = off.envelope[:16]
                arrivals.setdefault(msg_id, []).append(time.perf_counter())
                copies += 1
            ack = pb.Frame(id=0, offline_ack=pb.OfflineAck(store_ids=[off.store_id]))
            await ws.send(ack.SerializeToString())

    readers = [asyncio.create_task(reader(i, ws)) for i, ws in conns.items()]
    pad = b"\0" * (PAYLOAD - 24)
    posted, t0 = 0, time.perf_counter()
    next_tick = t0
    while (now := time.perf_counter()) < t0 + seconds:
        for _ in range(int((now - t0) * rate) - posted):
            msg_id = new_msg_id()
            sent_at[msg_id] = time.perf_counter()
            envelope = msg_id + struct.pack("!d", sent_at[msg_id]) + pad
            frame = pb.Frame(id=0, group_post=pb.GroupPost(group=GID, msg_id=msg_id, envelope=envelope))
            await conns[posted % SENDERS].send(frame.SerializeToString())
            posted += 1
        next_tick += 0.005
        await asyncio.sleep(max(0.0, next_tick - time.perf_counter()))
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(2.0)  # stragglers
    stop.set()
    await asyncio.gather(*readers)
    # the last online member to get each post (the sender gets no copy of its own)
    want = online - 1
    whole = [max(ts) - sent_at[m] for m, ts in arrivals.items() if len(ts) >= want and m in sent_at]
    whole.sort()

    def ms(q: float) -> float | None:
        return round(1000 * whole[min(len(whole) - 1, int(len(whole) * q))], 1) if whole else None

    return {
        "offered_per_s": rate,
        "posted": posted,
        "complete": len(whole),
        "taken_per_s": round(len(whole) / elapsed),
        "copies_pushed": copies,
        "p50_last_member_ms": ms(0.5),
        "p99_last_member_ms": ms(0.99),
    }


async def bench(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="p2pim-groupbench-"))
    idents: list[Identity] = prepare_db(tmp / "server.db", args.members)
    add_group(tmp / "server.db", args.members)
    port = wire.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "rendezvous", "serve", "--port", str(port), "--db", str(tmp / "server.db"),
         "--no-stun", "--kdf-cost", "min", "--heartbeat", "60",
         "--login-ip-rate", "1000000", "--login-ip-burst", "1000000"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    cases = []
    try:
        assert server.stdout is not None
        assert "control on" in server.stdout.readline()
        url = f"ws://127.0.0.1:{port}"
        for online in (args.members, args.members // 2):
            conns = {}
            for i in range(online):
                conns[i] = await wire.login(url, f"u{i}", idents[i], PASSWORD, local=f"127.0.{10 + i % 50}.1")
            for rate in args.rates:
                db_size = (tmp / "server.db").stat().st_size + _wal(tmp)
                cpu0 = cpu_seconds(server.pid)
                r = await run(url, conns, rate, args.seconds, online)
                cpu = cpu_seconds(server.pid) - cpu0
                r["members_online"] = online
                r["server_cpu_us_per_post"] = round(1e6 * cpu / max(1, r["posted"]), 1)
                r["server_cpu_us_per_copy"] = round(1e6 * cpu / max(1, r["posted"] * (args.members - 1)), 2)
                if online < args.members:
                    grown = (tmp / "server.db").stat().st_size + _wal(tmp) - db_size
                    r["stored_bytes_per_post"] = round(grown / max(1, r["posted"]))
                cases.append(r)
                print(
                    f"{online:>3}/{args.members} online, offered {rate:>4}/s: taken {r['taken_per_s']:>4}/s, "
                    f"last member p50 {r['p50_last_member_ms']} ms p99 {r['p99_last_member_ms']} ms, "
                    f"server {r['server_cpu_us_per_post']} us/post ({r['server_cpu_us_per_copy']} us/copy)"
                    + (
                        f", {r['stored_bytes_per_post']} B stored/post"
                        if "stored_bytes_per_post" in r
                        else ""
                    ),
                    flush=True,
                )
            await asyncio.gather(*(c.close() for c in conns.values()))
            await asyncio.sleep(1)
    finally:
        server.terminate()
        try:
            server.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # still working through a backlog past its limit
            server.kill()
            server.communicate(timeout=10)
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    return {"members": args.members, "senders": SENDERS, "payload_bytes": PAYLOAD, "seconds": args.seconds,
            "cases": cases, "note": "load generator and server share the machine's 2 cores"}  # fmt: skip


def _wal(tmp: Path) -> int:
    wal = tmp / "server.db-wal"
    return wal.stat().st_size if wal.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[20, 50, 100])
    parser.add_argument("--seconds", type=float, default=5.0)
    result = asyncio.run(bench(parser.parse_args()))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(f"saved {OUT}")


if __name__ == "__main__":
    main()
