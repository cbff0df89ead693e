"""A client process for durability tests: ``sender.py URL ROOT NAME PEER COUNT [relay]``.

Logs in with the saved session, queues COUNT numbered messages for PEER as fast
as it can (printing "queued I" once each is in the outbox), then waits until
the outbox is empty and prints "drained". With COUNT 0 it only drains what an
earlier run left behind. Run it again after ``kill -9`` to finish the job.
"""

from __future__ import annotations

import asyncio
import faulthandler
import sys
from pathlib import Path

from p2pim.client import Client, Unreachable
from p2pim.profile import Profile


async def main(url: str, root: str, name: str, peer: str, count: int, relay: bool) -> None:
    """``relay``: no direct path (everything goes through the server)."""
    client = Client(url, Profile(name, Path(root) / "profiles"), direct=False if relay else None)
    while True:  # the server may not be up yet
        try:
            await client.connect()
            await client.login(name)
            break
        except Unreachable as exc:
            print(f"retrying: {exc.message}", flush=True)
            await asyncio.sleep(0.2)
    for i in range(count):
        await client.send(peer, f"msg {i}")
        print(f"queued {i}", flush=True)
    waited = 0
    while client.delivery.items:
        await asyncio.sleep(0.05)
        waited += 1
        if waited % 100 == 0:  # every 5 s: say what is stuck (shows in a failing test's output)
            items = [(i.peer, i.phase.value, i.tries, i.receipt) for i in client.delivery.items.values()]
            state = f"connected={client.connected} online={client.delivery.online}"
            print(f"waiting: {state} {items}", flush=True)
    print("drained", flush=True)
    await client.close()


if __name__ == "__main__":
    # If this ever hangs, the test's failure output shows where.
    faulthandler.dump_traceback_later(20, exit=False, file=sys.stdout)
    relay = sys.argv[6:] == ["relay"]
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), relay))
