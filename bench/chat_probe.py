"""Other people's chats, timed: how long a relayed message takes while something else runs.

    chat_probe.py URL [--pairs 4] [--rate 200]

Registers ``--pairs`` pairs of users on the rendezvous at URL (raw wire protocol, no
client database: this process is the load generator, not what is measured), makes each
pair buddies, prints "ready", then for each line "PHASE SECONDS" on stdin relays
200-byte messages at ``--rate`` per second in total, a to b in each pair, for SECONDS,
and prints one JSON line: the phase, how many went and came, p50, p99 and max latency
in ms (sender's and receiver's clocks are this process's). Ends at end of input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from websockets.asyncio.client import ClientConnection

from bench import wire
from p2pim.identity import Identity
from p2pim.wire import control_pb2 as pb

PASSWORD = "correct horse battery"
PAYLOAD = 200
TICK = 0.005


async def account(url: str, name: str) -> ClientConnection:
    ident = Identity.generate()
    ws, _ = await wire.open_ws(url)
    register = pb.Register(username=name, password=PASSWORD, identity_key=ident.public_key)
    await ws.send(pb.Frame(id=1, register=register).SerializeToString())
    reply = await wire.reply_to(ws, 1)
    if reply.WhichOneof("body") == "error":
        raise RuntimeError(f"register {name}: {reply.error.message}")
    await ws.close()
    return await wire.login(url, name, ident, PASSWORD)


async def request(ws: ClientConnection, rid: int, frame: pb.Frame) -> None:
    frame.id = rid
    await ws.send(frame.SerializeToString())
    reply = await wire.reply_to(ws, rid)
    if reply.WhichOneof("body") == "error":
        raise RuntimeError(reply.error.message)


async def measure(
    pairs: list[tuple[ClientConnection, ClientConnection, str]], rate: int, seconds: float
) -> dict[str, object]:
    latencies: list[float] = []
    stop = asyncio.Event()

    async def receive(ws: ClientConnection) -> None:
        async for frame in wire.frames(ws, stop):
            if frame.WhichOneof("body") == "relay_in":
                latencies.append(time.perf_counter() - struct.unpack_from("!d", frame.relay_in.data)[0])

    receivers = [asyncio.create_task(receive(b)) for _, b, _ in pairs]
    pad = b"\0" * (PAYLOAD - 8)
    sent, t0 = 0, time.perf_counter()
    next_tick = t0
    while (now := time.perf_counter()) < t0 + seconds:
        for _ in range(int((now - t0) * rate) - sent):
            a, _, b_name = pairs[sent % len(pairs)]
            data = struct.pack("!d", time.perf_counter()) + pad
            await a.send(pb.Frame(relay=pb.Relay(to=b_name, data=data)).SerializeToString())
            sent += 1
        next_tick += TICK
        await asyncio.sleep(max(0.0, next_tick - time.perf_counter()))
    await asyncio.sleep(1.0)  # stragglers
    stop.set()
    await asyncio.gather(*receivers)
    lat = sorted(latencies)

    def ms(q: float) -> float | None:
        return round(1000 * lat[min(len(lat) - 1, int(len(lat) * q))], 2) if lat else None

    return {"sent": sent, "received": len(lat), "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": ms(1.0)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--rate", type=int, default=200)
    args = parser.parse_args()
    tag = secrets.token_hex(3)
    pairs = []
    for i in range(args.pairs):
        a_name, b_name = f"probe{tag}a{i}", f"probe{tag}b{i}"
        a, b = await account(args.url, a_name), await account(args.url, b_name)
        await request(a, 2, pb.Frame(buddy_request=pb.BuddyRequest(username=b_name)))
        await request(b, 2, pb.Frame(buddy_accept=pb.BuddyAccept(username=a_name)))
        pairs.append((a, b, b_name))
    await asyncio.sleep(0.5)  # presence settles: relays need both online
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        phase, seconds = line.split()
        result = await measure(pairs, args.rate, float(seconds))
        print(json.dumps({"phase": phase, **result}), flush=True)
    for a, b, _ in pairs:
        await a.close()
        await b.close()


if __name__ == "__main__":
    asyncio.run(main())
