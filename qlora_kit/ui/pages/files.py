"""Files in and out: a run's file or folder (a folder as a zip streamed while it is made,
downloads.py) and a data file uploaded into RUNS/uploads (uploads.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from ... import net
from .. import downloads, uploads
from ..state import State

router = APIRouter()


@router.get("/api/run/file")
def run_file(name: str, path: str, ui: State):
    d = ui.existing_run(name)
    p = downloads.inside(d, path)
    if p.is_dir():
        fname = f"{d.name}-{p.name}.zip"
        return StreamingResponse(downloads.zip_stream(p), media_type="application/zip",
                                 headers={"content-disposition": f'attachment; filename="{fname}"'})
    return FileResponse(p, filename=p.name, media_type="application/octet-stream")


@router.post("/api/uploads")
async def upload(request: Request, name: str, ui: State):
    uploads.safe_name(name)  # refused before a byte is read
    limit = ui.max_upload_bytes
    try:
        chunks = net.body_chunks(request, limit, uploads.TooLarge)
        p = await uploads.save(chunks, ui.root / "uploads", name, limit)
    except uploads.TooLarge:
        return JSONResponse({"error": f"the file is larger than the upload limit ({limit / 2**20:.0f} MiB)",
                             "hint": "type the file's path on this machine instead"}, status_code=413)
    return {"path": str(p), "name": p.name, "bytes": p.stat().st_size}
