"""A file between two real clients through real kernel NATs (`natlab files`, lab tests, bench).

alice runs `p2pim send-file`, bob `p2pim listen --auto-accept`, each in its own
namespace behind its NAT, with the real `rendezvous serve` on the public
segment. Along the way the NATs may lose packets, be flushed (a path change)
or either client may be killed with SIGKILL and started again; at the end the
file bob has is compared with alice's, byte for byte (BLAKE2b here, not the
client's word for it).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .classify import tool
from .matrix import (
    TEXTBOOK,
    JsonProcess,
    LabError,
    Routers,
    new_prefix,
    profile,
    start_pair,
    stop_all,
)
from .profiles import NatProfile
from .topology import Topology, standard

BLOCK = 1024 * 1024


@dataclass
class TransferResult:
    a: str
    b: str
    size: int
    routers: str = TEXTBOOK.name
    arrived: bool = False  # bob has the whole file, byte for byte (checked here)
    seconds: float | None = None  # bob accepted -> bob has it
    path: str = "relay"  # "direct" if bob had a direct path to alice at some time, else "relay"
    direct_bytes: int = 0  # of the file's bytes bob took in, how many came over QUIC (the rest: relay)
    resent_sender: int = 0  # bytes alice sent twice (what resuming and path changes cost)
    resent_receiver: int = 0  # bytes bob got twice
    kills: int = 0
    resume_seconds: list[float] = field(default_factory=list)  # per kill: restart -> past that point
    cpu_sender_s: float | None = None  # CPU (user + system) of each client during the transfer
    cpu_receiver_s: float | None = None  # (None after a kill: a new process)
    error: str = ""
    notes: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)  # paths, connections and progress, both sides

    @property
    def mb_s(self) -> float | None:
        return round(self.size / self.seconds / 1e6, 2) if self.seconds else None

    def as_dict(self) -> dict[str, object]:
        return {**self.__dict__, "mb_s": self.mb_s}


# during(topo, fraction): called as bob's progress passes each fraction in ``at``; it may
# return "kill-sender" or "kill-receiver" to have that client killed (SIGKILL) and restarted.
During = Callable[[Topology, float], str | None]


def run_transfer(
    a: NatProfile | str,
    b: NatProfile | str,
    size: int = 32 * BLOCK,
    routers: Routers = TEXTBOOK,
    during: During | None = None,
    at: tuple[float, ...] = (0.3,),
    server_args: tuple[str, ...] = (),
    timeout: float = 300.0,
    before: Callable[[Topology], None] | None = None,
) -> TransferResult:
    """Send a ``size``-byte file of random bytes from alice (behind ``a``) to bob (behind ``b``).
    ``before(topo)`` runs once the server and both accounts are up, before the offer."""
    pa = a if isinstance(a, NatProfile) else profile(a, routers=routers)
    pb = b if isinstance(b, NatProfile) else profile(b, routers=routers, side="b")
    result = TransferResult(pa.kind, pb.kind, size, routers.name)
    topo = standard(new_prefix(), [pa, pb], hop=routers.hop, ipv6=routers.ipv6)
    procs: list[JsonProcess] = []
    names: dict[int, str] = {}  # id(process) -> who, for the log
    server: subprocess.Popen[str] | None = None
    with tempfile.TemporaryDirectory(prefix="natlab-files-") as tmp:
        try:
            src = Path(tmp) / "payload.bin"
            digest = _random_file(src, size)
            server, envs = start_pair(topo, tmp, "h1", "h2", server_args)
            if before is not None:
                before(topo)
            dl = Path(tmp) / "downloads"
            listen = [tool("p2pim"), "listen", "--auto-accept", "--dir", str(dl), "--json"]
            send = [tool("p2pim"), "send-file", "bob", str(src), "--json"]
            bob = JsonProcess(topo, "h2", listen, envs["bob"])
            procs.append(bob)
            names[id(bob)] = "bob"
            _wait_online(topo, envs["alice"], "bob")
            alice = JsonProcess(topo, "h1", send, envs["alice"])
            procs.append(alice)
            names[id(alice)] = "alice"
            if bob.wait(lambda e: e.get("event") == "file_offered", 30) is None:
                raise LabError("bob never saw the offer")
            started = time.monotonic()
            cpu0 = (_cpu(alice.proc.pid), _cpu(bob.proc.pid))
            pending = sorted(at)
            end = started + timeout
            done: dict[str, object] | None = None
            resuming: tuple[float, int] | None = None  # (restarted at, bob's bytes before the kill)
            while done is None and time.monotonic() < end:
                time.sleep(0.02)
                done = next((ev for _, ev in bob.log if ev.get("event") == "file_done"), None)
                failed = next((ev for _, ev in bob.log + alice.log if ev.get("event") == "file_failed"), None)
                if failed is not None:
                    raise LabError(f"transfer failed: {failed.get('reason')}")
                have = _progress(bob)
                if resuming is not None and (have > resuming[1] or done is not None):
                    result.resume_seconds.append(round(time.monotonic() - resuming[0], 2))
                    resuming = None
                while pending and have >= pending[0] * size and during is not None:
                    pending.pop(0)
                    action = during(topo, have / size)
                    if action == "kill-receiver":
                        bob = _restart(topo, procs, bob, "h2", listen, envs["bob"])
                        names[id(bob)] = "bob (restarted)"
                    elif action == "kill-sender":  # a new session resumes it (no second offer)
                        resume = [tool("p2pim"), "listen", "--json"]
                        alice = _restart(topo, procs, alice, "h1", resume, envs["alice"])
                        names[id(alice)] = "alice (restarted)"
                    if action in ("kill-receiver", "kill-sender"):
                        result.kills += 1
                        resuming = (time.monotonic(), have)
            if done is None:
                raise LabError(f"no file within {timeout:g} s")
            result.seconds = round(time.monotonic() - started, 2)
            if result.kills == 0:
                cpu1 = (_cpu(alice.proc.pid), _cpu(bob.proc.pid))
                result.cpu_sender_s = _spent(cpu0[0], cpu1[0])
                result.cpu_receiver_s = _spent(cpu0[1], cpu1[1])
            result.resent_receiver = int(done.get("resent", 0))  # type: ignore[call-overload]
            result.direct_bytes = int(done.get("direct", 0))  # type: ignore[call-overload]
            path = Path(str(done.get("path")))
            result.arrived = path.exists() and _digest(path) == digest
            if alice.wait(lambda e: e.get("event") == "file_done", 30) is not None:
                sent = next(ev for _, ev in alice.log if ev.get("event") == "file_done")
                result.resent_sender = int(sent.get("resent", 0))  # type: ignore[call-overload]
            paths = [
                ev.get("via") for _, ev in bob.log if ev.get("event") == "path" and ev.get("user") == "alice"
            ]
            result.path = "direct" if "direct" in paths else "relay"
        except (LabError, OSError, subprocess.SubprocessError) as exc:
            result.error = str(exc)
        finally:
            t0 = min((when for p in procs for when, _ in p.log), default=0.0)
            for p in procs:
                who = names.get(id(p), "?")
                for when, ev in p.log:
                    if ev.get("event") in ("path", "connection", "file_progress", "file_done", "problem"):
                        detail = {
                            k: v
                            for k, v in ev.items()
                            if k in ("via", "addr", "reason", "done", "detail", "up", "message")
                        }
                        result.log.append(f"{when - t0:7.2f} {who}: {ev['event']} {detail}")
            result.log.sort()
            stop_all(topo, procs, server)
    return result


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (OSError once it is gone)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _cpu(pid: int) -> float | None:
    try:
        return cpu_seconds(pid)
    except OSError:
        return None


def _spent(before: float | None, after: float | None) -> float | None:
    return round(after - before, 2) if before is not None and after is not None else None


def _progress(listener: JsonProcess) -> int:
    """The most bytes bob's listener has said it has."""
    done = [ev.get("done", 0) for _, ev in listener.log if ev.get("event") == "file_progress"]
    return max((int(d) for d in done if isinstance(d, int)), default=0)


def _random_file(path: Path, size: int) -> bytes:
    h = hashlib.blake2b()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(BLOCK, left))
            f.write(block)
            h.update(block)
            left -= len(block)
    return h.digest()


def _digest(path: Path) -> bytes:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.digest()


def _wait_online(topo: Topology, env: dict[str, str], peer: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        proc = subprocess.run(
            topo.cmd("h1", [tool("p2pim"), "buddy", "list", "--json"]),
            capture_output=True, text=True, timeout=30, env=env,
        )  # fmt: skip
        try:
            if any(b["username"] == peer and b["presence"] == "online" for b in json.loads(proc.stdout)):
                return
        except ValueError:
            pass
        time.sleep(0.2)
    raise LabError(f"{peer} never came online")


def _restart(
    topo: Topology,
    procs: list[JsonProcess],
    old: JsonProcess,
    node: str,
    argv: list[str],
    env: dict[str, str],
) -> JsonProcess:
    """kill -9, then the same command again (it resumes from its profile)."""
    old.proc.kill()
    old.proc.wait(5)
    new = JsonProcess(topo, node, argv, env)
    procs.append(new)
    return new
