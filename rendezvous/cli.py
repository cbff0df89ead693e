"""The ``rendezvous`` command.

Exit codes: 0 clean shutdown, 1 could not start (address in use, bad address), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from .stun_server import DEFAULT_BURST, DEFAULT_RATE, StunServerCore
from .stun_service import StunService

EXIT_START_FAILED = 1


def _add_stun_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ip", default="127.0.0.1", help="primary address (default %(default)s)")
    parser.add_argument(
        "--alt-ip",
        help="second address for RFC 5780/3489 change requests; without it the "
        "server answers bindings and refuses to change IP",
    )
    parser.add_argument("--port", type=int, default=3478, help="primary port (default %(default)s)")
    parser.add_argument("--alt-port", type=int, default=3479, help="alternate port (default %(default)s)")
    parser.add_argument(
        "--rate", type=float, default=DEFAULT_RATE, help="requests/s per source IP (default %(default)s)"
    )
    parser.add_argument(
        "--burst", type=float, default=DEFAULT_BURST, help="burst per source IP (default %(default)s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rendezvous", description="p2pim rendezvous server")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    stun = sub.add_parser("stun", help="run the STUN service alone (RFC 8489/5780/3489)")
    _add_stun_arguments(stun)
    return parser


async def _run_stun(args: argparse.Namespace) -> int:
    core = StunServerCore(args.ip, args.port, args.alt_ip, args.alt_port, rate=args.rate, burst=args.burst)
    try:
        service = await StunService.start(core)
    except OSError as exc:
        print(f"rendezvous: cannot bind STUN sockets: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_START_FAILED
    where = ", ".join(f"{ip}:{port}" for ip, port in service.addresses)
    mode = "RFC 5780 (can change IP and port)" if args.alt_ip else "single address (cannot change IP)"
    print(f"rendezvous: STUN on {where}; {mode}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    service.close()
    print("rendezvous: stopped; " + json.dumps(core.counters.as_dict()), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    if args.command == "stun":
        return asyncio.run(_run_stun(args))
    return 2
