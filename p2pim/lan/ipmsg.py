"""IP Messenger (Draft-9) packets: ``ver:packetno:user:host:command:extra`` on UDP 2425.

What chatting needs: BR_ENTRY / ANSENTRY / BR_EXIT / BR_ABSENCE to know who is
here, SENDMSG (with SENDCHECKOPT) answered by RECVMSG, and UTF8OPT; and file
attachments: a SENDMSG with FILEATTACHOPT lists files after its text
(:func:`attachments`), the receiver fetches each over TCP on the same port
number with GETFILEDATA (:func:`file_request`), or says RELEASEFILES when it
will not. IP Messenger, iptux and FeiQ all speak this. There is no encryption in it:
p2pim shows these peers and their messages as unencrypted.

Parsing is strict, because anything on the LAN can send to this port: the
version must be "1", or "1_" and a short printable tag (real clients name
themselves there: iptux sends ``1_iptux 0.8.3``, FeiQ ``1_lbt4_0#128#MAC#...``),
the packet number and command decimal, user and host short and free of NUL,
the whole packet at most :data:`MAX_PACKET` bytes. Anything else raises
:class:`IpmsgError` and is counted by the caller.

Clients differ where the draft is loose, and :func:`client_name` and
:func:`absence` say how: iptux sets ABSENCEOPT on every entry packet it sends
(it has no away mode), so for iptux the bit means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

PORT = 2425
MAX_PACKET = 32 * 1024  # IP Messenger's own limit for a message packet
MAX_NAME = 128
MAX_TAG = 96  # the client's tag after "1_" in the version field

NOOPERATION = 0x00
BR_ENTRY = 0x01
BR_EXIT = 0x02
ANSENTRY = 0x03
BR_ABSENCE = 0x04
SENDMSG = 0x20
RECVMSG = 0x21
GETFILEDATA = 0x60  # over TCP: "packet:file:offset" (hex), answered by the file's bytes
RELEASEFILES = 0x61  # "packet" (decimal): the receiver will not fetch that packet's files
GETDIRFILES = 0x62  # a directory: not offered by p2pim, and refused when offered to it

ABSENCEOPT = 0x00000100  # with the entry commands: "away" (not to iptux, see absence())
SENDCHECKOPT = 0x00000100  # with SENDMSG: please answer RECVMSG
BROADCASTOPT = 0x00000400
AUTORETOPT = 0x00002000  # an automatic answer: do not answer it
FILEATTACHOPT = 0x00200000  # with SENDMSG: files listed after the text
UTF8OPT = 0x00800000  # this packet's text is UTF-8
CAPUTF8OPT = 0x01000000  # this client understands UTF-8

MODE_MASK = 0xFF
FILE_REGULAR, FILE_DIR = 0x1, 0x2  # low byte of an attachment's attributes
MAX_ATTACHMENTS = 64  # files in one packet that are looked at
MAX_FILE_REQUEST = 1024  # bytes of a GETFILEDATA request (it is ~60)


class IpmsgError(ValueError):
    """Not a well-formed IP Messenger packet."""


@dataclass(frozen=True)
class Packet:
    packetno: int
    user: str
    host: str
    command: int
    extra: bytes
    tag: str = ""  # what follows "1_" in the version field ("iptux 0.8.3"); "" for plain "1"

    @property
    def mode(self) -> int:
        return self.command & MODE_MASK

    def has(self, option: int) -> bool:
        return bool(self.command & option)

    def text(self) -> str:
        """The message (or nickname) text: UTF-8 if flagged, else guess the legacy encoding."""
        return decode_text(self.extra.split(b"\0", 1)[0], self.has(UTF8OPT))

    def group(self) -> str:
        parts = self.extra.split(b"\0")
        return decode_text(parts[1], self.has(UTF8OPT)) if len(parts) > 1 else ""


def client_name(tag: str) -> str:
    """Which program sent a packet with this version tag, for people."""
    if not tag:
        return "IP Messenger"  # the draft's own "1": IP Messenger and most clones
    if tag.startswith("lbt"):
        return "FeiQ"
    return tag


def absence(pkt: Packet) -> bool | None:
    """Is the sender of an entry packet away? None: its client sets the bit regardless."""
    if pkt.tag.startswith("iptux"):
        return None
    return pkt.has(ABSENCEOPT)


def decode_text(raw: bytes, utf8: bool) -> str:
    if utf8:
        return raw.decode("utf-8", "replace")
    # Legacy clients send their system encoding: Shift_JIS on Japanese Windows (IP Messenger),
    # GBK on Chinese ones (FeiQ). UTF-8 first: iptux and newer clients forget the flag.
    for codec in ("utf-8", "gbk", "cp932"):
        try:
            return raw.decode(codec)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def parse(data: bytes) -> Packet:
    if len(data) > MAX_PACKET:
        raise IpmsgError("too long")
    parts = data.split(b":", 5)
    if len(parts) != 6:
        raise IpmsgError("not six fields")
    version, packetno, user, host, command, extra = parts
    tag = _tag(version)
    if not (packetno.isdigit() and len(packetno) <= 20):
        raise IpmsgError("bad packet number")
    if not (command.isdigit() and len(command) <= 10 and int(command) < 2**32):
        raise IpmsgError("bad command")
    for field in (user, host):
        if len(field) > MAX_NAME or b"\0" in field:
            raise IpmsgError("bad user or host")
    return Packet(
        int(packetno),
        decode_text(user, True),
        decode_text(host, True),
        int(command),
        extra.rstrip(b"\0") if int(command) & MODE_MASK == RECVMSG else extra,
        tag,
    )


def _tag(version: bytes) -> str:
    """The client tag of a version field: "" for "1", the rest of "1_rest"; else an error."""
    if version == b"1":
        return ""
    rest = version[2:]
    if version[:2] != b"1_" or not 0 < len(rest) <= MAX_TAG or not all(0x20 <= c < 0x7F for c in rest):
        raise IpmsgError("version is not 1")
    return rest.decode("ascii")


def encode(packetno: int, user: str, host: str, command: int, extra: bytes = b"") -> bytes:
    """A packet; ``user`` and ``host`` must not contain ':' (we replace it)."""
    user_b = user.replace(":", "_").encode()[:MAX_NAME]
    host_b = host.replace(":", "_").encode()[:MAX_NAME]
    return b"1:%d:%s:%s:%d:%s" % (packetno, user_b, host_b, command, extra)


def entry_extra(nickname: str, group: str = "") -> bytes:
    return nickname.encode() + b"\0" + group.encode() + b"\0"


@dataclass(frozen=True)
class Attachment:
    """One file of a FILEATTACHOPT SENDMSG: ``fileID:name:size:mtime:attr[:ext...]``."""

    file_id: int
    name: str
    size: int
    mtime: int
    attr: int

    @property
    def regular(self) -> bool:
        return self.attr & MODE_MASK == FILE_REGULAR


def attachments(pkt: Packet) -> list[Attachment]:
    """The files a FILEATTACHOPT SENDMSG offers (after the NUL that ends its text).

    Entries end with BEL (``\\a``; some clients put ':' around it); a ':' in a name is
    doubled. The file id is decimal, size, mtime and attributes hex, as IP Messenger and
    iptux write them. An entry that does not parse is an :class:`IpmsgError`.
    """
    _, _, listing = pkt.extra.partition(b"\0")
    out: list[Attachment] = []
    for raw in listing.rstrip(b"\0").split(b"\a"):
        raw = raw.strip(b":")
        if not raw:
            continue
        if len(out) == MAX_ATTACHMENTS:
            raise IpmsgError("too many attachments")
        fields = _split_escaped(raw)
        if len(fields) < 5:
            raise IpmsgError("attachment without five fields")
        try:
            file_id = int(fields[0], 10)
            size, mtime, attr = (int(f, 16) for f in fields[2:5])
        except ValueError:
            raise IpmsgError("attachment numbers") from None
        if not (0 <= file_id < 2**32 and 0 <= size < 2**63 and 0 <= mtime < 2**64 and 0 <= attr < 2**32):
            raise IpmsgError("attachment numbers out of range")
        name = decode_text(fields[1], pkt.has(UTF8OPT))
        if not name:
            raise IpmsgError("attachment without a name")
        out.append(Attachment(file_id, name, size, mtime, attr))
    return out


def _split_escaped(raw: bytes) -> list[bytes]:
    """Split on ':' where '::' is a literal ':' (only names have one)."""
    fields, current, i = [], bytearray(), 0
    while i < len(raw):
        if raw[i : i + 2] == b"::":
            current += b":"
            i += 2
        elif raw[i : i + 1] == b":":
            fields.append(bytes(current))
            current = bytearray()
            i += 1
        else:
            current.append(raw[i])
            i += 1
    fields.append(bytes(current))
    return fields


def attachment_extra(text: str, files: list[Attachment]) -> bytes:
    """A SENDMSG's extra with ``files`` attached (send with FILEATTACHOPT)."""
    listing = b"".join(
        b"%d:%s:%x:%x:%x:\a" % (f.file_id, f.name.replace(":", "::").encode(), f.size, f.mtime, f.attr)
        for f in files
    )
    return text.encode() + b"\0" + listing + b"\0"


def file_request(pkt: Packet) -> tuple[int, int, int]:
    """(packet number, file id, offset) of a GETFILEDATA: hex ``packet:file:offset``."""
    fields = pkt.extra.rstrip(b"\0").split(b":")
    if len(fields) < 2 or any(not f or len(f) > 16 for f in fields[:3]):
        raise IpmsgError("bad file request")
    try:
        numbers = [int(f, 16) for f in fields[:3]]
    except ValueError:
        raise IpmsgError("bad file request") from None
    return numbers[0], numbers[1], numbers[2] if len(numbers) > 2 else 0


def file_request_extra(packetno: int, file_id: int, offset: int) -> bytes:
    return b"%x:%x:%x" % (packetno, file_id, offset)
