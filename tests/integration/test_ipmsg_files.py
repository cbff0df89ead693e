"""IP Messenger attachments on real TCP sockets on loopback: what a stranger on the LAN
can do to the file server (garbage, silence, the wrong address, the wrong file, a crowd),
and downloads from a sender that breaks off, lies about the size, is gone, or a disk that
fills up. The peer here is a socket of this test, so this proves robustness, not interop:
tests/interop/test_iptux.py moves files with the real iptux."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from p2pim.files.events import FileDone, FileFailed, FileOffered
from p2pim.files.store import TransferStore
from p2pim.identity import Identity
from p2pim.lan import ipmsg, ipmsg_files
from p2pim.lan.core import IpmsgFilesOffered, LanCore
from p2pim.messaging.store import ClientStore

from ..conftest import small_disk

TUX_IP, STRANGER_IP = "127.0.0.2", "127.0.0.3"


@dataclass
class Node:
    """What :class:`IpmsgFiles` needs of the LAN node, with no broadcast sockets."""

    core: LanCore
    ipmsg_port: int
    events: list[Any] = field(default_factory=list)

    def kick(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup(tmp: Path, port: int) -> tuple[Node, ipmsg_files.IpmsgFiles]:
    core = LanCore(Identity.generate(), "alice", ClientStore(tmp / "lan.db"), 0)
    core.receive_datagram(
        "ipmsg", ipmsg.encode(1, "root", "vm", ipmsg.BR_ENTRY, b"tux\0"), (TUX_IP, port), 0.0
    )
    node = Node(core, port)
    files = ipmsg_files.IpmsgFiles(node, TransferStore(core.store.conn), node.events.append)  # type: ignore[arg-type]
    return node, files


async def until(probe: Callable[[], object], timeout: float = 10) -> Any:
    end = asyncio.get_running_loop().time() + timeout
    while not (value := probe()):
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.02)
    return value


async def connect(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


def request(number: int, offset: int = 0) -> bytes:
    extra = ipmsg.file_request_extra(1, number, offset)
    return ipmsg.encode(7, "root", "vm", ipmsg.GETFILEDATA, extra) + b"\0"


def test_the_file_server_gives_an_offered_file_only_to_whom_it_was_offered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ipmsg_files, "REQUEST_S", 0.3)
    src = tmp_path / "report.pdf"
    src.write_bytes(os.urandom(3 * ipmsg_files.BLOCK + 123))
    port = free_port()

    async def main() -> None:
        node, files = setup(tmp_path, port)
        listening = socket.create_server(("127.0.0.1", port))
        await files.start(listening)
        t = await files.send("tux", src)
        number = ipmsg_files._number(t.file_id)
        bad = node.core.counters

        async def refused(data: bytes, source: str = TUX_IP) -> bytes:
            reader, writer = await connect(port, source)
            writer.write(data)
            got = await asyncio.wait_for(reader.read(), 5)  # the server closes
            writer.close()
            return got

        assert await refused(b"GET / HTTP/1.1\r\n\r\n\0") == b""  # garbage
        assert await refused(b"") == b""  # silence: closed after REQUEST_S
        assert await refused(request(number), STRANGER_IP) == b""  # not whom it was offered to
        assert await refused(request(number + 1)) == b""  # a file not offered
        assert await refused(request(number, src.stat().st_size + 1)) == b""  # past its end
        assert await refused(b"1:1:u:h:%d:\0" % ipmsg.GETDIRFILES) == b""  # not a folder
        assert bad["ipmsg_file_requests_bad"] == 6
        # a crowd: past MAX_CONNECTIONS, new ones are closed at once and counted
        crowd = [await connect(port, STRANGER_IP) for _ in range(ipmsg_files.MAX_CONNECTIONS)]
        await until(lambda: len(files._connections) == ipmsg_files.MAX_CONNECTIONS)
        reader, writer = await connect(port, TUX_IP)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert bad["ipmsg_connections_refused"] == 1
        for _, w in crowd:
            w.close()
        await until(lambda: not files._connections)
        assert files.store.get(t.file_id).state == "offered"  # type: ignore[union-attr]
        # the peer it was offered to, resuming at an offset (as IP Messenger does)
        reader, writer = await connect(port, TUX_IP)
        writer.write(request(number, 1000))
        got = await asyncio.wait_for(reader.readexactly(src.stat().st_size - 1000), 10)
        writer.close()  # it has them all
        assert got == src.read_bytes()[1000:]
        await until(lambda: any(isinstance(e, FileDone) for e in node.events))
        assert files.store.get(t.file_id).state == "done"  # type: ignore[union-attr]
        await files.close()

    asyncio.run(main())


class Sender:
    """An IP Messenger sender on TUX_IP: each connection is answered by the next behaviour."""

    def __init__(self, port: int, data: bytes, behaviours: list[str]) -> None:
        self.port, self.data, self.behaviours = port, data, behaviours
        self.requests: list[bytes] = []
        self.go = asyncio.Event()
        self.go.set()

    async def start(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, TUX_IP, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests.append(await reader.readuntil(b"\0"))
        behaviour = self.behaviours.pop(0) if self.behaviours else "whole"
        await self.go.wait()
        if behaviour == "half":
            writer.write(self.data[: len(self.data) // 2])
        elif behaviour == "more":  # a liar: more than it offered
            writer.write(self.data + os.urandom(5000))
        else:
            writer.write(self.data)
        await writer.drain()
        writer.close()


def offer(node: Node, files: ipmsg_files.IpmsgFiles, name: str, size: int) -> bytes:
    files.on_event(IpmsgFilesOffered("tux@127.0.0.2", (TUX_IP, node.ipmsg_port), 42,
                                     (ipmsg.Attachment(3, name, size, 0, 1),), b"d" * 16))  # fmt: skip
    [offered] = [e for e in node.events if isinstance(e, FileOffered)]
    assert offered.encrypted is False
    return offered.file_id


def test_a_download_broken_off_starts_again_and_takes_exactly_the_size_offered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ipmsg_files, "RETRY_S", 0.05)
    data = os.urandom(700_000)
    port = free_port()
    downloads = tmp_path / "dl"

    async def main() -> None:
        node, files = setup(tmp_path, port)
        sender = Sender(port, data, ["half", "more"])
        server = await sender.start()
        await files.start(None)
        file_id = offer(node, files, "../../etc/passwd", len(data))
        assert not downloads.exists()  # nothing written before it is accepted
        await files.accept(file_id, downloads)
        done = await until(lambda: [e for e in node.events if isinstance(e, (FileDone, FileFailed))])
        assert isinstance(done[0], FileDone), done
        assert done[0].path == str(downloads / "passwd")  # its own name, inside the folder
        # each try from byte 0 (iptux sends from the start whatever offset is asked)
        assert [ipmsg.file_request(ipmsg.parse(r.rstrip(b"\0"))) for r in sender.requests] == [(42, 3, 0)] * 2
        server.close()
        await files.close()

    asyncio.run(main())
    assert (downloads / "passwd").read_bytes() == data
    assert sorted(p.name for p in downloads.iterdir()) == ["passwd"]  # no .part left


def test_a_sender_that_is_gone_fails_the_download_with_the_reason_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ipmsg_files, "RETRY_S", 0.05)
    downloads = tmp_path / "dl"

    async def main() -> FileFailed:
        node, files = setup(tmp_path, free_port())  # nobody listens there
        await files.start(None)
        await files.accept(offer(node, files, "a.bin", 1000), downloads)
        [failed] = await until(lambda: [e for e in node.events if isinstance(e, FileFailed)])
        assert files.store.list()[0].state == "failed"
        await files.close()
        return failed  # type: ignore[no-any-return]

    failed = asyncio.run(main())
    assert (
        "did not send it" in failed.reason
        and "IP Messenger offers last while the sender runs" in failed.reason
    )
    assert list(downloads.iterdir()) == []


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[Path]:
    with small_disk(tmp_path / "small", "1m") as where:
        yield where


def test_a_disk_that_fills_up_fails_the_download_clearly_and_leaves_nothing(
    tmp_path: Path, tiny: Path
) -> None:
    data = os.urandom(600_000)
    port = free_port()

    async def main() -> FileFailed:
        node, files = setup(tmp_path, port)
        sender = Sender(port, data, [])
        sender.go.clear()  # it waits until the disk is nearly full
        server = await sender.start()
        await files.start(None)
        await files.accept(offer(node, files, "big.iso", len(data)), tiny)  # fits when accepted
        (tiny / "something else").write_bytes(b"x" * 700_000)  # and then it does not
        sender.go.set()
        [failed] = await until(lambda: [e for e in node.events if isinstance(e, FileFailed)])
        assert len(sender.requests) == 1  # a full disk is not tried again
        server.close()
        await files.close()
        return failed  # type: ignore[no-any-return]

    failed = asyncio.run(main())
    assert "No space left on device" in failed.reason
    assert sorted(p.name for p in tiny.iterdir()) == ["something else"]  # no .part, no big.iso
