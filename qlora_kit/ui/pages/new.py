"""The New run form: the built-in recipes it is prefilled with, train's own checks on what it holds,
and `qlora-kit train` started from it (newrun.py turns the form into that command)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from ...errors import UserError
from .. import jobs, newrun
from ..state import Form, State

router = APIRouter()


@router.get("/api/recipes")
def recipes():
    return {"recipes": newrun.recipe_defaults()}


@router.post("/api/check")
async def check(form: Form, ui: State):
    spec = newrun.parse(form, ui.readable, ui.grants)
    result = await run_in_threadpool(newrun.check, spec)  # loads a tokenizer, reads the data: off the loop
    return {**result, "command": jobs.shown(newrun.argv(spec, ui.root / "NAME"))}


@router.post("/api/start")
async def start(form: Form, ui: State):
    spec = newrun.parse(form, ui.readable, ui.grants)
    await run_in_threadpool(newrun.check, spec)  # what train would refuse is refused here, same words
    name = newrun.new_name(ui.root, spec, (form.get("name") or "").strip() or None)
    argv = newrun.argv(spec, ui.root / name)
    try:
        job = ui.jobs.start(name, "train", argv)
    except RuntimeError as e:
        raise UserError(str(e)) from None
    return {"name": name, "command": job["command"]}
