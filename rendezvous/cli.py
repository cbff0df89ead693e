"""The ``rendezvous`` command.

Exit codes: 0 clean shutdown, 1 could not start (address in use, bad address,
unreadable database or certificate), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path

from .passwords import COSTS
from .sql import is_postgres, without_credentials
from .stun_server import DEFAULT_BURST, DEFAULT_RATE, StunServerCore
from .stun_service import StunService

EXIT_START_FAILED = 1
WORKER_SETTLE_S = 5.0  # a worker that lived this long started well
WORKER_MAX_QUICK_DEATHS = 5


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
    serve = sub.add_parser(
        "serve",
        help="run the rendezvous: accounts, buddies, presence, relay, offline store, and STUN",
        description="WebSocket control endpoint plus the STUN service. Prints one line when ready; "
        "on SIGTERM/SIGINT prints its counters as JSON and exits 0.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="control address (default %(default)s)")
    serve.add_argument("--port", type=int, default=7788, help="control TCP port (default %(default)s)")
    serve.add_argument("--tls-cert", help="PEM certificate chain: serve wss:// instead of ws://")
    serve.add_argument("--tls-key", help="PEM private key for --tls-cert")
    serve.add_argument(
        "--db",
        help=f"SQLite file, or postgresql://USER@HOST/DB for a cluster's shared state (password in "
        f"$PGPASSWORD or ~/.pgpass) (default {default_db()})",
    )
    serve.add_argument(
        "--kdf-cost",
        choices=sorted(COSTS),
        default="interactive",
        help="argon2id cost for new password hashes (default %(default)s; 'min' only for tests)",
    )
    serve.add_argument("--heartbeat", type=int, default=20, help="ping interval and timeout, s (default 20)")
    serve.add_argument("--login-ip-rate", type=float, default=5.0, help="logins/s per address (default 5)")
    serve.add_argument(
        "--login-ip-burst", type=float, default=50, help="login burst per address (default 50)"
    )
    serve.add_argument(
        "--register-ip-rate",
        type=float,
        default=1 / 60,
        help="new accounts/s per address (default one a minute)",
    )
    serve.add_argument(
        "--register-ip-burst", type=float, default=10, help="new-account burst per address (default 10)"
    )
    serve.add_argument(
        "--offline-quota", type=int, default=2000, help="offline envelopes per user (default 2000)"
    )
    serve.add_argument(
        "--offline-sender-quota",
        type=int,
        default=500,
        help="of those, at most this many from one sender (default 500)",
    )
    serve.add_argument(
        "--login-deadline", type=float, default=20.0, help="close connections not logged in by then, s (20)"
    )
    serve.add_argument(
        "--max-connections", type=int, default=0, help="connections in all (default: the open-file limit)"
    )
    serve.add_argument(
        "--max-per-ip", type=int, default=128, help="connections per source address (default 128)"
    )
    serve.add_argument(
        "--max-pending-per-ip",
        type=int,
        default=16,
        help="connections per source address not logged in yet (default 16)",
    )
    serve.add_argument(
        "--send-queue-kb",
        type=int,
        default=1024,
        help="frames queued for one connection before it counts as not reading, KiB (default 1024)",
    )
    serve.add_argument(
        "--offline-days", type=float, default=30, help="offline envelope expiry (default 30 days)"
    )
    serve.add_argument(
        "--relay-kbps",
        type=float,
        default=8192,
        help="relayed KiB/s per user, bursts of 2 s of it (file transfers without a direct path; "
        "default 8192)",
    )
    serve.add_argument(
        "--group-max-members",
        type=int,
        default=256,
        help="members per group, invited ones included (default 256)",
    )
    serve.add_argument(
        "--group-max-per-user",
        type=int,
        default=100,
        help="groups one user may be in or invited to (default 100)",
    )
    cluster = serve.add_argument_group("several processes or machines (PostgreSQL and a NATS bus)")
    cluster.add_argument("--bus", metavar="NATS_URL", help="nats://HOST:PORT[,...]: the bus between nodes")
    cluster.add_argument(
        "--node", help="this node's name, unique in the cluster (default HOSTNAME-PORT; -wI per worker)"
    )
    cluster.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing --port (SO_REUSEPORT), each a node (default 1)",
    )
    cluster.add_argument("--worker-index", type=int, default=-1, help=argparse.SUPPRESS)
    ops = serve.add_argument_group("operations")
    ops.add_argument(
        "--ops-port", type=int, default=0, help="/healthz, /readyz, /metrics here (0: off; +I per worker)"
    )
    ops.add_argument("--ops-host", default="127.0.0.1", help="address for --ops-port (default %(default)s)")
    ops.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log lines (default text)"
    )
    ops.add_argument(
        "--drain-s",
        type=float,
        default=10.0,
        help="on SIGTERM: clients are told to move; wait this long for them to go (default 10)",
    )
    mail = serve.add_argument_group("email notices (an SMTP server to send through)")
    mail.add_argument("--smtp", metavar="HOST[:PORT]", help="send verification codes and notices through it")
    mail.add_argument("--smtp-user", default="", help="log in to the SMTP server as this user")
    mail.add_argument(
        "--smtp-password-file", help="the SMTP password, read from this file (not the command line)"
    )
    mail.add_argument("--smtp-starttls", action="store_true", help="STARTTLS (typically port 587)")
    mail.add_argument("--smtp-tls", action="store_true", help="TLS from the start (typically port 465)")
    mail.add_argument("--mail-from", default="p2pim@localhost", help="the From address (default %(default)s)")
    mail.add_argument(
        "--notice-min-s",
        type=float,
        default=60,
        help="the shortest notice delay and period a user may choose, seconds (default 60)",
    )
    mail.add_argument(
        "--notice-sweep-s", type=float, default=30, help="how often notices are looked for (default 30 s)"
    )
    serve.add_argument("--stun-ip", help="STUN primary address (default: --host)")
    serve.add_argument("--alt-ip", help="second STUN address for RFC 5780/3489 change requests")
    serve.add_argument("--stun-port", type=int, default=3478, help="STUN port (default %(default)s)")
    serve.add_argument("--stun-alt-port", type=int, default=3479, help="STUN alternate port (default 3479)")
    serve.add_argument("--no-stun", action="store_true", help="do not run the STUN service")
    return parser


def default_db() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "p2pim-rendezvous" / "rendezvous.db"


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _node_name(args: argparse.Namespace) -> str:
    base = args.node or re.sub(r"[^A-Za-z0-9_.-]", "-", f"{socket.gethostname()}-{args.port}")[:60]
    return f"{base}-w{args.worker_index}" if args.worker_index >= 0 else base


def _check_cluster(args: argparse.Namespace) -> str | None:
    """What is wrong with the cluster options, if anything."""
    postgres = is_postgres(args.db or "")
    if args.workers < 1:
        return "--workers is 1 or more"
    if args.workers > 1 and not args.bus:
        return "--workers needs --bus (the workers are nodes of one cluster)"
    if args.bus and not postgres:
        return "--bus needs --db postgresql://... (the nodes share their state there, not in a SQLite file)"
    if args.bus and args.node and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", args.node):
        return "--node is 1-64 letters, digits, '.', '-' or '_' (it names a bus subject)"
    return None


def _run_workers(args: argparse.Namespace, argv: list[str]) -> int:
    """``--workers N``: N processes, each a node, sharing the port; SIGTERM/SIGINT go to all
    (each drains); one that dies is started again after a second."""
    base = [sys.executable, "-m", "rendezvous", *argv, "--node", _node_name(args)]
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(args.workers):
        procs[i] = subprocess.Popen([*base, "--worker-index", str(i)])
    print(
        f"rendezvous: {args.workers} workers on port {args.port} (pids {[p.pid for p in procs.values()]})",
        flush=True,
    )
    started = dict.fromkeys(procs, time.monotonic())
    quick = 0  # workers that died within WORKER_SETTLE_S of starting, in a row
    failed = 0
    while procs:
        for i, p in list(procs.items()):
            code = p.poll()
            if code is None:
                continue
            if stopping:
                del procs[i]
                failed = failed or code
                continue
            # A worker died: its clients reconnect to the others; start it again, unless
            # workers keep dying at once (a port in use, the database refusing): then stop.
            quick = quick + 1 if time.monotonic() - started[i] < WORKER_SETTLE_S else 0
            if quick >= WORKER_MAX_QUICK_DEATHS:
                print(f"rendezvous: workers keep exiting at start (last: {code}); stopping", file=sys.stderr)
                stop(signal.SIGTERM, None)
                failed = EXIT_START_FAILED
                continue
            print(
                f"rendezvous: worker {i} exited with {code}; starting it again", file=sys.stderr, flush=True
            )
            time.sleep(1.0)
            procs[i] = subprocess.Popen([*base, "--worker-index", str(i)])
            started[i] = time.monotonic()
        time.sleep(0.2)
    return failed


async def _run_serve(args: argparse.Namespace) -> int:
    from .bus import BusUnavailable
    from .db import Database, SchemaTooNew, StoreUnavailable
    from .hub import Hub, Limits
    from .mail import MailConfig, Mailer
    from .ops import Ops
    from .passwords import PasswordHasher
    from .server import RendezvousServer

    if bool(args.tls_cert) != bool(args.tls_key):
        print("rendezvous: give both --tls-cert and --tls-key", file=sys.stderr)
        return 2
    tls = None
    if args.tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            tls.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(f"rendezvous: cannot load TLS certificate: {exc}", file=sys.stderr)
            return EXIT_START_FAILED
    try:
        limits = Limits(
            heartbeat_s=args.heartbeat,
            login_ip_rate=args.login_ip_rate,
            login_ip_burst=args.login_ip_burst,
            register_ip_rate=args.register_ip_rate,
            register_ip_burst=args.register_ip_burst,
            offline_max_envelopes=args.offline_quota,
            offline_sender_envelopes=args.offline_sender_quota,
            offline_max_age_s=args.offline_days * 86400,
            login_deadline_s=args.login_deadline,
            max_connections=args.max_connections,
            max_connections_per_ip=args.max_per_ip,
            max_pending_per_ip=args.max_pending_per_ip,
            send_queue_bytes=args.send_queue_kb * 1024,
            relay_bytes_rate=args.relay_kbps * 1024,
            relay_bytes_burst=max(128 * 1024, args.relay_kbps * 2048),
            group_max_members=args.group_max_members,
            group_max_per_user=args.group_max_per_user,
            notice_min_s=args.notice_min_s,
            notice_sweep_s=args.notice_sweep_s,
        )
        mailer = None
        if args.smtp:
            password = Path(args.smtp_password_file).read_text().strip() if args.smtp_password_file else ""
            mailer = Mailer(
                MailConfig.parse(
                    args.smtp, sender=args.mail_from, username=args.smtp_user, password=password,
                    starttls=args.smtp_starttls, tls=args.smtp_tls,
                )
            )  # fmt: skip
    except OSError as exc:
        print(f"rendezvous: cannot read the SMTP password: {exc.strerror}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"rendezvous: {exc}", file=sys.stderr)
        return 2
    db_path = args.db or str(default_db())
    try:
        db = Database(db_path)
    except (SchemaTooNew, sqlite3.Error, OSError, StoreUnavailable) as exc:
        print(f"rendezvous: cannot open database {without_credentials(db_path)}: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    node = _node_name(args)
    hub = Hub(db, limits, mail=mailer is not None, node=node if args.bus else "")
    server = RendezvousServer(hub, PasswordHasher(args.kdf_cost), mailer, bus_url=args.bus or "")
    stun = ops = None
    try:
        await server.start(args.host, args.port, tls, reuse_port=args.worker_index >= 0)
        if args.ops_port:
            ops = Ops(server, node)
            await ops.start(args.ops_host, args.ops_port + max(0, args.worker_index))
        if not args.no_stun and args.worker_index <= 0:  # one worker answers STUN (it keeps no state)
            stun_ip = args.stun_ip or args.host
            core = StunServerCore(stun_ip, args.stun_port, args.alt_ip, args.stun_alt_port)
            stun = await StunService.start(core)
            public = "" if stun_ip in ("0.0.0.0", "::") else stun_ip
            hub.stun = [(public, args.stun_port), (public, args.stun_alt_port)]
    except OSError as exc:
        print(f"rendezvous: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        await server.close()
        return EXIT_START_FAILED
    except BusUnavailable as exc:
        print(f"rendezvous: {exc}", file=sys.stderr)
        await server.close()
        return EXIT_START_FAILED
    scheme = "wss" if tls else "ws"
    where = f"{scheme}://{args.host}:{server.port}"
    stun_text = ", ".join(f"{ip}:{port}" for ip, port in stun.addresses) if stun else "off"
    in_cluster = f"; node {node} on {without_credentials(args.bus)}" if args.bus else ""
    print(
        f"rendezvous: control on {where}; STUN on {stun_text}; database {without_credentials(db_path)}; "
        f"up to {server.admission.max_total} connections{in_cluster}",
        flush=True,
    )
    await _wait_for_signal()
    await server.drain(args.drain_s)
    await server.close()
    if ops is not None:
        await ops.close()
    if stun is not None:
        stun.close()
    db.close()
    counters = hub.counters.as_dict()
    if stun is not None:
        counters.update({f"stun_{k}": v for k, v in stun.core.counters.as_dict().items()})
    print("rendezvous: stopped; " + json.dumps(counters), flush=True)
    return 0


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
    await _wait_for_signal()
    service.close()
    print("rendezvous: stopped; " + json.dumps(core.counters.as_dict()), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING
    if args.command == "serve" and args.log_format == "json":
        from .ops import JsonFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter(_node_name(args)))
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level)
    if args.command == "stun":
        return asyncio.run(_run_stun(args))
    if args.command == "serve":
        problem = _check_cluster(args)
        if problem:
            print(f"rendezvous: {problem}", file=sys.stderr)
            return 2
        if args.workers > 1 and args.worker_index < 0:
            return _run_workers(args, _without(argv, "--workers"))
        return asyncio.run(_run_serve(args))
    return 2


def _without(argv: list[str], option: str) -> list[str]:
    """``argv`` less ``option`` and its value (``--opt V`` or ``--opt=V``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out
