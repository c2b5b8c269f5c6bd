"""Results to take away: a file as is, a folder (a merged model) as a zip built while it is sent.

The zip is stored, not deflated (safetensors do not compress), and written to the response as it
is made, so a 15 GB merged model needs neither 15 GB of temporary disk nor memory. Only paths
inside the run directory are served; symlinks out of it are refused.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from ..errors import UserError


def inside(root: Path, rel: str) -> Path:
    """root/rel, resolved, or UserError when it is not inside root."""
    if not rel or "\x00" in rel:
        raise UserError("no path given")
    root = root.resolve()
    p = (root / rel).resolve()
    if p != root and root not in p.parents:
        raise UserError(f"{rel}: not inside the run directory")
    if not p.exists():
        raise UserError(f"{rel}: not found")
    return p


class _Sink:
    """A write-only, unseekable stream: zipfile then writes data descriptors instead of seeking back."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, b) -> int:
        self.parts.append(bytes(b))
        return len(b)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


def zip_stream(folder: Path, chunk: int = 1 << 20):
    folder = folder.resolve()
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_symlink() or not f.is_file():
                continue
            if folder not in f.resolve().parents:
                continue
            arc = f"{folder.name}/{f.relative_to(folder).as_posix()}"
            with open(f, "rb") as src, zf.open(zipfile.ZipInfo.from_file(f, arc), "w", force_zip64=True) as dst:
                for block in iter(lambda: src.read(chunk), b""):
                    dst.write(block)
                    yield sink.take()
            yield sink.take()
    yield sink.take()
