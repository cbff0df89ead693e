"""`p2pim lan` with a real IP Messenger client: Debian's iptux 0.8.3, on a virtual screen.

iptux runs under Xvfb in its own host of a natlab LAN, p2pim in another. iptux
answers entries and messages by itself; what its user types is typed with
xdotool into its chat window (it opens that window when a message arrives),
and what it shows is read from its own chat log (``communicate.log``, on by
default), so both directions are checked on the real program's terms:

* each side lists the other (iptux by its nickname, with its client named);
* messages both ways, UTF-8 and Chinese, each shown once;
* iptux quits (Ctrl+Q, which sends BR_EXIT): p2pim says "left";
* a message typed to iptux while it is gone is kept and delivered once when
  it starts again;
* iptux numbers its packets from 1 again after the restart, so its reply
  reuses a packet number of its first run: p2pim must show it, not drop it
  as a duplicate;
* iptux back under a new nickname: p2pim says who it was, and the message
  kept for the old name goes to it;
* files both ways: p2pim's offer appears in iptux's chat window, its user
  clicks Accept and picks the folder, and iptux fetches it over TCP; iptux's
  user attaches a file (Ctrl+S) and sends it, p2pim shows the offer as
  unencrypted and fetches it after `/accept`. Byte for byte, nothing written
  before acceptance.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from natlab.classify import tool
from natlab.matrix import JsonProcess
from natlab.profiles import NatProfile
from natlab.topology import Topology, new_prefix
from tests.labutil import lab

MISSING = [t for t in ("iptux", "Xvfb", "xdotool") if shutil.which(t) is None]
pytestmark = [
    *lab,
    pytest.mark.skipif(bool(MISSING), reason=f"needs {MISSING} (apt-get install iptux xvfb xdotool)"),
]
ALICE_IP, TUX_IP = "10.0.1.2", "10.0.1.3"
TUX = f"tux@{TUX_IP}"


@dataclass
class Iptux:
    """iptux and its X server in node ``node``; ``home`` holds its config and its chat log."""

    topo: Topology
    node: str
    home: Path
    display: str
    proc: subprocess.Popen[str] | None = None

    def configure(self, **settings: object) -> None:
        """Write iptux's own settings file (``nick_name``, ``open_chat``, ...)."""
        (self.home / ".iptux" / "config.json").write_text(json.dumps(settings))

    def start(self) -> None:
        log = open(self.home / "iptux.log", "a")  # noqa: SIM115 - the process owns it
        env = {**os.environ, "HOME": str(self.home), "DISPLAY": self.display, "NO_AT_BRIDGE": "1"}
        self.proc = self.topo.popen(self.node, ["iptux", "-l", "DEBUG"], env=env, stdout=log, stderr=log)
        log.close()

    def quit(self) -> None:
        """Ctrl+Q in its main window: iptux says goodbye (BR_EXIT) and exits."""
        assert self.proc is not None
        self.xdotool("windowfocus", "--sync", self.window("^Iptux$"), "key", "ctrl+q")
        self.proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def xdotool(self, *args: str) -> str:
        return self.topo.run(
            self.node, ["env", f"DISPLAY={self.display}", "xdotool", *args], timeout=20
        ).stdout

    def window(self, title: str, timeout: float = 10) -> str:
        """The id of the visible window whose title matches ``title``."""
        found = wait_for(lambda: self.windows(title), timeout)
        assert found, f"no iptux window {title!r}"
        return found[0]

    def type_to(self, peer_title: str, text: str) -> None:
        """Type ``text`` in the chat window with ``peer_title`` and press Enter (sends)."""
        self.xdotool("windowfocus", "--sync", self.window(peer_title), "type", "--delay", "15", text)
        self.xdotool("key", "Return")

    def accept_files(self, peer_title: str) -> None:
        """Click Accept above "Files to be received" in the chat window, then take the
        folder the chooser proposes (iptux's home). The window is given a fixed place and
        size first, so the button is where it always is on this iptux."""
        window = self.window(peer_title)
        self.xdotool("windowsize", "--sync", window, "1000", "500")
        self.xdotool("windowmove", "--sync", window, "0", "0")
        chooser: object = None
        for _ in range(3):  # a click before the layout settled misses: try again
            self.xdotool("mousemove", "--window", window, "985", "77", "click", "1")
            chooser = wait_for(lambda: self.windows("Please select a folder"), 3)
            if chooser:
                break
        assert chooser, "iptux did not ask where to save (the Accept button was not hit)"
        self.xdotool("windowfocus", "--sync", self.window("Please select a folder"), "key", "Return")

    def attach(self, peer_title: str, path: Path) -> None:
        """Attach ``path`` in the chat window (Ctrl+S, the file chooser) and send (Enter)."""
        self.xdotool("windowfocus", "--sync", self.window(peer_title), "key", "ctrl+s")
        chooser = self.window("Choose enclosure files")
        self.xdotool("windowfocus", "--sync", chooser, "key", "ctrl+l", "type", "--delay", "15", str(path))
        self.xdotool("key", "Return")
        assert wait_for(lambda: not self.windows("Choose enclosure files"), 5), "the file chooser stayed"
        self.xdotool("windowfocus", "--sync", self.window(peer_title), "key", "Return")

    def windows(self, title: str) -> list[str]:
        return self.xdotool("search", "--onlyvisible", "--name", title).split()

    def shown(self) -> list[tuple[str, str]]:
        """(nickname, text) of every message iptux showed, from its own chat log."""
        path = self.home / ".config" / "iptux" / "log" / "communicate.log"
        if not path.exists():
            return []
        found = re.findall(
            r"Recevied-From: Nickname:(.*?) User:.*?\n\[STRING\](.*?)\n-{5,}", path.read_text()
        )
        return [(nick, text) for nick, text in found]

    def heard_entry(self, from_ip: str) -> float | None:
        """When (wall clock) iptux first took an entry packet (BR_ENTRY, ANSENTRY) from ``from_ip``,
        which is when it lists that peer; from its debug log."""
        blocks = re.split(r"\n(?=\[\d{4}-)", (self.home / "iptux.log").read_text(errors="replace"))
        for block, after in itertools.pairwise(blocks):
            if f"received udp message from {from_ip}:2425" in block and re.search(
                r"\] (BR_ENTRY|ANSENTRY)", after
            ):
                stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\]", after)
                if stamp:
                    return datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S.%f").timestamp()
        return None

    def sent_numbers(self, to_ip: str) -> list[int]:
        """Packet numbers of the SENDMSGs iptux sent to ``to_ip`` (from its debug log's dumps)."""
        text = (self.home / "iptux.log").read_text(errors="replace")
        numbers = []
        for block in re.split(r"\n(?=\[\d{4}-)", text):
            if f"send udp message to {to_ip}:2425" not in block:
                continue
            dump = bytes.fromhex("".join(m for m in re.findall(r"^[0-9a-f]{8}  (.*?)  \|", block, re.M)))
            fields = dump.split(b":", 5)
            if len(fields) == 6 and int(fields[4]) & 0xFF == 0x20:
                numbers.append(int(fields[1]))
        return numbers


