"""The references for the file benchmark: bare qh3 and plain TCP moving SIZE bytes.

    copy_peer.py quic-server PORT SIZE     copy_peer.py quic-client HOST PORT SIZE
    copy_peer.py tcp-server PORT SIZE      copy_peer.py tcp-client HOST PORT SIZE

The server prints "ready" once listening; the client sends SIZE bytes, the server
answers once it has them all and prints "cpu SECONDS" (its CPU time from the first
byte), and the client prints the seconds it took (from the first byte to that
answer) and its own CPU seconds. qh3 runs with the same settings p2pim's links use
(1280-byte datagrams, an Ed25519 certificate), with nothing of p2pim's on top:
no file, no chunk hashes, no fsync, no frames.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import time

from nacl.signing import SigningKey
from qh3._hazmat import Ed25519PrivateKey
from qh3.asyncio import connect, serve
from qh3.quic.configuration import QuicConfiguration
from qh3.tls import SignatureAlgorithm, X509Certificate

sys.path.insert(0, __file__.rsplit("/", 2)[0])

from p2pim.quic.cert import certificate, private_key_pkcs8
from p2pim.quic.links import MAX_DATAGRAM

BLOCK = 64 * 1024
ALPN = ["bench"]


async def _take(reader: asyncio.StreamReader, size: int) -> None:
    """Read until ``size`` bytes came (or the stream ended); then say the CPU it took."""
    got, cpu0 = 0, None
    while got < size:
        data = await reader.read(1 << 20)
        if not data:
            break
        if cpu0 is None:
            cpu0 = time.process_time()
        got += len(data)
    print(f"cpu {time.process_time() - (cpu0 or 0):.3f}", flush=True)


async def quic_server(port: int, size: int) -> None:
    key = SigningKey.generate()
    cfg = QuicConfiguration(is_client=False, alpn_protocols=ALPN, max_datagram_size=MAX_DATAGRAM)
    cfg.certificate = X509Certificate(certificate(key))
    cfg.private_key = Ed25519PrivateKey(private_key_pkcs8(key))
    done = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def take() -> None:
            await _take(reader, size)
            writer.write(b"ok")
            await asyncio.sleep(0.5)  # let the answer leave
            done.set()

        task = asyncio.ensure_future(take())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await serve("0.0.0.0", port, configuration=cfg, stream_handler=handler)
    print("ready", flush=True)
    await done.wait()
    server.close()


async def quic_client(host: str, port: int, size: int) -> None:
    cfg = QuicConfiguration(
        is_client=True, alpn_protocols=ALPN, verify_mode=ssl.CERT_NONE,
        signature_algorithms=[SignatureAlgorithm.ED25519], max_datagram_size=MAX_DATAGRAM,
    )  # fmt: skip
    block = b"x" * BLOCK
    async with connect(host, port, configuration=cfg) as proto:
        reader, writer = await proto.create_stream()
        t0, cpu0 = time.monotonic(), time.process_time()
        sent = 0
        while sent < size:
            writer.write(block)
            sent += BLOCK
            if sent % (4 << 20) == 0:
                await asyncio.sleep(0)  # let the event loop send (qh3 buffers the rest)
        await reader.readexactly(2)
        print(f"{time.monotonic() - t0:.3f} {time.process_time() - cpu0:.3f}", flush=True)


async def tcp_server(port: int, size: int) -> None:
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _take(reader, size)
        writer.write(b"ok")
        await writer.drain()
        writer.close()
        done.set()

    server = await asyncio.start_server(handle, "0.0.0.0", port)
    print("ready", flush=True)
    await done.wait()
    server.close()


async def tcp_client(host: str, port: int, size: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    block = b"x" * BLOCK
    t0, cpu0 = time.monotonic(), time.process_time()
    sent = 0
    while sent < size:
        writer.write(block)
        sent += BLOCK
        await writer.drain()
    await reader.readexactly(2)
    print(f"{time.monotonic() - t0:.3f} {time.process_time() - cpu0:.3f}", flush=True)


def main() -> None:
    mode, *rest = sys.argv[1:]
    if mode.endswith("server"):
        port, size = int(rest[0]), int(rest[1])
        asyncio.run((quic_server if mode.startswith("quic") else tcp_server)(port, size))
    else:
        host, port, size = rest[0], int(rest[1]), int(rest[2])
        asyncio.run((quic_client if mode.startswith("quic") else tcp_client)(host, port, size))


if __name__ == "__main__":
    main()
