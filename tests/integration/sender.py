"""A client process for durability tests: ``sender.py URL ROOT NAME PEER COUNT``.

Logs in with the saved session, queues COUNT numbered messages for PEER as fast
as it can (printing "queued I" once each is in the outbox), then waits until
the outbox is empty and prints "drained". With COUNT 0 it only drains what an
earlier run left behind. Run it again after ``kill -9`` to finish the job.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from p2pim.client import Client, Unreachable
from p2pim.profile import Profile


async def main(url: str, root: str, name: str, peer: str, count: int) -> None:
    client = Client(url, Profile(name, Path(root) / "profiles"))
    while True:  # the server may not be up yet
        try:
            await client.connect()
            await client.login(name)
            break
        except Unreachable:
            await asyncio.sleep(0.2)
    for i in range(count):
        await client.send(peer, f"msg {i}")
        print(f"queued {i}", flush=True)
    while client.delivery.items:
        await asyncio.sleep(0.05)
    print("drained", flush=True)
    await client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
