"""How every event looks, in one place: a JSON object for ``--json`` and a line for people.

Used by ``chat``, ``listen``, ``login`` and ``lan`` alike, so a message, a
receipt or an outcome reads the same whichever road it took.
"""

from __future__ import annotations

import json
import time
from typing import Any

GONE = {
    "left": "left",
    "timeout": "is gone (no longer heard)",
    "evicted": "is no longer listed (too many peers on this LAN; pinned peers stay)",
}
BUDDY_TEXTS = {
    "requested": "{peer} asks to be your buddy: p2pim buddy accept {peer}",
    "accepted": "{peer} is now your buddy",
    "declined": "{peer} declined your request",
    "removed": "{peer} removed you",
    "key_changed": "{peer} lost every device and has a new key (see the warning)",
}


def event_line(ev: Any) -> tuple[dict[str, Any], str]:
    from p2pim.client import events as ce
    from p2pim.files import events as fe
    from p2pim.lan import core as lc
    from p2pim.messaging import events as me

    stamp = time.strftime("%H:%M:%S")
    if isinstance(ev, me.Message):
        sent = time.strftime("%H:%M:%S", time.localtime(ev.sent_at_ms / 1000))
        tag = (
            " (while you were offline)"
            if ev.offline
            else " (taken by another device)"
            if ev.route == "copy"
            else ""
        )
        tag += "" if ev.encrypted else " [unencrypted]"
        return (
            {
                "event": "message",
                "from": ev.peer,
                "text": ev.text,
                "msg_id": ev.msg_id.hex(),
                "sent_at_ms": ev.sent_at_ms,
                "route": ev.route,
                "encrypted": ev.encrypted,
            },
            f"[{sent}] {ev.peer}: {ev.text}{tag}",
        )
    if isinstance(ev, me.Receipt):
        return (
            {
                "event": "receipt",
                "from": ev.peer,
                "kind": ev.kind,
                "msg_ids": [m.hex() for m in ev.msg_ids],
            },
            f"[{stamp}] ({ev.kind} by {ev.peer}: {len(ev.msg_ids)} message(s))",
        )
    if isinstance(ev, me.Outcome):
        return (
            {
                "event": "outcome",
                "to": ev.peer,
                "msg_id": ev.msg_id.hex(),
                "state": ev.state,
                "detail": ev.detail,
            },
            f"[{stamp}] (message to {ev.peer} {ev.state}{': ' + ev.detail if ev.detail else ''})",
        )
    if isinstance(ev, me.Problem):
        return {"event": "problem", "message": ev.message}, f"[{stamp}] ! {ev.message}"
    if isinstance(ev, ce.PresenceChange):
        return (
            {"event": "presence", "user": ev.peer, "status": ev.status, "last_seen_ms": ev.last_seen_ms},
            f"[{stamp}] * {ev.peer} is {ev.status}",
        )
    if isinstance(ev, ce.BuddyChange):
        text = BUDDY_TEXTS.get(ev.kind, "{peer} " + ev.kind).format(peer=ev.peer)
        return {"event": "buddy", "user": ev.peer, "kind": ev.kind}, f"[{stamp}] * {text}"
    if isinstance(ev, me.SentElsewhere):
        return (
            {"event": "sent_elsewhere", "to": ev.peer, "text": ev.text, "msg_id": ev.msg_id.hex(),
             "sent_at_ms": ev.sent_at_ms},
            f"[{stamp}] you (another device) -> {ev.peer}: {ev.text}",
        )  # fmt: skip
    if isinstance(ev, ce.DeviceChange):
        return (
            {
                "event": "device",
                "kind": ev.kind,
                "device_id": ev.device_id,
                "name": ev.name,
                "devices": ev.devices,
            },
            f"[{stamp}] * device {ev.device_id} ({ev.name}) {ev.kind}: {ev.devices} device(s) now",
        )
    if isinstance(ev, ce.KeyChanged):
        return (
            {"event": "key_changed", "user": ev.peer, "pinned": ev.pinned, "offered": ev.offered},
            f"[{stamp}] WARNING: {ev.peer}'s key changed: pinned {ev.pinned}, offered {ev.offered}. "
            f"Messages stay with the pinned key until you check and run p2pim buddy trust {ev.peer}",
        )
    if isinstance(ev, ce.PathUpdate):
        where = f"direct {ev.addr}" + (f" ({ev.rtt_ms:.1f} ms)" if ev.rtt_ms is not None else "")
        return (
            {
                "event": "path",
                "user": ev.peer,
                "via": ev.via,
                "addr": ev.addr,
                "rtt_ms": ev.rtt_ms,
                "reason": ev.reason,
            },
            f"[{stamp}] * path to {ev.peer}: {where if ev.via == 'direct' else 'relay'} ({ev.reason})",
        )
    if isinstance(ev, (fe.FileOffered, fe.FileAnswered, fe.FileProgress, fe.FileDone, fe.FileFailed)):
        return _file_event(ev, stamp)
    if isinstance(ev, ce.GroupMessage):
        return (
            {"event": "group_message", "group": ev.group, "gid": ev.gid.hex(), "from": ev.sender,
             "text": ev.text, "msg_id": ev.msg_id.hex(), "sent_at_ms": ev.sent_at_ms, "via": ev.via},
            f"[{stamp}] #{ev.group} {ev.sender}: {ev.text}",
        )  # fmt: skip
    if isinstance(ev, ce.GroupChange):
        said = {
            "created": f"{ev.actor} created #{ev.group}", "invited": f"{ev.actor} invited {ev.subject}",
            "joined": f"{ev.subject} joined", "declined": f"{ev.subject} declined",
            "left": f"{ev.subject} left", "removed": f"{ev.actor} removed {ev.subject}",
            "renamed": f"{ev.actor} renamed it #{ev.group}",
            "role": f"{ev.actor} changed {ev.subject}'s role", "deleted": f"{ev.actor} deleted #{ev.group}",
        }.get(ev.kind, ev.kind)  # fmt: skip
        return (
            {"event": "group_change", "group": ev.group, "gid": ev.gid.hex(), "kind": ev.kind,
             "actor": ev.actor, "subject": ev.subject, "seq": ev.seq},
            f"[{stamp}] * #{ev.group}: {said}",
        )  # fmt: skip
    if isinstance(ev, ce.ConnectionState):
        return {"event": "connection", "up": ev.up, "detail": ev.detail}, f"[{stamp}] * {ev.detail}"
    if isinstance(ev, lc.PeerUp):
        tag = "" if ev.peer.encrypted else f" [{ev.peer.client}: unencrypted]"
        tag += " (away)" if ev.peer.away else ""
        again = " again" if ev.again else ""
        return {"event": "peer", "up": True, "again": ev.again, **ev.peer.as_dict()}, (
            f"[{stamp}] * {ev.peer.name} is here{again} ({ev.peer.addr[0]}){tag}"
        )
    if isinstance(ev, lc.PeerGone):
        return {"event": "peer", "up": False, "reason": ev.reason, **ev.peer.as_dict()}, (
            f"[{stamp}] * {ev.peer.name} {GONE.get(ev.reason, 'is gone')}"
        )
    if isinstance(ev, lc.PeerChanged):
        what = []
        if ev.renamed_from:
            what.append(f"{ev.renamed_from} is now {ev.peer.name}")
        if ev.away_changed:
            what.append(f"{ev.peer.name} is {'away' if ev.peer.away else 'back'}")
        return {"event": "peer_changed", "renamed_from": ev.renamed_from, **ev.peer.as_dict()}, (
            f"[{stamp}] * {'; '.join(what)}"
        )
    return {"event": "unknown", "repr": repr(ev)}, f"[{stamp}] ? {ev!r}"


