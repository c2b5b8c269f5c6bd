"""What `train` checks before it writes anything, and the samples it trains on.

preflight: data read/check/split, base model resolution, GPU-only switches, the memory plan. The ui's
new-run page runs the same checks (and training_rows + require_trainable) before it starts a run, so
the refusals read the same there as on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..recipe import Recipe
from ..terminal import console
from .adapter import from_adapter_folder


@dataclass
class Preflight:
    """What `train` checks before it writes anything; the UI shows it before it starts a run."""
    prep: object  # data.check.Prepared
    model_dir: str
    plan: dict | None
    warnings: list[str] = field(default_factory=list)

    @property
    def report(self) -> dict:
        return self.prep.report


def preflight(recipe: Recipe, quiet: bool = False, measure: bool = False) -> Preflight:
    """Data read/check/split, base model resolution, GPU-only switches, memory plan. Raises the
    UserError that `train` would raise, with the same message, and writes nothing. `measure`: the
    data report also has token lengths and an encoded sample (as `data check --recipe` shows),
    which needs the tokenizer; `train` encodes later with the one it trains with."""
    say = (lambda *a, **k: None) if quiet else console.print
    # 1. data: read, check, split (no model yet, so bad files fail in a second)
    from ..data import check
    from ..model import load_tokenizer_for_check

    prep = check.prepare(recipe, *load_tokenizer_for_check(recipe)) if measure else check.prepare(recipe)
    rep = prep.report
    say(f"data: {rep['split']['train'] + rep['split']['eval']} conversations from {rep['file']} "
        f"({rep['format']}, {rep['encoding']}, {rep['layout']})")
    for row in (rep["bad_rows"] + rep["dropped"])[:5]:
        say(f"  [yellow]dropped[/] {row['where']}: {row['reason']}", highlight=False)

    # 2. base model (a hub id offline fails here, before anything heavy)
    from ..devices import has_gpu
    from ..model import resolve_base_model

    warnings = []
    if not has_gpu() and not recipe.base_model.startswith("builtin:") and not Path(recipe.base_model).is_dir():
        warnings.append("no CUDA GPU found; a multi-billion-parameter model trains on CPU at a few tokens per "
                        "second (use --base-model builtin:tiny to check the pipeline)")
    model_dir = resolve_base_model(recipe.base_model, recipe.revision, recipe.trust_remote_code, recipe.allow_pickle)
    if recipe.from_adapter:
        from_adapter_folder(recipe.from_adapter, recipe.base_model, model_dir)
    check_device_switches(recipe)  # GPU-only switches are refused before anything is written
    plan = memory_plan(recipe, model_dir, say, warnings)
    return Preflight(prep, model_dir, plan, warnings)


def memory_plan(recipe: Recipe, model_dir: str, say, warnings: list[str]) -> dict | None:
    """2b. will it fit? (from the config alone; the planner's components are in `qlora-kit plan`).
    Adds a warning when it does not; None when the planner cannot plan this model (said why)."""
    from .. import plan as plan_mod
    from ..devices import has_gpu

    plan = None
    try:
        import torch

        budget = torch.cuda.mem_get_info()[1] if has_gpu() else 24 * plan_mod.GiB
        p = plan_mod.make(recipe, model_dir, budget)
        plan = p.to_dict()
        where = "this GPU" if has_gpu() else "a 24 GiB GPU (this run is on CPU)"
        say(f"memory plan: about {p.total / plan_mod.GiB:.1f} GiB peak on {where}", highlight=False)
        if not p.fits:
            warnings.append(f"the memory estimate exceeds {budget / plan_mod.GiB:.0f} GiB; micro-batch "
                            f"{p.best_micro_batch or 1} or max_length {p.longest_max_length:,} would fit "
                            f"(`qlora-kit plan {recipe.name}` shows the components)")
    except UserError as e:
        say(f"memory plan unavailable: {e.message}", highlight=False)
    return plan


def check_device_switches(recipe: Recipe) -> None:
    from ..devices import has_gpu

    if recipe.training.activation_offloading and not has_gpu():
        raise UserError("training.activation_offloading moves activations from GPU to CPU memory; there is no GPU here",
                        "set training.activation_offloading: false")
    use_liger(recipe)
    from .. import attention

    attention.choose(recipe.training, has_gpu(), attention.flash_attn_available())  # refuses impossible layouts


def use_liger(recipe: Recipe) -> bool:
    """Fused linear cross-entropy never materialises full-vocabulary logits; it needs a GPU.
    training.liger_kernel: true where it cannot run is refused (fastpath.choose_loss_head)."""
    from ..devices import has_gpu
    from . import fastpath

    return fastpath.choose_loss_head(recipe.training, 0, has_gpu(), fastpath.liger_available())[0] == "liger"


def data_files(rep: dict) -> list[dict]:
    """run.json's record of each data file: its path, sha256, rows read, and its rows in the split."""
    return [{"path": str(Path(s["path"]).resolve()), "sha256": s["sha256"], "rows": s["rows_read"],
             "train": s.get("train"), "eval": s.get("eval")} for s in rep["sources"]]


def encode_samples(recipe: Recipe, pre: Preflight):
    """3. tokenizer and template; answer-only labels with EOS in the loss (cached by content).
    Returns (tokenizer, its template/stop-token facts, train rows, eval rows)."""
    from ..data import check
    from ..model import load_tokenizer, prepare_tokenizer
    from ..quiet import quiet_libraries

    quiet_libraries()
    tokenizer = load_tokenizer(pre.model_dir, recipe)
    tok_info = prepare_tokenizer(tokenizer, recipe, pre.model_dir)
    check.encode(pre.prep, recipe, tokenizer, set(tok_info.stop_token_ids))
    for warning in pre.report["warnings"]:
        console.print(f"[yellow]warning[/]: {warning}", highlight=False)
    train_rows, eval_rows = training_rows(pre.prep, pre.prep.train_idx), training_rows(pre.prep, pre.prep.eval_idx)
    require_trainable(train_rows, pre.prep, recipe)
    return tokenizer, tok_info, train_rows, eval_rows


def training_rows(prep, idx) -> list[dict]:
    """The encoded samples that teach something: a prompt that fills max_length has no answer token."""
    out = []
    for i in idx:
        e = prep.encoded[i]
        if any(x != -100 for x in e.labels):
            out.append({"input_ids": e.input_ids, "labels": e.labels})
    return out


def require_trainable(train_rows: list[dict], prep, recipe: Recipe) -> None:
    """The refusal that needs the encoded data (so it comes after preflight); the UI makes it too."""
    if not train_rows:
        raise UserError(f"{prep.report['file']}: no training sample has an answer token within "
                        f"max_length={recipe.training.max_length}", "raise training.max_length")

