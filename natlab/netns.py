"""Thin wrappers over iproute2 for network namespaces. Everything natlab does to
the kernel goes through :func:`sh`, so failures carry the command and its stderr.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence

#: Every namespace natlab creates starts with this, so `natlab down --all` can
#: find leftovers of crashed runs without touching anyone else's namespaces.
TAG = "nl-"


class LabError(RuntimeError):
    """A lab command failed; the message has the command and what it printed."""


def sh(argv: Sequence[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(
            f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def ip(ns: str | None, *args: str) -> None:
    sh(["ip", *(("-n", ns) if ns else ()), *args])


def nsexec(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def namespaces() -> list[str]:
    out = sh(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def delete_namespace(ns: str) -> None:
    """Kill what runs inside ``ns`` (only processes in our namespace), then delete it."""
    pids = [int(p) for p in sh(["ip", "netns", "pids", ns], check=False).stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            break
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(_exists(p) for p in alive):
            time.sleep(0.05)
        pids = [p for p in alive if _exists(p)]
    sh(["ip", "netns", "delete", ns], check=False)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours still "exists"; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def missing_requirements() -> str | None:
    """Why the lab cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "natlab needs root (network namespaces and nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"natlab needs `{tool}` (apt-get install iproute2 nftables)"
    return None
