"""`natlab matrix`: two real clients behind every pair of NAT profiles.

For each scenario (every unordered pair of the five profiles, plus two hosts
on the same LAN behind one NAT) this builds a fresh topology, with the router
kind asked for (:class:`Routers`: textbook home routers that drop unsolicited
UDP, or plain ``masquerade`` gateways without that input firewall; with or
without a core router between the NATs), runs
`rendezvous serve` on the public segment, registers alice and bob with the
`p2pim` command, makes them buddies, and runs `p2pim chat --json` on both
sides. Each side types ``messages`` lines; we read both event streams and
report the final path, the time to the first delivered message, the time
until the path went direct, what arrived, and duplicates.

As with `natlab classify`, nothing here imports p2pim: it drives the
commands a user would run.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .classify import STUN_ALT_IP, STUN_IP, tool
from .netns import LabError
from .profiles import NatProfile
from .topology import Topology, nat444, new_prefix, standard

KINDS = ("none", "full-cone", "restricted", "port-restricted", "symmetric")
SAME_LAN = "same-lan"
PASSWORD = "natlab-matrix-pw"
CONTROL_PORT = 7788


@dataclass(frozen=True)
class Routers:
    """What kind of NAT routers a matrix runs on."""

    input_firewall: bool = True  # unsolicited UDP to the router is dropped (home routers)
    hop: bool = False  # a core router between the NATs (TTL matters)
    portmap: str = ""  # routers running miniupnpd: "a" (alice's), "b" (bob's), "both" or ""
    portmap_kind: str = "all"  # what they serve: "all" (UPnP IGD, NAT-PMP, PCP) or "upnp"
    ipv6: bool = False  # hosts have global IPv6 too (no NAT, a stateful firewall), and the hop

    @property
    def name(self) -> str:
        parts = ["input firewall" if self.input_firewall else "no input firewall"]
        if self.hop or self.portmap or self.ipv6:
            parts.append("router hop")
        if self.ipv6:
            parts.append("IPv6 behind stateful firewalls")
        if self.portmap:
            who = {"a": "alice's router", "b": "bob's router", "both": "both routers"}[self.portmap]
            what = "UPnP only" if self.portmap_kind == "upnp" else "PCP/NAT-PMP/UPnP"
            parts.append(f"port mapping ({what}) on {who}")
        return ", ".join(parts)

    def maps(self, side: str) -> bool:
        return self.portmap in (side, "both")


TEXTBOOK = Routers()
OPEN = Routers(input_firewall=False, hop=True)


@dataclass
class Result:
    a: str
    b: str
    messages: int  # sent each way
    routers: str = TEXTBOOK.name
    path_a: str = "relay"  # final path, as each side saw it
    path_b: str = "relay"
    addr_a: str = ""  # where alice's direct path goes (bob's address as alice sees it)
    addr_b: str = ""
    first_message_s: float | None = None  # first line typed -> first delivered anywhere
    direct_after_s: float | None = None  # both online -> first side direct
    delivered_ab: int = 0  # distinct texts that arrived
    delivered_ba: int = 0
    duplicates: int = 0
    sent_direct: int = 0  # envelopes (texts and receipts) each side sent direct / by relay
    sent_relay: int = 0
    fallbacks: int = 0  # times a side went from direct back to the relay
    seconds: float = 0.0
    error: str = ""
    notes: list[str] = field(default_factory=list)
    path_log: list[str] = field(default_factory=list)  # every path change, seconds after the first message

    @property
    def name(self) -> str:
        return f"{self.a} / {self.b}"

    @property
    def exactly_once(self) -> bool:
        return self.delivered_ab == self.messages == self.delivered_ba and self.duplicates == 0

    @property
    def direct(self) -> bool:
        return self.path_a == "direct" and self.path_b == "direct"

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "exactly_once": self.exactly_once, "direct": self.direct}


def scenarios() -> list[tuple[str, str]]:
    """The 15 unordered pairs of profiles, plus the same LAN."""
    pairs = list(itertools.combinations_with_replacement(KINDS, 2))
    return [*pairs, (SAME_LAN, SAME_LAN)]


def profile(
    kind: str,
    loss: int = 0,
    block_udp: bool = False,
    udp_timeout: int | None = None,
    routers: Routers = TEXTBOOK,
    side: str = "a",
) -> NatProfile:
    return NatProfile(
        kind,
        loss=loss,
        block_udp=block_udp,
        udp_timeout=udp_timeout,
        input_firewall=routers.input_firewall,
        portmap=routers.portmap_kind if routers.maps(side) and kind != "none" else "",
    )


class JsonProcess:
    """A command that prints JSON lines (`p2pim chat --json`, `p2pim lan --json`) in a node;
    its events are read on a thread and stamped with the time they arrived."""

    def __init__(self, topo: Topology, node: str, argv: Sequence[str], env: dict[str, str]) -> None:
        self.proc = topo.popen(
            node, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.events: queue.Queue[tuple[float, dict[str, object]]] = queue.Queue()
        self.log: list[tuple[float, dict[str, object]]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            stamped = (time.monotonic(), ev)
            self.log.append(stamped)
            self.events.put(stamped)

    def wait(self, pred: Callable[[dict[str, object]], bool], timeout: float) -> float | None:
        """Arrival time of the first event matching ``pred`` (also ones already seen)."""
        for at, ev in list(self.log):
            if pred(ev):
                return at
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                at, ev = self.events.get(timeout=left)
            except queue.Empty:
                return None
            if pred(ev):
                return at
        return None

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(5)
        self._thread.join(5)
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


def _chat_argv(peer: str) -> list[str]:
    return [tool("p2pim"), "chat", peer, "--json", "--linger", "30"]


def _p2pim(topo: Topology, node: str, env: dict[str, str], *args: str) -> None:
    proc = subprocess.run(
        topo.cmd(node, [tool("p2pim"), *args]), capture_output=True, text=True, timeout=60, env=env
    )
    if proc.returncode != 0:
        raise LabError(f"p2pim {' '.join(args)} on {node}: {proc.stderr.strip() or proc.stdout.strip()}")


def start_pair(
    topo: Topology, tmp: str, host_a: str, host_b: str, extra: Sequence[str] = ()
) -> tuple[subprocess.Popen[str], dict[str, dict[str, str]]]:
    """The real `rendezvous serve` on the public segment, and alice (on ``host_a``) and bob
    (on ``host_b``) registered there as buddies; returns the server and each one's
    environment for `p2pim` (profile, server, password). The caller stops the server."""
    server = topo.popen(
        "rdv",
        [
            tool("rendezvous"), "serve", "--host", STUN_IP, "--port", str(CONTROL_PORT),
            "--alt-ip", STUN_ALT_IP, "--db", f"{tmp}/server.db", "--kdf-cost", "min",
            "--heartbeat", "5", *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert server.stdout is not None
    banner = server.stdout.readline()
    if "control on" not in banner:
        server.kill()
        raise LabError(f"rendezvous serve did not start: {banner.strip()}")
    envs = {}
    for who in ("alice", "bob"):
        envs[who] = {
            **os.environ,
            "XDG_DATA_HOME": f"{tmp}/{who}",
            "P2PIM_SERVER": f"ws://{STUN_IP}:{CONTROL_PORT}",
            "P2PIM_PASSWORD": PASSWORD,
            "P2PIM_PROFILE": who,
        }
    try:
        _p2pim(topo, host_a, envs["alice"], "register", "alice")
        _p2pim(topo, host_b, envs["bob"], "register", "bob")
        _p2pim(topo, host_a, envs["alice"], "buddy", "add", "bob")
        _p2pim(topo, host_b, envs["bob"], "buddy", "accept", "alice")
    except LabError:
        server.kill()
        raise
    return server, envs


def stop_all(topo: Topology, procs: Sequence[JsonProcess], server: subprocess.Popen[str] | None) -> None:
    """Kill what is left of ``procs``, stop the server (SIGTERM, then SIGKILL), take the
    topology down: every scenario ends this way, also on failure."""
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(5)
    if server is not None and server.poll() is None:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    topo.down()


def run_scenario(
    a: NatProfile | str,
    b: NatProfile | str,
    messages: int = 100,
    interval: float = 0.1,
    during: Callable[[Topology, int], None] | None = None,
    prefix: str | None = None,
    routers: Routers = TEXTBOOK,
    after: Callable[[Topology, Result], None] | None = None,
    topology: Callable[[str], tuple[Topology, str, str]] | None = None,
) -> Result:
    """alice behind ``a``, bob behind ``b`` (or both on one LAN for :data:`SAME_LAN`).

    ``during(topo, i)`` is called before alice's i-th message (to flush NAT
    state mid-chat, say); ``after(topo, result)`` once both chats have ended, before
    the topology goes (to look at what they left on the routers). Always tears it down.
    ``topology(prefix)``: build another topology than the standard one (NAT444, say); it
    returns it with alice's and bob's hosts, and ``a``/``b`` only name the scenario.
    """
    names = (str(a), str(b))
    same_lan = a == SAME_LAN
    if topology is not None:  # a and b only name the scenario
        a = b = NatProfile("port-restricted")
    pa = (
        profile("port-restricted", routers=routers)
        if same_lan
        else (a if isinstance(a, NatProfile) else profile(a, routers=routers))
    )
    pb = pa if same_lan else (b if isinstance(b, NatProfile) else profile(b, routers=routers, side="b"))
    result = Result(
        SAME_LAN if same_lan else pa.kind, SAME_LAN if same_lan else pb.kind, messages, routers.name
    )
    started = time.monotonic()
    if topology is not None:
        result.a, result.b = names
        topo, host_a, host_b = topology(prefix or new_prefix())
    else:
        topo = standard(
            prefix or new_prefix(),
            [pa] if same_lan else [pa, pb],
            hosts_per_nat=2 if same_lan else 1,
            hop=routers.hop,
            ipv6=routers.ipv6,
        )
        host_a, host_b = ("h1", "h1b") if same_lan else ("h1", "h2")
    chats: list[JsonProcess] = []
    server: subprocess.Popen[str] | None = None
    with tempfile.TemporaryDirectory(prefix="natlab-matrix-") as tmp:
        try:
            server, envs = start_pair(topo, tmp, host_a, host_b)
            chat_a = JsonProcess(topo, host_a, _chat_argv("bob"), envs["alice"])
            chats.append(chat_a)
            if chat_a.wait(lambda e: e.get("event") == "ready", 20) is None:
                raise LabError("alice's p2pim chat did not start")
            chat_b = JsonProcess(topo, host_b, _chat_argv("alice"), envs["bob"])
            chats.append(chat_b)
            online = chat_a.wait(lambda e: e.get("event") == "presence" and e.get("status") == "online", 20)
            if online is None:
                raise LabError("alice never saw bob online")
            t0 = time.monotonic()
            for i in range(messages):
                if during is not None:
                    during(topo, i)
                chat_a.type(f"a2b {i}")
                chat_b.type(f"b2a {i}")
                time.sleep(interval)
            # Both stay until they have everything from the other (under loss the last
            # ones may still be on their way by the relay), then end their input.
            deadline = time.monotonic() + 60
            for chat, prefix in ((chat_b, "a2b "), (chat_a, "b2a ")):
                while len(_texts(chat, prefix)) < messages and time.monotonic() < deadline:
                    time.sleep(0.05)
            errors = [chat_a.finish(90), chat_b.finish(90)]
            _collect(result, chat_a, chat_b, t0, online)
            if after is not None:
                after(topo, result)
            for err in errors:
                if err.strip():
                    result.notes.append(err.strip()[-300:])
        except (LabError, OSError, subprocess.SubprocessError) as exc:
            result.error = str(exc)
        finally:
            stop_all(topo, chats, server)
    result.seconds = round(time.monotonic() - started, 2)
    return result


def _arrivals(chat: JsonProcess, prefix: str) -> list[tuple[float, str]]:
    """(arrival time, text) of every message event whose text starts with ``prefix``."""
    return [
        (at, str(ev.get("text")))
        for at, ev in list(chat.log)
        if ev.get("event") == "message" and str(ev.get("text", "")).startswith(prefix)
    ]


def _texts(chat: JsonProcess, prefix: str) -> set[str]:
    return {text for _, text in _arrivals(chat, prefix)}


def _collect(result: Result, chat_a: JsonProcess, chat_b: JsonProcess, t0: float, online: float) -> None:
    firsts: list[float] = []
    for chat, prefix, attr, side in (
        (chat_b, "a2b ", "delivered_ab", "b"),
        (chat_a, "b2a ", "delivered_ba", "a"),
    ):
        texts = _arrivals(chat, prefix)
        distinct = {t for _, t in texts}
        setattr(result, attr, len(distinct))
        result.duplicates += len(texts) - len(distinct)
        if texts:
            firsts.append(min(at for at, _ in texts))
        # The peer leaving at the end is not a path verdict.
        paths = [ev for _, ev in chat.log if ev.get("event") == "path" and ev.get("reason") != "peer offline"]
        setattr(result, f"path_{side}", str(paths[-1]["via"]) if paths else "relay")
        setattr(result, f"addr_{side}", str(paths[-1].get("addr", "")) if paths else "")
        result.fallbacks += sum(
            1 for ev in paths if ev.get("via") == "relay" and ev.get("reason") != "peer offline"
        )
        for _, ev in chat.log:
            if ev.get("event") == "stats":
                result.sent_direct += int(ev.get("sent_direct", 0))  # type: ignore[call-overload]
                result.sent_relay += int(ev.get("sent_relay", 0))  # type: ignore[call-overload]
    for who, chat in (("alice", chat_a), ("bob", chat_b)):
        for at, ev in chat.log:
            if ev.get("event") == "path":
                where = f"direct {ev.get('addr')}" if ev.get("via") == "direct" else "relay"
                result.path_log.append(f"{at - t0:+.2f}s {who}: {where} ({ev.get('reason')})")
    result.path_log.sort(key=lambda line: float(line.split("s ", 1)[0]))
    if firsts:
        result.first_message_s = round(min(firsts) - t0, 4)
    directs = [
        at
        for chat in (chat_a, chat_b)
        for at, ev in chat.log
        if ev.get("event") == "path" and ev.get("via") == "direct"
    ]
    if directs:
        result.direct_after_s = round(max(0.0, min(directs) - online), 4)


def run_matrix(
    only: Sequence[tuple[str, str]] | None = None,
    messages: int = 100,
    progress: Callable[[Result], None] | None = None,
    routers: Routers = TEXTBOOK,
) -> list[Result]:
    results = []
    for a, b in only or scenarios():
        r = run_scenario(a, b, messages, routers=routers)
        results.append(r)
        if progress is not None:
            progress(r)
    return results


#: NAT444 scenarios: home NATs behind a carrier-grade NAT (RFC 6888: endpoint-independent
#: mapping, hairpinning), name -> (alice's home NAT, bob's home NAT, both behind one carrier).
NAT444 = {
    "nat444/home": ("port-restricted", "port-restricted", False),
    "nat444/same-carrier": ("port-restricted", "port-restricted", True),
    "nat444/home-symmetric": ("symmetric", "port-restricted", False),
    "nat444/same-carrier-symmetric": ("symmetric", "port-restricted", True),
}


def nat444_scenario(name: str, messages: int = 100, routers: Routers = TEXTBOOK) -> Result:
    """Alice behind a home NAT behind a carrier NAT; bob behind a plain home NAT elsewhere
    (``nat444/home``), or behind another home NAT of the same carrier (``same-carrier``)."""
    home_a, home_b, same = NAT444[name]
    carrier = NatProfile("port-restricted", hairpin=True, input_firewall=routers.input_firewall)
    homes = [profile(home_a, routers=routers), profile(home_b, routers=routers, side="b")]

    def build(prefix: str) -> tuple[Topology, str, str]:
        return nat444(prefix, homes, carrier, same_carrier=same, hop=True), "h1", "h2"

    r = run_scenario(name, f"{home_a}+{home_b}", messages, routers=routers, topology=build)
    r.routers = replace(routers, hop=True).name + ", carrier-grade NAT"
    return r


def expected_direct(a: str, b: str) -> bool:
    """What should go direct: everything but symmetric on both sides (and port-restricted
    with symmetric needs the birthday dance, which succeeds in most runs, not all)."""
    return not (a == "symmetric" and b == "symmetric")


# -- output ----------------------------------------------------------------------


def render(results: Sequence[Result]) -> str:
    head = (
        f"{'scenario':<34} {'path':<7} {'first msg':>9} {'direct in':>9} {'a->b':>5} {'b->a':>5} {'dup':>4}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<34} ERROR {r.error}")
            continue
        path = "direct" if r.direct else ("mixed" if "direct" in (r.path_a, r.path_b) else "relay")
        first = "-" if r.first_message_s is None else f"{r.first_message_s * 1000:.0f} ms"
        direct = "-" if r.direct_after_s is None else f"{r.direct_after_s:.2f} s"
        lines.append(
            f"{r.name:<34} {path:<7} {first:>9} {direct:>9} "
            f"{r.delivered_ab:>5} {r.delivered_ba:>5} {r.duplicates:>4}"
        )
    ok = sum(1 for r in results if r.exactly_once and not r.error)
    lines.append(f"{ok}/{len(results)} scenarios delivered every message exactly once")
    kinds = sorted({r.routers for r in results})
    lines.append(f"routers: {'; '.join(kinds)}")
    return "\n".join(lines)


def picture(results: Sequence[Result], path: Path) -> None:
    """A PNG grid: rows and columns are profiles; green direct, amber relay, red lost or duplicated."""
    from PIL import Image, ImageDraw

    cell, margin = 120, 130
    kinds = list(KINDS)
    others = [r for r in results if r.a not in KINDS and r.a != SAME_LAN]  # NAT444 and the like
    size = (margin + cell * len(kinds), margin + cell * len(kinds) + 60 + 56 * len(others))
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    for i, k in enumerate(kinds):
        draw.text((margin + i * cell + 6, margin - 20), k, fill="black")
        draw.text((6, margin + i * cell + cell // 2), k, fill="black")
    by_pair = {frozenset((r.a, r.b)): r for r in results}
    for i, ka in enumerate(kinds):
        for j, kb in enumerate(kinds):
            r = by_pair.get(frozenset((ka, kb)))
            box = (
                margin + j * cell,
                margin + i * cell,
                margin + (j + 1) * cell - 4,
                margin + (i + 1) * cell - 4,
            )
            if r is None:
                draw.rectangle(box, fill="#eeeeee")
                continue
            draw.rectangle(box, fill=_colour(r))
            draw.multiline_text((box[0] + 6, box[1] + 8), _cell_text(r), fill="black")
    same = next((r for r in results if r.a == SAME_LAN), None)
    if same is not None:
        y = margin + cell * len(kinds) + 8
        draw.rectangle((margin, y, margin + 3 * cell, y + 48), fill=_colour(same))
        draw.text((margin + 6, y + 6), "same LAN: " + _cell_text(same).replace("\n", "  "), fill="black")
    for row, other in enumerate(others):
        top = margin + cell * len(kinds) + 60 + 56 * row
        draw.rectangle((margin, top, size[0] - 8, top + 48), fill=_colour(other))
        draw.text((margin + 6, top + 4), f"{other.a} ({other.b})", fill="black")
        draw.text((margin + 6, top + 24), _cell_text(other).replace("\n", "  "), fill="black")
    routers = "; ".join(sorted({r.routers for r in results}))
    draw.text((6, 6), "natlab matrix: green direct, amber relay, red lost/duplicated", fill="black")
    draw.text((6, 24), f"routers: {routers}", fill="black")
    img.save(path)


def _colour(r: Result) -> str:
    if r.error or not r.exactly_once:
        return "#e06060"
    return "#70c070" if r.direct else "#f0c040"


def _cell_text(r: Result) -> str:
    if r.error:
        return "error"
    direct = "-" if r.direct_after_s is None else f"{r.direct_after_s:.2f}s"
    first = "-" if r.first_message_s is None else f"{r.first_message_s * 1000:.0f}ms"
    counts = f"{r.delivered_ab}+{r.delivered_ba} dup {r.duplicates}"
    return f"{'direct' if r.direct else 'relay'}\nfirst {first}\ndirect {direct}\n{counts}"
