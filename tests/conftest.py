"""Shared fixtures: free ports, the real `rendezvous stun` on loopback, lab guard."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.services import Nats, Postgres, postgres_bin
from natlab.classify import tool


def free_udp_ports(n: int, ip: str = "127.0.0.1") -> list[int]:
    """``n`` UDP ports free on ``ip`` right now (bound together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((ip, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class StunProcess:
    def __init__(
        self, proc: subprocess.Popen[str], ip: str, port: int, alt_ip: str | None, alt_port: int
    ) -> None:
        self.proc, self.ip, self.port, self.alt_ip, self.alt_port = proc, ip, port, alt_ip, alt_port

    @property
    def server(self) -> str:
        return f"{self.ip}:{self.port}"

    def stop(self) -> str:
        """Stop it (SIGTERM, by pid) and return what it printed."""
        if self.proc.poll() is None:
            self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return out


def start_stun(alt_ip: str | None = "127.0.0.2", extra: tuple[str, ...] = ()) -> StunProcess:
    port, alt_port = free_udp_ports(2)
    argv = [tool("rendezvous"), "stun", "--ip", "127.0.0.1", "--port", str(port), "--alt-port", str(alt_port)]
    if alt_ip:
        argv += ["--alt-ip", alt_ip]
    proc = subprocess.Popen([*argv, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    banner = proc.stdout.readline()
    if "STUN on" not in banner:
        proc.kill()
        raise RuntimeError(f"rendezvous stun did not start: {banner}")
    return StunProcess(proc, "127.0.0.1", port, alt_ip, alt_port)


@pytest.fixture
def stun_server() -> Iterator[StunProcess]:
    srv = start_stun()
    yield srv
    srv.stop()


@pytest.fixture
def single_address_server() -> Iterator[StunProcess]:
    srv = start_stun(alt_ip=None)
    yield srv
    srv.stop()


def run_p2pim(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("p2pim"), *args], capture_output=True, text=True, timeout=timeout)


def free_tcp_port(ip: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


class RendezvousProcess:
    """A real ``rendezvous serve`` on loopback, with its own database file (or PostgreSQL URL)."""

    def __init__(
        self, db: Path | str, extra: tuple[str, ...] = (), port: int | None = None, files: int | None = None
    ) -> None:
        """``files``: the server's open-file limit (soft and hard), to run it out of descriptors."""
        self.db = db
        self.extra = extra
        self.files = files
        self.port = port or free_tcp_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        argv = [tool("rendezvous"), "serve", "--port", str(self.port), "--db", str(self.db)]
        if "--stun-port" not in self.extra:
            argv.append("--no-stun")
        argv += ["--kdf-cost", "min", *self.extra]
        files = self.files

        def limit() -> None:
            if files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=limit
        )
        assert self.proc.stdout is not None
        banner = self.proc.stdout.readline()
        if "control on" not in banner:
            self.proc.kill()
            raise RuntimeError(f"rendezvous serve did not start: {banner}{self.proc.stdout.read()}")

    def stop(self) -> str:
        """SIGTERM (by pid) and return what it printed."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return out

    def kill(self) -> None:
        """kill -9: no chance to flush or say goodbye."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def rendezvous(tmp_path: Path) -> Iterator[RendezvousProcess]:
    srv = RendezvousProcess(tmp_path / "server.db", ("--heartbeat", "2"))
    yield srv
    srv.stop()


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` ("1m") at ``where``: a disk that really fills up. Mounting needs
    root (as in CI, and as the lab tests need); elsewhere the test is skipped with why."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One real PostgreSQL for the session (Debian's); each test takes a database of its own."""
    try:
        postgres_bin("postgres")
    except FileNotFoundError:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql as root)")
    server = Postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The server's store on each engine: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "server.db")
    server: Postgres = request.getfixturevalue("postgres")
    return server.new_database()


@pytest.fixture
def nats() -> Iterator[Nats]:
    """A real ``nats-server`` (Debian's) of this test's own."""
    if shutil.which("nats-server") is None and not os.path.exists("/usr/sbin/nats-server"):
        pytest.skip("nats-server is not installed (make test installs Debian's as root)")
    server = Nats()
    try:
        yield server
    finally:
        server.stop()
