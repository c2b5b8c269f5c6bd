"""`qlora-kit eval RUN_DIR`: does the adapter help, on questions it did not train on?

Base and tuned model are the same 4-bit base (the adapter switched off and on), the same chat
template (the run's), greedy decoding. Each held-out question is answered by both; answers are
scored with generic character-level metrics and the recipe's domain metrics (eval/metrics.py, one module per family);
teacher-forced eval loss on the reference answers is measured for both too. When the answers are
JSON (a JSON task, a recipe's evaluation.json_schema or --json-schema), each question is answered
once more under the schema (constrained decoding, serve/structured.py) and the valid-JSON rate of both
answers is reported. `report.py` turns
the result into report.md, report.html (with loss curves) and review.csv in the run directory.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path


from .. import rundir
from ..run import Run, data_changed, open_run, read_info
from ..errors import UserError
from ..terminal import console
from . import metrics


def held_out(r: Run, data_file: str | None):
    """(conversations, wheres): a given file whole, or the run's own eval split (same split as training,
    so refused when the data files are no longer the ones the run was trained on)."""
    from .. import data as data_mod
    from ..data import check

    run_dir, recipe = r.dir, r.recipe
    if data_file:
        ds = data_mod.load_recipe_data(recipe.data, data_file)
        return ds.conversations, ds.wheres
    prep = check.prepare(recipe)
    changed = data_changed(r.info, r.dir, [(s["path"], s["sha256"]) for s in prep.report.get("sources", [])])
    if changed:
        raise UserError(f"{changed}: its split is not the held-out split of training, and may hold trained questions",
                        "restore the data the run was trained on, or pass --data FILE with questions it did not train on")
    if not prep.eval_idx:
        raise UserError(f"{run_dir}: the run has no held-out split (data.eval_fraction is 0 or the data is tiny)",
                        "pass --data FILE with questions the model did not train on")
    convs = check.conversations(prep, recipe)
    return [convs[i] for i in prep.eval_idx], [prep.wheres[i] for i in prep.eval_idx]


def answer_loss(engine, conv) -> tuple[float, int]:
    """Summed NLL and count of the reference answer tokens, teacher-forced, with the active model."""
    import contextlib

    import torch

    from ..template import encode_batch

    a = engine.current
    e = encode_batch(a.tokenizer, [conv], 1 << 30, set(a.stop_ids))[0]
    ids = torch.tensor([e.input_ids], device=engine.model.device)
    labels = torch.tensor([e.labels], device=engine.model.device)
    off = engine.model.disable_adapter() if engine.active is None else contextlib.nullcontext()
    with off, torch.no_grad():
        logits = engine.model(input_ids=ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
    return float(nll), int((labels[0, 1:] != -100).sum())


def _percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def eval_constraint(recipe, json_schema: str | Path | None):
    """The JSON constraint eval also answers under (None: the answers are not JSON): --json-schema,
    else the recipe's evaluation.json_schema, else any JSON object for a task scored on JSON fields."""
    from ..serve import structured

    if json_schema:
        return structured.load(json_schema)
    if recipe.evaluation.json_schema:
        return structured.load(recipe.evaluation.json_schema, "the run's evaluation.json_schema")
    return structured.json_object() if metrics.reads_json(recipe.evaluation.task) else None


def json_metrics(constraint, task: str, free: str, constrained, ref: str) -> dict:
    """Valid JSON rate of the free answer and of the one decoded under the constraint: the whole answer
    one JSON value that matches the schema (what a program reading it needs), and, for JSON tasks,
    field accuracy of the constrained answer."""
    out = {"json_schema_valid": float(constraint.problem(free) is None),
           "json_schema_valid_constrained": float(constraint.problem(constrained.text) is None)}
    if metrics.reads_json(task):
        out["field_accuracy_constrained"] = metrics.json_scores(constrained.text, ref)["field_accuracy"]
    return out


SIDES = {"base": None, "tuned": "tuned"}  # side -> the engine's adapter (None: the adapter switched off)


def answer_both(engine, conv, where: str, ev, max_new: int, constraint) -> dict:
    """One held-out question answered by base and tuned, each answer scored (ev: the recipe's evaluation)."""
    last = max(j for j, m in enumerate(conv) if m["role"] == "assistant")
    conv = conv[: last + 1]
    prompt, ref = conv[:last], conv[last]["content"]
    question = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    row = {"where": where, "question": question, "reference": ref}
    for side, name in SIDES.items():
        engine.use(name)
        res = engine.generate(prompt, max_new)
        nll, count = answer_loss(engine, conv)
        row[side] = {"answer": res.text, "new_tokens": res.new_tokens, "seconds": res.seconds,
                     "nll": nll, "answer_tokens": count,
                     **metrics.score(ev.task, res.text, ref, ev.glossary)}
        if constraint is not None:
            res_c = engine.generate(prompt, max_new, constraint=constraint)
            row[side].update(answer_constrained=res_c.text, constrained_tokens=res_c.new_tokens,
                             constrained_seconds=res_c.seconds,
                             **json_metrics(constraint, ev.task, res.text, res_c, ref))
    return row