def _file_event(ev: Any, stamp: str) -> tuple[dict[str, Any], str]:
    from p2pim.files import events as fe
    from p2pim.files.disk import human_size

    data = {"event": _FILE_EVENTS[type(ev).__name__], **{k: v for k, v in vars(ev).items() if k != "file_id"}}
    data["id"] = ev.file_id.hex()
    if isinstance(ev, fe.FileOffered):
        plain = "" if ev.encrypted else " [IP Messenger: unencrypted, no hash]"
        line = f"{ev.peer} offers {ev.name!r} ({human_size(ev.size)}){plain}: accept {ev.file_id.hex()[:8]}"
        return data, f"[{stamp}] {line}"
    if isinstance(ev, fe.FileAnswered):
        return data, f"[{stamp}] * {ev.peer} {ev.kind} {ev.name}" + (f": {ev.reason}" if ev.reason else "")
    if isinstance(ev, fe.FileProgress):
        return data, f"[{stamp}] * {ev.name}: {ev.done * 100 // max(1, ev.size)}%"
    if isinstance(ev, fe.FileDone):
        moved = (
            f"sent {ev.name} to {ev.peer}" if ev.outgoing else f"received {ev.name} from {ev.peer}: {ev.path}"
        )
        if not ev.encrypted:
            return (
                data,
                f"[{stamp}] * {moved} ({human_size(ev.size)} over IP Messenger, unencrypted: size checked)",
            )
        road = "direct (QUIC)" if ev.direct >= ev.size else "partly direct" if ev.direct else "via the relay"
        return data, f"[{stamp}] * {moved} ({human_size(ev.size)} {road}, whole: hash checked)"
    return data, f"[{stamp}] ! {ev.name}: {ev.reason}"


_FILE_EVENTS = {
    "FileOffered": "file_offered",
    "FileAnswered": "file_answered",
    "FileProgress": "file_progress",
    "FileDone": "file_done",
    "FileFailed": "file_failed",
}


def print_history(rows: list[Any], me: str, who: str, as_json: bool) -> None:
    """A conversation (:class:`p2pim.messaging.store.HistoryRow` s) for ``history`` and ``lan history``;
    ``who`` names the other side where the rows' own peer names carry a road prefix."""
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "msg_id": r.msg_id.hex(),
                        "from": me if r.outgoing else (r.author or who),
                        "text": r.text,
                        "sent_at_ms": r.sent_at_ms,
                        "state": r.state,
                    }
                    for r in rows
                ]
            )
        )
        return
    if not rows:
        print(f"no messages with {who}")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.sent_at_ms / 1000))
        state = f"  [{r.state}]" if r.outgoing else ""
        print(f"[{when}] {me if r.outgoing else (r.author or who)}: {r.text}{state}")
