"""Lines from stdin as an asyncio queue, for the interactive commands (`chat`, `lan`).

Reads the file descriptor directly: ``sys.stdin.readline()`` in a reader
callback would leave any further lines in Python's buffer, where no readiness
event ever reports them (a pasted or piped burst would stall after one line).
"""

from __future__ import annotations

import asyncio
import os
import sys


class StdinLines:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()  # None: end of input
        self._loop = asyncio.get_running_loop()
        self._fd = sys.stdin.fileno()
        self._partial = b""
        self._open = True
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.close()
            if self._partial:
                self.queue.put_nowait(self._partial.decode("utf-8", "replace"))
                self._partial = b""
            self.queue.put_nowait(None)
            return
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            self.queue.put_nowait(line.decode("utf-8", "replace").rstrip("\r"))

    def close(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self._fd)