def summarise(rows: list[dict], side: str, constraint) -> dict:
    """One side's means, eval loss over all answer tokens, speed and latency."""
    agg = metrics.aggregate([{k: v for k, v in r[side].items() if k not in ("answer", "answer_constrained")}
                             for r in rows])
    nll = sum(r[side]["nll"] for r in rows)
    cnt = sum(r[side]["answer_tokens"] for r in rows)
    agg["eval_loss"] = nll / max(cnt, 1)
    agg["perplexity"] = math.exp(min(agg["eval_loss"], 50))
    secs = [r[side]["seconds"] for r in rows]
    toks = sum(r[side]["new_tokens"] for r in rows)
    agg["tokens_per_s"] = toks / max(sum(secs), 1e-9)
    agg["latency_p50_s"] = _percentile(secs, 0.5)
    agg["latency_p99_s"] = _percentile(secs, 0.99)
    if constraint is not None:
        agg["tokens_per_s_constrained"] = (sum(r[side]["constrained_tokens"] for r in rows)
                                           / max(sum(r[side]["constrained_seconds"] for r in rows), 1e-9))
    for k in ("nll", "answer_tokens", "seconds", "new_tokens", "constrained_tokens", "constrained_seconds"):
        agg.pop(k, None)
    return agg


def run(run_dir: str | Path, data_file: str | None = None, limit: int | None = None,
        max_new_tokens: int | None = None, grants=None, json_schema: str | Path | None = None) -> dict:
    """`grants` (recipe.Grants): what this command's flags allow; the run's recipe.yaml grants nothing.
    `json_schema`: a JSON Schema file to answer under as well (default: see eval_constraint)."""
    from ..serve.engine import Engine
    from ..model import refuse_unsafe
    from ..recipe import Grants

    grants = grants or Grants()
    target = Path(run_dir)  # RUN or one of its checkpoints: the results are written there
    r = open_run(target, grants)
    run_dir, info, recipe = r.dir, r.info, r.recipe
    # before the held-out data is prepared: a refusal should cost nothing
    refuse_unsafe(r.base_model_path, grants.trust_remote_code, grants.allow_pickle)
    ev = recipe.evaluation
    constraint = eval_constraint(recipe, json_schema)  # a bad schema is refused before any model loads
    convs, wheres = held_out(r, data_file)
    n = limit or ev.limit
    if n:
        convs, wheres = convs[:n], wheres[:n]
    max_new = max_new_tokens or ev.max_new_tokens
    engine = Engine.from_runs({"tuned": target}, grants)
    console.print(f"eval: {len(convs)} held-out samples, task {ev.task}, greedy, up to {max_new} new tokens"
                  + (f"; each also constrained to JSON ({constraint.name})" if constraint else ""))

    rows = []
    for i, (conv, where) in enumerate(zip(convs, wheres)):
        row = answer_both(engine, conv, where, ev, max_new, constraint)
        rows.append(row)
        console.print(f"  {i + 1}/{len(convs)} rouge_l base {row['base']['rouge_l']:.2f} -> tuned {row['tuned']['rouge_l']:.2f}",
                      highlight=False)
    summary = {side: summarise(rows, side, constraint) for side in SIDES}
    result = {
        "run_dir": str(run_dir), "adapter": str(target), "base_model": info.base_model, "task": ev.task, "samples": len(rows),
        "data": data_file or "held-out split of the training data", "max_new_tokens": max_new,
        "json_schema": constraint.name if constraint else None,
        "summary": summary, "rows": rows, "created": rundir.now(),
        "device": info.device, "median_answer_tokens": statistics.median([r["tuned"]["new_tokens"] for r in rows]) if rows else 0,
    }
    rundir.write_json(target / "eval.json", result)  # a checkpoint's results never replace the final adapter's
    from . import report

    report.write(target, result)
    return result


def grade(run_dir: str | Path, files: list[Path]) -> dict:
    """`eval --grades`: read graded sheets, write grades.json and the report with the grades in it. No model needed."""
    from . import grades, report

    run_dir = Path(run_dir)
    read_info(run_dir)  # a clear error for a wrong folder
    summary = grades.summarise(grades.read_all(run_dir, files))
    summary["created"] = rundir.now()
    rundir.write_json(run_dir / "grades.json", summary)
    ev = run_dir / "eval.json"
    result = json.loads(ev.read_text(encoding="utf-8")) if ev.is_file() else None
    report.write(run_dir, result, grading=summary, new_sheet=False)
    grades.print_summary(summary)
    return summary
