"""Real PostgreSQL and NATS servers for benchmarks and tests, each a process of our own.

Debian's ``postgres`` (``/usr/lib/postgresql/*/bin``) and ``nats-server``, on loopback
ports picked free, in a temporary directory removed at :meth:`stop`; stopped by
their pid, never anything else. :meth:`kill` is ``kill -9`` and :meth:`start` brings
the same server back on the same port with its data (PostgreSQL recovers from its WAL).
PostgreSQL refuses to run as root: as root it runs as the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until something accepts on 127.0.0.1:``port`` (or ``proc`` ended: an error)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def wait_port_closed(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
        except OSError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"127.0.0.1:{port} still open after {timeout_s} s")


def postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name}: install Debian's postgresql package")
    return path


class Postgres:
    """A throwaway PostgreSQL cluster; :meth:`new_database` gives each test a database of its own."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="p2pim-pg-"))
        self.port = free_tcp_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._user: dict[str, int] = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            self._user = {"user": pw.pw_uid, "group": pw.pw_gid}
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        subprocess.run(
            [
                postgres_bin("initdb"),
                "-D",
                str(self.dir / "data"),
                "-A",
                "trust",
                "-U",
                "p2pim",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
            **self._user,  # type: ignore[arg-type]
        )
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://p2pim@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql://p2pim@127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        log = open(self.dir / "log", "ab")  # noqa: SIM115 - the server's, closed with it
        self.proc = subprocess.Popen(
            [
                postgres_bin("postgres"), "-D", str(self.dir / "data"), "-p", str(self.port),
                "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
            ],
            stdout=log,
            stderr=log,
            **self._user,  # type: ignore[arg-type]
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 60
        while True:  # accepting TCP is not ready yet: wait until a query answers
            wait_port(self.port, 60, self.proc)
            if self._psql("SELECT 1", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("postgres did not become ready")
            time.sleep(0.1)

    def _psql(self, sql: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [postgres_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "p2pim", "-d", "postgres",
             "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
            capture_output=True,
            check=check,
        )  # fmt: skip

    def new_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        self._psql(f"CREATE DATABASE {name}")
        return self.database_url(name)

    def kill(self) -> None:
        """``kill -9`` of the postmaster; its backends notice and end; the port closes."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        wait_port_closed(self.port)
        deadline = time.monotonic() + 30
        while (self.dir / "data" / "postmaster.pid").exists() and _backends_alive(self.dir / "data"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _backends_alive(data: Path) -> bool:
    """Is any process still attached to the killed cluster's shared memory (its old backends)?"""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (pid_dir / "cmdline").read_bytes()
            if cmd.startswith(b"postgres:") and (pid_dir / "cwd").resolve() == data.resolve():
                return True
    return False


class Nats:
    """Debian's ``nats-server`` on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_tcp_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.proc = subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 30, self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
