"""A minimal IP Messenger client, written from the protocol document (Draft-9), not from p2pim.

Standard library only; runs inside a natlab namespace. It binds UDP 2425,
broadcasts BR_ENTRY, answers BR_ENTRY with ANSENTRY, prints what it hears
as JSON lines, answers SENDMSG+SENDCHECKOPT with RECVMSG, and takes commands
on stdin:

    send IP PACKETNO TEXT   SENDMSG|SENDCHECKOPT|UTF8OPT, resent each second until RECVMSG
    raw IP HEX              send these bytes as they are (malformed packets)
    (end of input)          broadcast BR_EXIT and quit
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time

BR_ENTRY, BR_EXIT, ANSENTRY, SENDMSG, RECVMSG = 0x01, 0x02, 0x03, 0x20, 0x21
SENDCHECKOPT, UTF8OPT = 0x100, 0x00800000
PORT = 2425


def packet(no: int, command: int, extra: bytes) -> bytes:
    return b"1:%d:tester:testhost:%d:%s" % (no, command, extra)


def say(**what: object) -> None:
    print(json.dumps(what), flush=True)


def main() -> None:
    broadcast = sys.argv[1]
    nick = sys.argv[2] if len(sys.argv) > 2 else "ipmsg-tester"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.bind(("0.0.0.0", PORT))
    entry = nick.encode() + b"\0testgroup\0"
    s.sendto(packet(1, BR_ENTRY | UTF8OPT, entry), (broadcast, PORT))
    say(event="ready")
    pending: dict[int, tuple[bytes, tuple[str, int], float]] = {}
    stdin_open = True
    while True:
        now = time.monotonic()
        for no, (data, dest, due) in list(pending.items()):
            if now >= due:
                s.sendto(data, dest)
                pending[no] = (data, dest, now + 1.0)
        watch = [s, sys.stdin] if stdin_open else [s]
        ready, _, _ = select.select(watch, [], [], 0.1)
        if sys.stdin in ready:
            line = sys.stdin.readline()
            if not line:
                stdin_open = False
                s.sendto(packet(99999, BR_EXIT | UTF8OPT, entry), (broadcast, PORT))
                say(event="bye")
                return
            cmd = line.rstrip("\n").split(" ", 3)
            if cmd[0] == "send":
                no = int(cmd[2])
                data = packet(no, SENDMSG | SENDCHECKOPT | UTF8OPT, cmd[3].encode() + b"\0")
                pending[no] = (data, (cmd[1], PORT), 0.0)
            elif cmd[0] == "raw":
                s.sendto(bytes.fromhex(cmd[2]), (cmd[1], PORT))
        if s in ready:
            data, src = s.recvfrom(65535)
            parts = data.split(b":", 5)
            if len(parts) != 6:
                continue
            no, command, extra = int(parts[1]), int(parts[4]), parts[5]
            mode = command & 0xFF
            if parts[2] == b"tester":
                continue  # our own broadcast
            if mode == BR_ENTRY:
                s.sendto(packet(int(time.time()), ANSENTRY | UTF8OPT, entry), src)
                say(event="entry", ip=src[0], nick=extra.split(b"\0")[0].decode("utf-8", "replace"))
            elif mode == ANSENTRY:
                say(event="ansentry", ip=src[0], nick=extra.split(b"\0")[0].decode("utf-8", "replace"))
            elif mode == BR_EXIT:
                say(event="exit", ip=src[0])
            elif mode == SENDMSG:
                if command & SENDCHECKOPT:
                    s.sendto(packet(int(time.time()), RECVMSG, str(no).encode()), src)
                text = extra.split(b"\0")[0].decode("utf-8" if command & UTF8OPT else "latin-1", "replace")
                say(event="message", ip=src[0], packetno=no, text=text, utf8=bool(command & UTF8OPT))
            elif mode == RECVMSG:
                acked = int(extra.rstrip(b"\0") or b"0")
                pending.pop(acked, None)
                say(event="recvmsg", ip=src[0], packetno=acked)


if __name__ == "__main__":
    main()
