"""A client process for file transfer tests: ``filepeer.py URL ROOT NAME DIR``.

Logs in with the saved session, accepts every offered file into DIR (also one
it accepted before a kill: the transfer resumes), prints ``have N`` as bytes
reach the disk and ``done PATH RESENT`` when a file is complete, then exits.
Run it again after ``kill -9``.
"""

from __future__ import annotations

import asyncio
import faulthandler
import sys
from pathlib import Path

from p2pim.client import Client
from p2pim.files.events import FileDone, FileFailed, FileProgress
from p2pim.profile import Profile


async def main(url: str, root: str, name: str, directory: str) -> None:
    client = Client(url, Profile(name, Path(root) / "profiles"), auto_accept=Path(directory))
    await client.connect()
    await client.login(name)
    for t in client.transfers(active=True):
        if t.state == "offered" and not t.outgoing:
            await client.accept_file(t.file_id, Path(directory))
    async for ev in client.events():
        if isinstance(ev, FileProgress):
            print(f"have {ev.done}", flush=True)
        elif isinstance(ev, FileDone) and not ev.outgoing:
            print(f"done {ev.path} {ev.resent}", flush=True)
            break
        elif isinstance(ev, FileFailed):
            print(f"failed {ev.reason}", flush=True)
            break
    while client.delivery.items:  # the "done" envelope is on its way
        await asyncio.sleep(0.05)
    await client.close()


if __name__ == "__main__":
    faulthandler.dump_traceback_later(60, exit=False, file=sys.stdout)
    asyncio.run(main(*sys.argv[1:5]))