def wait_for(probe: Callable[[], object], timeout: float) -> object:
    """``probe()`` once it is truthy, polled until ``timeout``; else its last value."""
    end = time.monotonic() + timeout
    while not (value := probe()) and time.monotonic() < end:
        time.sleep(0.1)
    return value


@dataclass
class Lan:
    """A natlab LAN: p2pim's host h1, and iptux (with its X server) on h2."""

    topo: Topology
    tmp: Path
    tux: Iptux
    started: list[JsonProcess]

    def alice(self, *more: str) -> JsonProcess:
        """`p2pim lan --json` as alice on h1, ready."""
        env = {**os.environ, "XDG_DATA_HOME": str(self.tmp / "alice")}
        argv = [tool("p2pim"), "lan", "--json", "--name", "alice", "--interval", "1", "--linger", "5", *more]
        proc = JsonProcess(self.topo, "h1", argv, env)
        self.started.append(proc)
        assert proc.wait(lambda e: e.get("event") == "ready", 15) is not None, "p2pim lan did not start"
        return proc

    def p2pim(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A one-shot `p2pim` command as alice on h1."""
        return self.topo.run("h1", ["env", f"XDG_DATA_HOME={self.tmp / 'alice'}", tool("p2pim"), *args])


@pytest.fixture
def lan() -> Iterator[Lan]:
    topo = Topology(new_prefix())
    tmp = Path(tempfile.mkdtemp(prefix="p2pim-iptux-"))
    xvfb: subprocess.Popen[str] | None = None
    lab: Lan | None = None
    try:
        topo.add_nat("nat1", NatProfile("port-restricted"))
        topo.add_host("h1", "nat1")
        topo.add_host("h2", "nat1")
        home = tmp / "tux"
        (home / ".iptux").mkdir(parents=True)
        (home / ".config" / "iptux" / "log").mkdir(parents=True)  # iptux opens its logs before making it
        xvfb, display = _xvfb(topo, "h2")
        lab = Lan(topo, tmp, Iptux(topo, "h2", home, display), [])
        yield lab
    finally:
        if lab is not None:
            lab.tux.kill()
            for proc in lab.started:
                if proc.proc.poll() is None:
                    proc.proc.kill()
                    proc.proc.wait(5)
        if xvfb is not None:
            xvfb.kill()
            xvfb.wait(5)
        topo.down()
        shutil.rmtree(tmp, ignore_errors=True)


def _xvfb(topo: Topology, node: str) -> tuple[subprocess.Popen[str], str]:
    """Xvfb in ``node`` on a display it picks itself (-displayfd): no clash with others."""
    read, write = os.pipe()
    proc = topo.popen(
        node, ["Xvfb", "-displayfd", str(write), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(write)
    with os.fdopen(read) as f:
        number = f.readline().strip()
    assert number.isdigit(), "Xvfb did not start"
    return proc, f":{number}"


def _messages(alice: JsonProcess) -> list[str]:
    return [str(e["text"]) for _, e in alice.log if e.get("event") == "message" and e.get("from") == TUX]


def _delivered(alice: JsonProcess) -> list[dict[str, object]]:
    return [e for _, e in alice.log if e.get("event") == "outcome" and e.get("state") == "delivered"]


def _tux_up(again: bool) -> Callable[[dict[str, object]], bool]:
    return lambda e: (
        e.get("event") == "peer" and e.get("name") == TUX and e.get("up") is True and e.get("again") is again
    )


def test_iptux_and_p2pim_chat_both_ways_exactly_once_across_an_iptux_restart(lan: Lan) -> None:
    tux = lan.tux
    # iptux's own settings: nickname, group; open the chat window when a message comes,
    # Enter sends, keep the chat log (its default, said for clarity)
    tux.configure(nick_name="tux", belong_group="lab", open_chat=True, use_enter_key=True, record_log=True)
    alice = lan.alice()
    # -- each side sees the other ----------------------------------------------------
    started, started_wall = time.monotonic(), time.time()
    tux.start()
    seen_at = alice.wait(_tux_up(False), 10)
    assert seen_at is not None, "p2pim never listed iptux"
    up = next(e for _, e in alice.log if _tux_up(False)(e))
    assert (up["client"], up["away"], up["encrypted"]) == ("iptux 0.8.3", None, False)
    heard = wait_for(lambda: tux.heard_entry(ALICE_IP), 5)
    assert isinstance(heard, float), "iptux never took an entry packet from p2pim"
    print(
        f"after iptux was started: p2pim listed it in {seen_at - started:.2f} s, "
        f"iptux listed p2pim in {heard - started_wall:.2f} s"
    )
    # -- p2pim -> iptux: delivered (RECVMSG), shown once, under alice's nickname -------
    hello = "hello tux: UTF-8 ✓ and 中文 你好"
    alice.type(f"tux: {hello}")
    delivered = alice.wait(lambda e: e.get("event") == "outcome" and e.get("state") == "delivered", 10)
    assert delivered is not None
    assert wait_for(lambda: tux.shown() == [("alice", hello)], 5), tux.shown()
    # -- iptux -> p2pim: typed in iptux's chat window ---------------------------------
    reply = "reply from iptux 再见 ✓"
    tux.type_to("Talk with alice", reply)
    assert alice.wait(lambda e: e.get("event") == "message" and e.get("from") == TUX, 10) is not None
    first_run_numbers = tux.sent_numbers(ALICE_IP)
    # -- iptux quits: "left" ----------------------------------------------------------
    tux.quit()
    left = alice.wait(
        lambda e: e.get("event") == "peer" and e.get("up") is False and e.get("name") == TUX, 10
    )
    assert left is not None
    assert next(e for _, e in alice.log if e.get("up") is False)["reason"] == "left"
    # -- a message while it is gone is kept, and goes once when it is back -----------
    kept = "kept while you were away 留言"
    alice.type(f"tux: {kept}")
    tux.start()
    assert alice.wait(_tux_up(True), 10) is not None, "p2pim did not see iptux come back"
    assert wait_for(lambda: len(_delivered(alice)) == 2, 10), _delivered(alice)
    assert wait_for(lambda: tux.shown() == [("alice", hello), ("alice", kept)], 5), tux.shown()
    # -- iptux's second run numbers from 1 again: its reply must still be shown --------
    tux.type_to("Talk with alice", reply)
    assert wait_for(lambda: len(_messages(alice)) == 2, 10), _messages(alice)
    second_run_numbers = tux.sent_numbers(ALICE_IP)[len(first_run_numbers) :]
    print(f"iptux SENDMSG packet numbers: first run {first_run_numbers}, second run {second_run_numbers}")
    assert set(first_run_numbers) & set(second_run_numbers), "iptux did not reuse a packet number"
    # -- and nothing twice on either side (resends are answered, not shown again) -------
    alice.type("/quit")
    alice.finish(15)
    assert _messages(alice) == [reply, reply]
    assert tux.shown() == [("alice", hello), ("alice", kept)]
    # iptux sent each reply once: it took p2pim's RECVMSG the first time (else it resends,
    # then tells its user "Your pal didn't receive the packet")
    assert tux.sent_numbers(ALICE_IP) == first_run_numbers + second_run_numbers
    assert len(first_run_numbers) == len(second_run_numbers) == 1
    tux.quit()
    history = lan.p2pim("lan", "history", "tux", "--json", "--name", "alice")
    rows = json.loads(history.stdout)
    assert [(r["from"], r["text"], r["state"]) for r in rows] == [
        ("alice", hello, "delivered"),
        (TUX, reply, "received"),
        ("alice", kept, "delivered"),
        (TUX, reply, "received"),
    ]


def test_p2pim_started_after_iptux_lists_it_and_is_listed(lan: Lan) -> None:
    tux = lan.tux
    tux.configure(nick_name="tux")
    tux.start()
    assert wait_for(lambda: "bind UDP port" in (tux.home / "iptux.log").read_text(errors="replace"), 10)
    peers = lan.p2pim("lan", "peers", "--json", "--name", "alice", "--no-ipmsg")
    assert json.loads(peers.stdout) == []  # without IP Messenger, iptux is not there
    started = time.time()
    peers = lan.p2pim("lan", "peers", "--json", "--name", "alice")
    listed = [(p["name"], p["kind"], p["client"], p["away"]) for p in json.loads(peers.stdout)]
    assert listed == [(TUX, "ipmsg", "iptux 0.8.3", None)]
    heard = wait_for(lambda: tux.heard_entry(ALICE_IP), 5)
    assert isinstance(heard, float) and heard >= started - 1, "iptux did not hear p2pim's BR_ENTRY"


def test_iptux_back_under_a_new_nickname_gets_the_message_kept_for_the_old_one(lan: Lan) -> None:
    tux = lan.tux
    tux.configure(nick_name="tux")
    alice = lan.alice()
    tux.start()
    assert alice.wait(_tux_up(False), 10) is not None
    tux.quit()
    assert alice.wait(lambda e: e.get("event") == "peer" and e.get("up") is False, 10) is not None
    kept = "typed while you were away"
    alice.type(f"tux: {kept}")
    # its user renames it (iptux rewrites this file itself when they do), then it starts
    tux.configure(nick_name="tuxie")
    tux.start()
    changed = alice.wait(lambda e: e.get("event") == "peer_changed", 10)
    assert changed is not None
    event = next(e for _, e in alice.log if e.get("event") == "peer_changed")
    assert (event["name"], event["renamed_from"]) == (f"tuxie@{TUX_IP}", TUX)
    assert alice.wait(
        lambda e: (
            e.get("event") == "outcome" and e.get("to") == f"tuxie@{TUX_IP}" and e.get("state") == "delivered"
        ),
        10,
    )
    assert wait_for(lambda: tux.shown() == [("alice", kept)], 5), tux.shown()


def _event(alice: JsonProcess, kind: str, **fields: object) -> dict[str, object]:
    """The first ``kind`` event with ``fields`` (waited for)."""

    def match(e: dict[str, object]) -> bool:
        return e.get("event") == kind and all(e.get(k) == v for k, v in fields.items())

    assert alice.wait(match, 30) is not None, f"no {kind} {fields}: {[e for _, e in alice.log][-5:]}"
    return next(e for _, e in alice.log if match(e))


def test_files_go_both_ways_with_iptux_whole_and_only_once_accepted(lan: Lan) -> None:
    tux = lan.tux
    tux.configure(nick_name="tux", open_chat=True, use_enter_key=True, record_log=True)
    downloads = lan.tmp / "alice downloads"
    alice = lan.alice("--dir", str(downloads))
    tux.start()
    assert alice.wait(_tux_up(False), 10) is not None
    # -- p2pim -> iptux: a word first (iptux opens a chat window for a text, not for a file),
    # then the offer, listed in that window; iptux's user accepts ---------------------------
    alice.type("tux: the report follows")
    tux.window("Talk with alice")
    ours = lan.tmp / "报告 final.bin"
    ours.write_bytes(os.urandom(3_000_000))
    alice.type(f"/send tux {ours}")
    offer = _event(alice, "offered")
    assert _event(alice, "outcome", state="delivered", msg_id=offer["id"])  # iptux's RECVMSG
    tux.accept_files("Talk with alice")
    done = _event(alice, "file_done", outgoing=True)
    assert (done["name"], done["size"], done["encrypted"]) == (ours.name, 3_000_000, False)
    received = tux.home / ours.name
    assert wait_for(lambda: received.exists() and received.stat().st_size == 3_000_000, 10), list(
        tux.home.iterdir()
    )
    assert received.read_bytes() == ours.read_bytes()
    # -- iptux -> p2pim: attached in iptux, shown as unencrypted, fetched once accepted --
    theirs = tux.home / "from tux.dat"
    theirs.write_bytes(os.urandom(2_500_000))
    tux.attach("Talk with alice", theirs)
    offered = _event(alice, "file_offered")
    assert (offered["peer"], offered["name"], offered["size"], offered["encrypted"]) == (
        TUX,
        "from tux.dat",
        2_500_000,
        False,
    )
    assert not downloads.exists()  # nothing written before it is accepted
    alice.type(f"/accept {str(offered['id'])[:8]}")
    got = _event(alice, "file_done", outgoing=False)
    assert got["path"] == str(downloads / "from tux.dat")
    assert (downloads / "from tux.dat").read_bytes() == theirs.read_bytes()
    assert sorted(p.name for p in downloads.iterdir()) == ["from tux.dat"]  # no .part left
    alice.type("/quit")
    alice.finish(15)
    rows = json.loads(lan.p2pim("lan", "history", "tux", "--json", "--name", "alice").stdout)
    assert [(r["from"], r["text"]) for r in rows] == [
        ("alice", "the report follows"),
        ("alice", f"file: {ours.name} (3.0 MB)"),
        (TUX, "file: from tux.dat (2.5 MB)"),
    ]
