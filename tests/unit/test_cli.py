"""CLI argument handling (no network)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from p2pim.cli.main import UsageError, main, parse_server


def test_parse_server_forms() -> None:
    assert parse_server("127.0.0.1") == ("127.0.0.1", 3478)
    assert parse_server("127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert parse_server("[::1]:5000") == ("::1", 5000)
    assert parse_server("::1") == ("::1", 3478)
    assert parse_server("localhost:7")[1] == 7


@pytest.mark.parametrize("bad", ["", ":5000", "1.2.3.4:0", "1.2.3.4:x", "[::1]x", "[::1"])
def test_parse_server_rejects(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_server(bad)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nat", "--server", "127.0.0.1", "--lifetime", "0"]) == 2
    assert "--lifetime" in capsys.readouterr().err


def test_lan_usage_errors_exit_2_before_any_packet(
    capsys: pytest.CaptureFixture[str], tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert main(["lan", "peers", "--interface", "no-such-if0"]) == 2
    assert "no broadcast-capable IPv4 interface 'no-such-if0'" in capsys.readouterr().err
    assert main(["lan", "--name", "a:b", "--interface", "no-such-if0"]) == 2
    assert "cannot be a LAN name" in capsys.readouterr().err
    assert main(["lan", "--interval", "0.01"]) == 2


@pytest.mark.parametrize("content", [b"", b"alice: hi\n/quit\nno newline at the end"])
def test_stdin_from_a_file_or_dev_null_is_read_not_an_error(
    content: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """epoll refuses regular files and /dev/null (EPERM): `p2pim lan < script` must still work."""
    from p2pim.cli.stdin import StdinLines

    path = tmp_path / "input"
    path.write_bytes(content)
    for source in (str(path), os.devnull) if content else (os.devnull,):
        with open(source) as f:
            monkeypatch.setattr(sys, "stdin", f)

            async def lines() -> list[str | None]:
                reader = StdinLines()
                got = []
                while (line := await reader.queue.get()) is not None:
                    got.append(line)
                return got

            expected = content.decode().split("\n") if source == str(path) else []
            assert asyncio.run(lines()) == expected


def test_lan_history_lists_conversations_and_finds_a_peer_by_nickname(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from p2pim.messaging.store import ClientStore
    from p2pim.profile import Profile

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    store = ClientStore(Profile("default").path / "lan.db")
    store.add_incoming(b"1" * 16, "ipmsg:tux@10.0.0.7", "from iptux", 1000, 1000)
    store.queue_outgoing(b"2" * 16, "ipmsg:tux@10.0.0.7", "to iptux", b"to iptux", 2000, 2000)
    store.add_incoming(b"3" * 16, "lan:bob", "from bob", 3000, 3000)
    store.add_incoming(b"4" * 16, "ipmsg:tux@10.0.0.9", "another tux", 4000, 4000)
    store.close()
    assert main(["lan", "history", "--json", "--name", "alice"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(t["peer"], t["kind"], t["messages"]) for t in listed] == [
        ("tux@10.0.0.9", "ipmsg", 1), ("bob", "p2pim", 1), ("tux@10.0.0.7", "ipmsg", 2),
    ]  # fmt: skip
    assert main(["lan", "history", "tux@10.0.0.7", "--json", "--name", "alice"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["from"], r["text"], r["state"]) for r in rows] == [
        ("tux@10.0.0.7", "from iptux", "received"), ("alice", "to iptux", "queued"),
    ]  # fmt: skip
    assert main(["lan", "history", "bob", "--name", "alice"]) == 0
    assert "bob: from bob" in capsys.readouterr().out
    assert main(["lan", "history", "tux", "--name", "alice"]) == 2  # two peers called tux
    assert "more than one peer" in capsys.readouterr().err


def test_transfer_progress_bars_show_bytes_rate_and_time_left() -> None:
    import io
    import re

    from p2pim.cli.files import Bars

    out = io.StringIO()
    bars = Bars(out, every_s=0)
    a, b = b"a" * 16, b"b" * 16
    bars.update(a, "photo.jpg", 1_000_000, 4_000_000)  # a resumed transfer: it starts at 25%
    bars.update(b, "notes.txt", 10, 100)
    bars.update(a, "photo.jpg", 2_000_000, 4_000_000)
    bars.close(a, 4_000_000)  # done: the bar reaches its end
    bars.close(b, None)  # failed: it stays where it was
    text = out.getvalue()
    assert "photo.jpg:  25%" in text
    assert re.search(r"photo\.jpg: +50%.*2\.00M/4\.00M \[[\d:]+<[\d:]+, [\d.]+[kMG]?B/s\]", text), text
    assert re.search(r"photo\.jpg: 100%.*4\.00M/4\.00M", text), text
    assert "notes.txt:  10%" in text and "notes.txt: 100%" not in text
    bars.close_all()  # nothing left open
