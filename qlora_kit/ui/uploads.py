"""Uploaded data files: RUNS/uploads/<name>, size-limited, never outside that folder.

The body is the file itself (not multipart), so it streams straight to a temporary file in the
uploads folder and is renamed into place only when complete and within the limit: an oversize or
broken upload leaves nothing behind. A name that is not a plain file name is refused before a
byte is read. An existing upload is never overwritten (a run records its data file's sha256, and
resuming it checks that): the same content reuses the file, other content gets a new name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import unicodedata
from pathlib import Path

from .. import rundir
from ..data import DATA_SUFFIXES, file_sha256  # DATA_SUFFIXES: what the readers read, so what may be uploaded
from ..errors import UserError


class TooLarge(Exception):
    pass


# Characters that make a name display as something else: bidirectional embeddings, overrides and
# isolates ("evil\u202Elnosj.exe" shows as "evilexe.jsonl"), the invisible direction marks, and
# line/paragraph separators. Control characters (Cc) are refused as well.
INVISIBLE = {*map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A)), "\u200e", "\u200f", "\u061c",
             "\u2028", "\u2029"}


def safe_name(name: str | None) -> str:
    """The name itself, or UserError: no path parts, no NUL or control characters, no hidden files."""
    if not name:
        raise UserError("the upload has no file name")
    if any(c in name for c in ("/", "\\", "\x00")) or any(unicodedata.category(c) == "Cc" or c in INVISIBLE for c in name):
        raise UserError(f"upload name {name!r} is not a plain file name",
                        "rename the file (no folders, control characters or text-direction characters)")
    if name.startswith(".") or name != name.strip() or len(name.encode("utf-8")) > 200:
        raise UserError(f"upload name {name!r} is not a plain file name",
                        "rename the file: no leading dot or spaces, at most 200 bytes")
    if os.path.splitext(name)[1].lower() not in DATA_SUFFIXES:  # the New run form would refuse it anyway
        raise UserError(f"upload name {name!r} is not a data file", f"upload a {', '.join(DATA_SUFFIXES)} file")
    return name


def _free_name(folder: Path, name: str, digest: str) -> tuple[Path, bool]:
    """(target, already there with this content)."""
    stem, suffix = os.path.splitext(name)
    for n in range(1, 1000):
        p = folder / (name if n == 1 else f"{stem}-{n}{suffix}")
        if not p.exists():
            return p, False
        if p.is_file() and file_sha256(p) == digest:
            return p, True
    raise UserError(f"too many uploads named {name}", "rename the file")


async def save(chunks, folder: Path, name: str, limit: int) -> Path:
    """Write an async iterator of byte chunks to folder/name (or a free variant); TooLarge past `limit`."""
    name = safe_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=folder)
    h, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise TooLarge
                h.update(chunk)
                f.write(chunk)
        target, same = _free_name(folder, name, h.hexdigest())
        if same:
            os.unlink(tmp)
            return target
        rundir.share(tmp)  # mkstemp makes 0600; the upload is read like any file the user saved
        try:
            os.link(tmp, target)  # fails rather than replaces if the name was taken meanwhile
            os.unlink(tmp)
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links
            os.rename(tmp, target)
        return target
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
