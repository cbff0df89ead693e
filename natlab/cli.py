"""The ``natlab`` command (needs root, iproute2 and nftables).

Exit codes: 0 ok, 1 a lab command failed or a classification was wrong, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .classify import classify, render
from .netns import LabError, missing_requirements
from .profiles import PROFILES, NatProfile
from .topology import STATE_DIR, Topology, down_all, standard


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profiles",
        default=",".join(PROFILES),
        help="comma-separated NAT profiles (default: all: %(default)s)",
    )
    p.add_argument("--hairpin", action="store_true", help="NATs hairpin")
    p.add_argument("--udp-timeout", type=int, metavar="S", help="NAT UDP binding timeout (s)")
    p.add_argument("--loss", type=int, default=0, metavar="PCT", help="random loss on each NAT, percent")
    p.add_argument("--block-udp", action="store_true", help="NATs drop all UDP")
    p.add_argument(
        "--no-input-firewall",
        dest="input_firewall",
        action="store_false",
        help="NATs let unsolicited UDP reach their own stack, which answers ICMP (plain masquerade)",
    )
    p.add_argument(
        "--portmap",
        nargs="?",
        const="all",
        default="",
        choices=("all", "upnp"),
        help="NATs run miniupnpd: UPnP IGD, NAT-PMP and PCP (all), or UPnP IGD only (upnp)",
    )


def _profiles(args: argparse.Namespace) -> list[NatProfile]:
    kinds = [k.strip() for k in args.profiles.split(",") if k.strip()]
    return [
        NatProfile(
            k,
            args.hairpin,
            args.udp_timeout,
            args.loss,
            args.block_udp and k != "none",
            args.input_firewall,
            args.portmap if k != "none" else "",
        )
        for k in kinds
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="natlab", description="real kernel NATs in network namespaces")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="build the standard topology and leave it running")
    up.add_argument("--prefix", help="namespace prefix (default: a new nl-XXXXXX)")
    up.add_argument("--hosts", type=int, default=1, help="hosts behind each NAT (default 1)")
    up.add_argument(
        "--hop", action="store_true", help="a core router between the public segment and the NATs"
    )
    up.add_argument("--ipv6", action="store_true", help="global IPv6 too, behind stateful firewalls (no NAT)")
    _profile_args(up)

    ex = sub.add_parser("exec", help="run a command in a node: natlab exec PREFIX NODE -- CMD...")
    ex.add_argument("prefix")
    ex.add_argument("node")
    ex.add_argument("argv", nargs=argparse.REMAINDER)

    down = sub.add_parser("down", help="tear down a topology, or --all leftovers")
    down.add_argument("prefix", nargs="?")
    down.add_argument("--all", action="store_true", help="remove every natlab namespace")

    sub.add_parser("list", help="topologies made by `natlab up`")

    cl = sub.add_parser("classify", help="run `p2pim nat` behind each profile: expected vs observed")
    _profile_args(cl)
    cl.add_argument("--json", action="store_true")

    mx = sub.add_parser(
        "matrix",
        help="two p2pim clients behind every pair of NAT profiles (and one LAN): path, timings, delivery",
    )
    mx.add_argument("--json", action="store_true", help="print JSON instead of a table")
    mx.add_argument("--png", metavar="FILE", help="also draw the grid as a PNG picture")
    mx.add_argument("--messages", type=int, default=100, help="messages each way (default 100)")
    mx.add_argument(
        "--only",
        action="append",
        metavar="A/B",
        help="run only this pair, e.g. symmetric/port-restricted or same-lan (repeatable)",
    )
    mx.add_argument(
        "--no-input-firewall",
        dest="input_firewall",
        action="store_false",
        help="routers without an input firewall (plain masquerade: their stack answers ICMP)",
    )
    mx.add_argument("--hop", action="store_true", help="a core router between the NATs (TTL matters)")
    mx.add_argument(
        "--portmap",
        choices=("a", "b", "both"),
        help="routers that run miniupnpd (UPnP IGD, NAT-PMP, PCP): alice's, bob's or both",
    )
    mx.add_argument("--portmap-upnp-only", action="store_true", help="... serving UPnP IGD only")
    mx.add_argument(
        "--ipv6", action="store_true", help="hosts have global IPv6 too, behind stateful firewalls"
    )
    mx.add_argument(
        "--nat444",
        action="store_true",
        help="instead of the pairs: home NATs behind a carrier-grade NAT (one side, or both behind one)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reason = missing_requirements()
    if reason and args.command != "list":
        print(f"natlab: {reason}", file=sys.stderr)
        return 1
    try:
        return _dispatch(args)
    except (LabError, ValueError) as exc:
        print(f"natlab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "up":
        topo = standard(args.prefix, _profiles(args), hosts_per_nat=args.hosts, hop=args.hop, ipv6=args.ipv6)
        topo.save()
        print(json.dumps(topo.describe(), indent=2))
        print(
            f"natlab: up as {topo.prefix}; `natlab exec {topo.prefix} NODE -- CMD`, "
            f"`natlab down {topo.prefix}`",
            file=sys.stderr,
        )
        return 0
    if args.command == "exec":
        topo = Topology.load(args.prefix)
        cmd = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if args.node not in topo.nodes or not cmd:
            raise LabError(f"usage: natlab exec PREFIX NODE -- CMD (nodes: {', '.join(topo.nodes)})")
        return subprocess.call(topo.cmd(args.node, cmd))
    if args.command == "down":
        if args.all:
            gone = down_all()
            print(f"natlab: removed {len(gone)} namespaces")
            return 0
        if not args.prefix:
            raise LabError("say which topology (natlab down PREFIX) or --all")
        Topology.load(args.prefix).down()
        return 0
    if args.command == "list":
        for f in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.exists() else []:
            d = json.loads(f.read_text())
            print(d["prefix"], " ".join(d["nodes"]))
        return 0
    if args.command == "classify":
        rows = classify(_profiles(args))
        if args.json:
            print(json.dumps([r.as_dict() for r in rows], indent=2))
        else:
            print(render(rows))
        return 0 if all(r.ok for r in rows) else 1
    if args.command == "matrix":
        return _matrix(args)
    return 2


def _matrix(args: argparse.Namespace) -> int:
    from . import matrix

    only = None
    if args.only:
        only = []
        for item in args.only:
            a, _, b = item.partition("/")
            b = b or a
            if {a, b} - {*matrix.KINDS, matrix.SAME_LAN}:
                raise LabError(f"unknown pair {item!r}: profiles are {', '.join(matrix.KINDS)} or same-lan")
            only.append((a, b))
    if not 1 <= args.messages <= 10000:
        raise LabError("--messages takes 1 to 10000")

    def progress(r: matrix.Result) -> None:
        if not args.json:
            print(matrix.render([r]).splitlines()[2], file=sys.stderr, flush=True)

    routers = matrix.Routers(
        input_firewall=args.input_firewall,
        hop=args.hop,
        portmap=args.portmap or "",
        portmap_kind="upnp" if args.portmap_upnp_only else "all",
        ipv6=args.ipv6,
    )
    if args.nat444:
        results = []
        for name in matrix.NAT444:
            results.append(matrix.nat444_scenario(name, args.messages, routers))
            progress(results[-1])
    else:
        results = matrix.run_matrix(only, args.messages, progress, routers)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        print(matrix.render(results))
    if args.png:
        matrix.picture(results, Path(args.png))
    return 0 if all(r.exactly_once and not r.error for r in results) else 1
