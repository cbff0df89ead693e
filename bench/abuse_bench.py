"""An honest pair's latency while the server is under abuse, for each abuse in turn.

Runs a real ``rendezvous serve`` (loopback, throwaway database, the real
argon2id cost) and, for each scenario, starts the abuse in processes of its
own, then an honest probe in another process: alice and bob log in (timed:
password hashing is one of the things attacked) and alice relays 200-byte
datagrams to bob at a fixed rate; bob times each. Reported per scenario: the
honest login time, messages delivered, p50/p99 latency, and p99 as a ratio to
the run with no abuse. The load generators and the probe are separate
processes, so the figures are the server's, not a generator's stalls.

Abuses (each bounded in time, stopping by itself):

* ``slow-reader``  a buddy of alice's logs in and stops reading; a second account
  floods it with 60 KB relays, again and again (it is dropped, it comes back), and
  alice writes to it too now and then (every tenth message, 60 KB)
* ``idle-connections``  2000 raw TCP connections that never send a byte, from 5
  addresses, reopened as they are closed or refused (servers run with 1024
  descriptors, a common default)
* ``login-flood``  12 addresses x 10 connections sending wrong-password logins
* ``garbage-frames``  20 connections sending malformed frames, reconnecting
* ``store-flood``  a buddy pair of accounts: one stores 60 KB envelopes for the
  other, which acknowledges each at once (every store and ack is a commit)

``--baseline PATH`` also runs every scenario against another ``rendezvous``
executable (e.g. one installed from an older checkout), side by side in the
same run. Prints a table and saves JSON to bench/results/abuse.json.

    python bench/abuse_bench.py [--seconds 6] [--rate 100] [--baseline /path/to/old/rendezvous]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from websockets.asyncio.client import ClientConnection  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidHandshake  # noqa: E402

from bench import wire  # noqa: E402
from p2pim.identity import Identity  # noqa: E402
from p2pim.messaging.ids import new_msg_id  # noqa: E402
from p2pim.wire import control_pb2 as pb  # noqa: E402
from rendezvous.db import Database  # noqa: E402
from rendezvous.passwords import PasswordHasher  # noqa: E402

PASSWORD = "bench password"
PAYLOAD = 200
SCENARIOS = ["none", "slow-reader", "idle-connections", "login-flood", "garbage-frames", "store-flood"]
# Accounts: the honest pair, then attacker pairs (buddies of each other).
NAMES = ["alice", "bob", "s0", "s1", "g0", "g1"]
PAIRS = [("alice", "bob"), ("s0", "s1"), ("alice", "s1"), ("g0", "g1")]
KEYS_FILE = "keys.json"
SERVER_FILES = 1024  # the servers' open-file limit: a common default


def prepare(tmp: Path) -> None:
    """Accounts (real argon2id hashes) and buddy pairs, written directly; keys kept for the workers."""
    db = Database(tmp / "server.db")
    pw_hash = PasswordHasher("interactive").hash(PASSWORD)
    keys = {}
    ids = {}
    for name in NAMES:
        ident = Identity.generate()
        keys[name] = bytes(ident.signing_key).hex()
        db.add_user(name, pw_hash, ident.public_key, 0)
        user = db.user(name)
        assert user is not None
        ids[name] = user.id
    for a, b in PAIRS:
        db.make_mutual(ids[a], ids[b])
    db.close()
    (tmp / KEYS_FILE).write_text(json.dumps(keys))


def identity(tmp: Path, name: str) -> Identity:
    from nacl.signing import SigningKey

    return Identity(SigningKey(bytes.fromhex(json.loads((tmp / KEYS_FILE).read_text())[name])))


async def login(
    url: str, tmp: Path, name: str, local: str | None = None, rcvbuf: int = 0
) -> ClientConnection:
    return await wire.login(url, name, identity(tmp, name), PASSWORD, local, rcvbuf)


# -- the honest probe ----------------------------------------------------------------------------


async def probe(url: str, tmp: Path, rate: float, seconds: float, also: str = "") -> dict[str, object]:
    """alice relays to bob at ``rate``; with ``also``, every tenth message also goes (60 KB) to
    that buddy, who may be the one not reading."""
    t0 = time.perf_counter()
    alice, bob = await asyncio.gather(login(url, tmp, "alice"), login(url, tmp, "bob"))
    login_s = time.perf_counter() - t0
    await asyncio.sleep(0.5)  # presence settles
    latencies: list[float] = []
    stop = asyncio.Event()

    async def receive() -> None:
        while not stop.is_set():
            try:
                data = await asyncio.wait_for(bob.recv(), 0.5)
            except TimeoutError:
                continue
            frame = pb.Frame.FromString(data)  # type: ignore[arg-type]
            if frame.WhichOneof("body") == "relay_in" and frame.relay_in.sender == "alice":
                (sent_at,) = struct.unpack_from("!d", frame.relay_in.data)
                latencies.append(time.perf_counter() - sent_at)

    async def drain_alice() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in alice:
                pass

    tasks = [asyncio.create_task(receive()), asyncio.create_task(drain_alice())]
    pad = b"\0" * (PAYLOAD - 8)
    big = b"\0" * 60_000
    sent = 0
    start = time.perf_counter()
    while (now := time.perf_counter()) < start + seconds:
        for _ in range(int((now - start) * rate) - sent):
            data = struct.pack("!d", time.perf_counter()) + pad
            await alice.send(pb.Frame(relay=pb.Relay(to="bob", data=data)).SerializeToString())
            if also and sent % 10 == 0:
                await alice.send(pb.Frame(id=sent + 1, relay=pb.Relay(to=also, data=big)).SerializeToString())
            sent += 1
        await asyncio.sleep(0.005)
    await asyncio.sleep(1.0)  # stragglers
    stop.set()
    await tasks[0]
    await alice.close()
    await bob.close()
    await tasks[1]
    lat = sorted(latencies)
    return {
        "login_s": round(login_s, 3),
        "sent": sent,
        "received": len(lat),
        "p50_ms": round(1000 * lat[len(lat) // 2], 2) if lat else None,
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2) if lat else None,
    }


# -- the abuses ---------------------------------------------------------------------------------


async def slow_reader(url: str, tmp: Path, deadline: float) -> None:
    flood = await login(url, tmp, "s0")
    blob = os.urandom(60_000)

    async def drain() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in flood:
                pass

    drainer = asyncio.create_task(drain())
    while time.monotonic() < deadline:
        stalled = await login(url, tmp, "s1", rcvbuf=4096)  # then never reads again
        for i in range(200):  # 12 MB, more than any buffer on the way
            if time.monotonic() > deadline:
                break
            await flood.send(pb.Frame(id=i + 10, relay=pb.Relay(to="s1", data=blob)).SerializeToString())
        stalled.transport.abort()
    drainer.cancel()


async def idle_connections(url: str, tmp: Path, deadline: float) -> None:
    """Hold 2000 connected TCP sockets that never send a byte, reopening what the server closes."""
    port = int(url.rsplit(":", 1)[1])
    loop = asyncio.get_running_loop()

    async def hold(ip: str) -> None:
        while time.monotonic() < deadline:
            s = socket.socket()
            s.setblocking(False)
            try:
                s.bind((ip, 0))
                await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", port)), 2)
                while time.monotonic() < deadline:  # until the server lets go of it
                    remaining = deadline - time.monotonic()
                    if not await asyncio.wait_for(loop.sock_recv(s, 4096), remaining):
                        break
            except (OSError, TimeoutError):
                await asyncio.sleep(0.05)
            finally:
                s.close()

    await asyncio.gather(*(hold(f"127.0.5.{1 + i % 5}") for i in range(2000)))


async def login_flood(url: str, tmp: Path, deadline: float) -> None:
    async def one(ip: str) -> None:
        while time.monotonic() < deadline:
            try:
                ws, _ = await wire.open_ws(url, ip)
            except (OSError, InvalidHandshake, TimeoutError):
                await asyncio.sleep(0.1)
                continue
            with contextlib.suppress(ConnectionClosed):
                rid = 0
                while time.monotonic() < deadline:
                    rid += 1
                    # Unknown users (each name new): every login costs a full hash, and no
                    # per-user bucket stops it; only the per-address one and the hashing queue.
                    who = f"nobody{rid}x{id(ws) % 10000}"
                    frame = pb.Frame(
                        id=rid, login=pb.Login(username=who, password="wrong guess!", signature=b"")
                    )
                    await ws.send(frame.SerializeToString())
                    await wire.reply_to(ws, rid)
            await ws.close()

    await asyncio.gather(*(one(f"127.0.6.{a}") for a in range(1, 13) for _ in range(10)))


async def garbage_frames(url: str, tmp: Path, deadline: float) -> None:
    async def one(i: int) -> None:
        while time.monotonic() < deadline:
            try:
                ws, _ = await wire.open_ws(url, f"127.0.7.{1 + i}")
            except (OSError, InvalidHandshake, TimeoutError):
                await asyncio.sleep(0.1)
                continue
            with contextlib.suppress(ConnectionClosed):
                await ws.send(os.urandom(300))
                await ws.recv()
                await ws.recv()
            await ws.close()

    await asyncio.gather(*(one(i) for i in range(20)))


async def store_flood(url: str, tmp: Path, deadline: float) -> None:
    sender, receiver = await login(url, tmp, "g0"), await login(url, tmp, "g1")

    async def ack_all() -> None:
        rid = 1_000_000
        with contextlib.suppress(ConnectionClosed):
            async for data in receiver:
                frame = pb.Frame.FromString(data)  # type: ignore[arg-type]
                if frame.WhichOneof("body") == "offline_envelope":
                    rid += 1
                    ack = pb.OfflineAck(store_ids=[frame.offline_envelope.store_id])
                    await receiver.send(pb.Frame(id=rid, offline_ack=ack).SerializeToString())

    acker = asyncio.create_task(ack_all())
    blob = os.urandom(60_000)
    rid = 0
    with contextlib.suppress(ConnectionClosed):
        while time.monotonic() < deadline:
            rid += 1
            store = pb.Store(to="g1", msg_id=new_msg_id(), envelope=blob)
            await sender.send(pb.Frame(id=rid, store=store).SerializeToString())
            await wire.reply_to(sender, rid)
    acker.cancel()


# The slow reader is alice's buddy too: she writes to it now and then, as people do.
PROBES = {"slow-reader": "probe:s1"}

ABUSES = {
    "slow-reader": slow_reader,
    "idle-connections": idle_connections,
    "login-flood": login_flood,
    "garbage-frames": garbage_frames,
    "store-flood": store_flood,
}


def worker(role: str, url: str, tmp: Path, seconds: float, rate: float) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if role.startswith("probe"):
        also = role.partition(":")[2]
        print(json.dumps(asyncio.run(probe(url, tmp, rate, seconds, also))), flush=True)
        return
    with contextlib.suppress(Exception):
        asyncio.run(ABUSES[role](url, tmp, time.monotonic() + seconds))


# -- the driver ---------------------------------------------------------------------------------


def run_scenario(
    server_cmd: list[str], tmp: Path, scenario: str, args: argparse.Namespace
) -> dict[str, object]:
    db_dir = tmp / scenario
    db_dir.mkdir()
    shutil.copy(tmp / "server.db", db_dir / "server.db")
    port = wire.free_port()
    server = subprocess.Popen(
        [*server_cmd, "serve", "--port", str(port), "--db", str(db_dir / "server.db"), "--no-stun"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_FILES, SERVER_FILES)),
    )
    url = f"ws://127.0.0.1:{port}"
    me = [sys.executable, __file__, "--worker"]
    attackers: list[subprocess.Popen[str]] = []
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        assert "control on" in banner, banner
        if scenario != "none":
            attackers.append(
                subprocess.Popen([*me, scenario, url, str(tmp), str(args.seconds + 4), "0"], text=True)
            )
            time.sleep(1.5)  # the abuse is under way before the honest pair comes
        out = subprocess.run(
            [*me, PROBES.get(scenario, "probe"), url, str(tmp), str(args.seconds), str(args.rate)],
            capture_output=True,
            text=True,
            timeout=args.seconds + 120,
        )
        result: dict[str, object] = (
            json.loads(out.stdout.splitlines()[-1])
            if out.returncode == 0 and out.stdout.strip()
            else {"error": (out.stderr.strip().splitlines() or ["probe failed"])[-1][:200]}
        )
    except subprocess.TimeoutExpired:
        result = {"error": "the honest pair got nothing through"}
    finally:
        for a in attackers:
            a.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                a.wait(10)
            if a.poll() is None:
                a.kill()
        server.terminate()
        try:
            log = server.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            server.kill()
            log = server.communicate()[0] + "\n(did not stop on SIGTERM)"
    result["server_log_lines"] = len(log.splitlines())
    stopped = [x for x in log.splitlines() if x.startswith("rendezvous: stopped; ")]
    if stopped:  # what the server did meanwhile: connections taken, frames, hashes shed ...
        counters = json.loads(stopped[-1].removeprefix("rendezvous: stopped; "))
        keep = ("connections", "bad_frames", "login_failures", "hashing_shed", "stored", "slow_consumers")
        result["server"] = {k: counters[k] for k in keep if k in counters}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="probe duration per scenario")
    parser.add_argument("--rate", type=float, default=100.0, help="honest messages/s")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--baseline", help="another rendezvous executable to run side by side")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "abuse.json")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        role, url, tmp, seconds, rate = args.worker
        worker(role, url, Path(tmp), float(seconds), float(rate))
        return
    servers = {"p2pim": [sys.executable, "-m", "rendezvous"]}
    if args.baseline:
        servers["baseline"] = [args.baseline]
    tmp = Path(tempfile.mkdtemp(prefix="p2pim-abuse-"))
    try:
        prepare(tmp)
        results: dict[str, dict[str, dict[str, object]]] = {name: {} for name in servers}
        for scenario in args.scenarios.split(","):
            for name, cmd in servers.items():  # side by side, scenario by scenario
                shutil.rmtree(tmp / scenario, ignore_errors=True)
                r = run_scenario(cmd, tmp, scenario, args)
                results[name][scenario] = r
                print(f"{name:>9} {scenario:<17} {json.dumps(r)}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in results:
        base = results[name].get("none", {}).get("p99_ms")
        for r in results[name].values():
            p99 = r.get("p99_ms")
            ok = isinstance(p99, float) and isinstance(base, float) and base > 0
            r["p99_vs_none"] = round(p99 / base, 2) if ok else None  # type: ignore[operator]
    print()
    print(table(results, args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "seconds": args.seconds,
                "rate": args.rate,
                "results": results,
                "note": "abuse, probe and server are separate processes on the same cores",
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {args.out}")


def table(results: dict[str, dict[str, dict[str, object]]], args: argparse.Namespace) -> str:
    names = list(results)
    head = "| abuse | " + " | ".join(f"{n}: login, delivered, p50 / p99, p99 vs none" for n in names) + " |"
    lines = [head, "|---|" + "---|" * len(names)]
    for scenario in next(iter(results.values())):
        cells = []
        for n in names:
            r = results[n].get(scenario, {})
            if "error" in r:
                cells.append(f"failed: {r['error']}")
                continue
            cells.append(
                f"{r['login_s']} s, {r['received']}/{r['sent']}, {r['p50_ms']} / {r['p99_ms']} ms, "
                f"{r['p99_vs_none']}x"
            )
        lines.append(f"| {scenario} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
