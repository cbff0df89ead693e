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
