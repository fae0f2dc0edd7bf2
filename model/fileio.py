"""The one way Furnace writes a file or a folder that must never be seen half-written, and file checksums.

`atomic_write(path, data)`, `atomic_open(path)` and `atomic_path(path)` (for libraries that write by file
name): the bytes go to a hidden temporary file in the same folder, are flushed and fsynced, then
`os.replace`d over `path`; on any error (Ctrl-C included) the temporary file is removed and `path` is left as
it was. `atomic_dir(path)` does the same for a whole folder (a checkpoint, an export). A full disk (ENOSPC,
or EDQUOT over a quota) becomes one `FurnaceError` line saying the disk is full and where;
`disk_full_guard(where)` gives the same message for writes that are not atomic (appended logs).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from kernels.common import FurnaceError

_FULL = (errno.ENOSPC, errno.EDQUOT)
CHECKSUM_FILE = "checksums.json"


def disk_full_error(e: OSError, where: str | os.PathLike) -> FurnaceError | None:
    """A FurnaceError for a full disk while writing `where`, or None when `e` is another error."""
    if getattr(e, "errno", None) not in _FULL:
        return None
    return FurnaceError(f"disk full while writing {where} ({os.strerror(e.errno)}): free some space on that disk "
                        f"and run again (the partial file was removed; what was saved before is intact)")


@contextlib.contextmanager
def disk_full_guard(where: str | os.PathLike) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside the block into the one-line FurnaceError; other errors pass through."""
    try:
        yield
    except OSError as e:
        err = disk_full_error(e, where)
        if err is None:
            raise
        raise err from None


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask_mode(path: str | os.PathLike) -> None:
    """Give a new file the permissions the user's umask gives (0644 under umask 022): files written by a
    library that creates them private (safetensors: 0600) or through a temporary file end up like every
    other output."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _fsync_file(f: Path) -> None:
    with open(f, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a library that writes by file name (safetensors); on a clean
    exit it is fsynced and replaces `path`; on any error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with disk_full_guard(path):
            yield tmp
            _fsync_file(tmp)
            umask_mode(tmp)
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside `path` for writing (binary; "w" for text, UTF-8); on a clean exit it
    replaces `path`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode {mode!r}, expected 'w' or 'wb'")
    with atomic_path(path) as tmp, open(tmp, mode, encoding="utf-8" if mode == "w" else None) as f:
        yield f


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (text is UTF-8) to `path` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj, **kw) -> Path:
    return atomic_write(path, json.dumps(obj, **{"indent": 2, **kw}) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder beside `path`; on a clean exit it replaces `path` (an existing folder there
    is removed first). On any error the temporary folder is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    if tmp.exists():  # left by a run killed mid-write
        shutil.rmtree(tmp)
    try:
        with disk_full_guard(path):
            tmp.mkdir(parents=True)
            yield tmp
            for f in tmp.iterdir():  # the folder's files reach the disk before its name does
                if f.is_file():
                    umask_mode(f)
                    _fsync_file(f)
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
            _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---- checksums -------------------------------------------------------------------------------------------
def read_json_object(path: str | os.PathLike, what: str, hint: str = "") -> dict:
    """A JSON object read from `path` (never code), or a FurnaceError naming the file: unreadable, not JSON, or
    not an object. `what` says what the object should hold; `hint` (e.g. "; the checkpoint is damaged") ends
    the message."""
    f = Path(path)
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise FurnaceError(f"{f}: unreadable ({type(e).__name__}: {e}){hint}") from None
    except json.JSONDecodeError as e:
        raise FurnaceError(f"{f}: not valid JSON ({e}){hint}") from None
    if not isinstance(obj, dict):
        raise FurnaceError(f"{f}: expected a JSON object of {what}{hint}")
    return obj


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_checksums(d: Path) -> None:
    """`d/checksums.json`: the SHA-256 of every other file in folder `d`."""
    sums = {f.name: sha256_file(f) for f in sorted(d.iterdir()) if f.is_file() and f.name != CHECKSUM_FILE}
    atomic_write_json(d / CHECKSUM_FILE, sums)


def verify_checksums(d: Path, names: tuple[str, ...] | None = None, required: bool = False) -> None:
    """Check the files of folder `d` (all listed, or only `names`) against `d/checksums.json`.
    A folder without the file passes unless `required`; a mismatch is a FurnaceError naming the file."""
    f = d / CHECKSUM_FILE
    if not f.is_file():
        if required:
            raise FurnaceError(f"checkpoint {d}: {CHECKSUM_FILE} is missing, so its files cannot be verified")
        return
    sums = read_json_object(f, "file name -> sha256", "; the checkpoint is damaged")
    for name, want in sums.items():
        if names is not None and name not in names:
            continue
        p = d / name
        if not p.is_file():
            raise FurnaceError(f"checkpoint {d}: {name} is listed in {CHECKSUM_FILE} but missing")
        if sha256_file(p) != want:
            raise FurnaceError(f"{p}: checksum mismatch (the file changed or was damaged after it was written); "
                               f"resume from an earlier checkpoint or restore this file")
