"""Lines from stdin as an asyncio queue, and the interactive loop of `chat` and `lan`.

Reads the file descriptor directly: ``sys.stdin.readline()`` in a reader
callback would leave any further lines in Python's buffer, where no readiness
event ever reports them (a pasted or piped burst would stall after one line).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any


class StdinLines:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()  # None: end of input
        self._loop = asyncio.get_running_loop()
        self._fd = sys.stdin.fileno()
        self._partial = b""
        self._open = True
        try:
            self._loop.add_reader(self._fd, self._readable)
        except PermissionError:  # a regular file or /dev/null: epoll refuses it, and it never blocks
            self._open = False
            while self._take(os.read(self._fd, 65536)):
                pass

    def _readable(self) -> None:
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not self._take(chunk):
            self.close()

    def _take(self, chunk: bytes) -> bool:
        """Queue the lines in ``chunk``; False (and the end of input queued) if it is empty."""
        if not chunk:
            if self._partial:
                self.queue.put_nowait(self._partial.decode("utf-8", "replace"))
                self._partial = b""
            self.queue.put_nowait(None)
            return False
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            self.queue.put_nowait(line.decode("utf-8", "replace").rstrip("\r"))
        return True

    def close(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self._fd)


async def interact(
    next_event: Callable[[], Awaitable[Any]],
    on_event: Callable[[Any], Awaitable[None]],
    on_line: Callable[[str], Awaitable[bool]],
    pending: Callable[[], int],
    linger: float,
) -> bool:
    """The interactive loop of ``chat`` and ``lan``: lines typed and events, as they come.

    ``on_line`` returns False to stop (``/quit``). At the end of input it waits up to
    ``linger`` seconds for ``pending()`` to reach 0 (receipts for what was typed).
    Returns True when it ended with nothing pending.
    """
    loop = asyncio.get_running_loop()
    stdin = StdinLines()
    get_event: asyncio.Future[Any] = asyncio.ensure_future(next_event())
    get_line: asyncio.Future[str | None] | None = asyncio.ensure_future(stdin.queue.get())
    linger_until: float | None = None
    try:
        while True:
            if linger_until is not None and pending() == 0:
                return True
            timeout = None if linger_until is None else max(0.0, linger_until - loop.time())
            waits = {t for t in (get_line, get_event) if t is not None}
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                return pending() == 0
            if get_line is not None and get_line in done:
                line = get_line.result()
                if line is None:
                    get_line = None
                    linger_until = loop.time() + linger
                else:
                    get_line = asyncio.ensure_future(stdin.queue.get())
                    if not await on_line(line):
                        return pending() == 0
            if get_event in done:
                event = get_event.result()
                get_event = asyncio.ensure_future(next_event())
                await on_event(event)
    finally:
        stdin.close()
        get_event.cancel()
        if get_line is not None:
            get_line.cancel()
