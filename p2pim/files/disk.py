"""Files on disk for transfers: safe names, ``.part`` files, reading, hashing.

A sender names its file; the receiver decides where it goes. The name is cut
to its last path component, stripped of control characters and of anything a
file system or a shell would take specially (``..``, leading dots, slashes,
backslashes, NUL), and never overwrites: ``report (1).pdf``. Bytes go to a
``.part`` file beside it, fsynced before the receiver says they are safe; the
final name appears (one rename) only after the whole file's BLAKE2b matched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import unicodedata
from pathlib import Path

from .store import Transfer

HASH_SIZE = 32  # BLAKE2b-256 over the whole file
CHUNK_HASH_SIZE = 16  # BLAKE2b-128 over one chunk
READ_BLOCK = 1024 * 1024
MAX_NAME = 200  # characters kept of an offered name (file systems allow 255 bytes)
PART = ".part"


class FileError(Exception):
    """A file cannot be read, written or checked; the message says which and why."""


def file_hash(path: str | Path) -> bytes:
    h = hashlib.blake2b(digest_size=HASH_SIZE)
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            h.update(block)
    return h.digest()


def chunk_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=CHUNK_HASH_SIZE).digest()


def safe_name(offered: str) -> str:
    """A name that stays inside the download directory and shows what it is."""
    name = offered.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")  # controls, format chars
    name = name.strip().lstrip(".").strip()
    if len(name) > MAX_NAME:
        _, dot, ext = name.rpartition(".")
        keep = ext if dot and len(ext) <= 16 else ""
        name = name[: MAX_NAME - len(keep) - 1] + ("." + keep if keep else "")
    return name or "file"


def unique_path(directory: Path, name: str, own_part: str = "") -> Path:
    """``directory/name``, or ``name (1).ext``, ``name (2).ext``... whichever is free
    (counting the ``.part`` files of other transfers, but not ``own_part``, as taken)."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    for n in range(10_000):
        candidate = name if n == 0 else f"{stem} ({n}){'.' + ext if ext else ''}"
        path = directory / candidate
        part = str(path) + PART
        if not path.exists() and (part == own_part or not Path(part).exists()):
            return path
    raise FileError(f"no free name for {name} in {directory}")


def human_size(n: int) -> str:
    """Bytes for people: "6.3 MB" (powers of 1000, as file managers show them)."""
    if n < 1000:
        return f"{n} B"
    size = n / 1000
    for unit in ("KB", "MB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def download_dir() -> Path:
    """``$XDG_DOWNLOAD_DIR``, else ``~/Downloads``."""
    return Path(os.environ.get("XDG_DOWNLOAD_DIR") or Path.home() / "Downloads")


def free_space(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def source(path: str | Path) -> tuple[Path, os.stat_result]:
    """A file to offer: its absolute path and its stat, if it is a regular file we can read."""
    src = Path(path).expanduser().absolute()
    try:
        st = src.stat()
        if not src.is_file():
            raise FileError(f"{src} is not a regular file")
        with open(src, "rb"):
            pass
    except OSError as exc:
        raise FileError(f"{src}: {exc.strerror}") from None
    return src, st


def new_part(directory: Path, name: str, size: int) -> str:
    """Claim the ``.part`` file for an accepted file ``name`` of ``size`` bytes in
    ``directory`` (made if need be): created empty, so the name is ours."""
    where = directory.expanduser().absolute()
    try:
        where.mkdir(parents=True, exist_ok=True)
        if free_space(where) < size:
            raise FileError(f"not enough space in {where} for {name} ({human_size(size)})")
        part = str(unique_path(where, safe_name(name))) + PART
        os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise FileError(f"{where}: {exc.strerror}") from None
    return part


class Disk:
    """The file system side of transfers, for :class:`p2pim.files.transfer.Transfers`.

    Keeps one open descriptor per active transfer (the core bounds how many), so a
    256 MiB file is not opened 8,000 times.
    """

    def __init__(self) -> None:
        self._fds: dict[bytes, int] = {}

    def _fd(self, t: Transfer) -> int:
        fd = self._fds.get(t.file_id)
        if fd is None:
            try:
                if t.outgoing:
                    fd = os.open(t.path, os.O_RDONLY)
                else:
                    fd = os.open(t.part, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise FileError(f"{t.path if t.outgoing else t.part}: {exc.strerror}") from None
            self._fds[t.file_id] = fd
        return fd

    def check_source(self, t: Transfer) -> None:
        """The file we offered is still the file we offered (size and mtime)."""
        try:
            st = os.stat(t.path)
        except OSError as exc:
            raise FileError(f"{t.path}: {exc.strerror}") from None
        if st.st_size != t.size or st.st_mtime_ns != t.mtime_ns:
            raise FileError(f"{t.path} changed since it was offered")

    def read(self, t: Transfer, offset: int, size: int) -> bytes:
        try:
            data = os.pread(self._fd(t), size, offset)
        except OSError as exc:
            raise FileError(f"{t.path}: {exc.strerror}") from None
        if len(data) != min(size, t.size - offset):
            raise FileError(f"{t.path} is shorter than when it was offered")
        return data

    def resume(self, t: Transfer) -> int:
        """Open the ``.part`` for writing from ``durable``: anything past it was never
        confirmed (a crash mid-write) and is cut off. Returns where writing goes on."""
        fd = self._fd(t)
        try:
            if os.fstat(fd).st_size < t.durable:  # the .part lost bytes we had fsynced: start over
                os.ftruncate(fd, 0)
                return 0
            os.ftruncate(fd, t.durable)
        except OSError as exc:
            raise FileError(f"{t.part}: {exc.strerror}") from None
        return t.durable

    def write(self, t: Transfer, offset: int, data: bytes) -> None:
        """All of ``data`` at ``offset``: a short write is followed by the rest, so a full disk
        says so itself (ENOSPC) instead of leaving the caller a guess."""
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self._fd(t), view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise FileError(f"{t.part}: {exc.strerror}") from None

    def sync(self, t: Transfer) -> None:
        try:
            os.fsync(self._fd(t))
        except OSError as exc:
            raise FileError(f"{t.part}: {exc.strerror}") from None

    def finish(self, t: Transfer, check: bool = True) -> str:
        """Check the whole ``.part`` against the offered hash and give it its final name
        (free at this moment); returns that path. On a mismatch the ``.part`` is removed.
        ``check=False`` only for peers that send no hash (IP Messenger): the caller counted
        the size."""
        self.close(t)
        try:
            ok = not check or file_hash(t.part) == t.blake2b
        except OSError as exc:
            raise FileError(f"{t.part}: {exc.strerror}") from None
        if not ok:
            self.discard(t)
            raise FileError("the file that arrived does not match the hash offered: discarded")
        final = unique_path(Path(t.part).parent, Path(t.part[: -len(PART)]).name, t.part)
        try:
            os.link(t.part, final)  # never replaces a file that appeared meanwhile
            os.unlink(t.part)
            _fsync_dir(final.parent)
        except OSError as exc:
            raise FileError(f"{final}: {exc.strerror}") from None
        return str(final)

    def discard(self, t: Transfer) -> None:
        """Close, and for a receiver remove the ``.part`` (a cancelled or failed transfer)."""
        self.close(t)
        if not t.outgoing and t.part:
            try:
                os.unlink(t.part)
            except FileNotFoundError:
                pass
            except OSError:
                pass  # best effort: the state says failed either way

    def close(self, t: Transfer) -> None:
        fd = self._fds.pop(t.file_id, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
