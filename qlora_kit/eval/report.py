"""The evaluation report a domain expert reads: report.md, report.html, plots/, review.csv.

The HTML is one self-contained file (plots embedded as data: URIs, no CDN, no script), so it
opens offline and can be mailed to a colleague. review.csv is the blind sheet for grading answers
by hand (grades.py); once graded and read back, the human grades are a section of the report.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .. import rundir
from . import grades, metrics

# the run's own numbers around the answers' metrics (metrics.labels(): generic, then each domain family's)
_LOSS = {"eval_loss": ("eval loss", False), "perplexity": ("perplexity", False)}
_SPEED = {"tokens_per_s": ("tokens/s", True), "tokens_per_s_constrained": ("tokens/s, constrained", True),
          "latency_p50_s": ("latency p50 (s)", False), "latency_p99_s": ("latency p99 (s)", False)}


def labels() -> dict[str, tuple[str, bool]]:
    """metric key -> (label, higher is better), in the order of the report's table."""
    return {**_LOSS, **metrics.labels(), **_SPEED}


def metric_rows(summary: dict) -> list[tuple[str, float | None, float | None, float | None, bool]]:
    out = []
    for key, (label, higher) in labels().items():
        b, t = summary["base"].get(key), summary["tuned"].get(key)
        if b is None and t is None:
            continue
        delta = t - b if (b is not None and t is not None) else None
        out.append((label, b, t, delta, higher))
    return out


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"


def _curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    p = run_dir / "metrics.json"
    if not p.is_file():
        return {}
    hist = json.loads(p.read_text(encoding="utf-8")).get("log_history", [])
    return {"train loss": [(h["step"], h["loss"]) for h in hist if "loss" in h and "step" in h],
            "eval loss": [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h and "step" in h]}


def plot_losses(run_dir: Path) -> Path | None:
    curves = _curves(run_dir)
    if not any(curves.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for name, pts in curves.items():
        if pts:
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o" if name == "eval loss" else None,
                    markersize=3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "plots" / "loss.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def best_and_worst(result: dict, k: int = 3):
    key = metrics.primary(result["task"])

    def gain(r):
        t, b = r["tuned"].get(key), r["base"].get(key)
        if t is None or b is None:
            t, b = r["tuned"]["rouge_l"], r["base"]["rouge_l"]
        return t - b

    rows = sorted(result["rows"], key=gain)
    return rows[::-1][:k], rows[:k], key


def _ask_to_grade(sheet: Path | None) -> str:
    if sheet is None:
        return ""
    return (f"Grade the answers blind: send {sheet.name} to a domain expert (keep {grades.key_path(sheet).name} here, "
            f"it says which answer is which), then run qlora-kit eval {sheet.parent} --grades GRADED_FILE (one per grader).")


def _agreement(a: dict) -> str:
    """The agreement sentence of the report (markdown and HTML alike)."""
    return ("Agreement between graders (1 = perfect, 0 = chance): Krippendorff's alpha on preferences "
            f"{grades.num(a['alpha_preference_nominal'])} (nominal), on grades {grades.num(a['alpha_grades_interval'])} (interval)"
            + (f"; Cohen's kappa on preferences {grades.num(a['cohen_kappa_preference'])} ({a['units_both']} rows)"
               if "cohen_kappa_preference" in a else "") + ".")


def grading_markdown(g: dict) -> list[str]:
    m = g["models"]
    lines = ["## Human grades (blind)", "",
             f"{g['rows_graded']} rows graded by {', '.join(g['graders'])} ({', '.join(g['sheets'])}; "
             f"key: {', '.join(g['keys'])}).", "",
             "| model | mean grade (1-5) | n |", "|---|---:|---:|",
             f"| base | {grades.num(m['base']['mean'])} | {m['base']['n']} |",
             f"| tuned | {grades.num(m['tuned']['mean'])} | {m['tuned']['n']} |", "",
             grades.headline(g) + " A row's verdict is its graders' majority; without a preference the higher grade wins."]
    if len(g["per_grader"]) > 1:
        lines += ["", "| grader | base mean | tuned mean | tuned preferred | tie | base preferred |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {p['grader']} | {grades.num(p['base_mean'])} | {grades.num(p['tuned_mean'])} | {p['prefers_tuned']} | "
                  f"{p['prefers_tie']} | {p['prefers_base']} |" for p in g["per_grader"]]
    a = g.get("agreement")
    if a:
        lines += ["", _agreement(a)]
        if g["disagreements"]:
            lines += ["", "### Rows the graders disagree on", "", "| id | where | question | grades (base/tuned, preferred) |",
                      "|---|---|---|---|"]
            for d in g["disagreements"]:
                cells = (d["id"], d["where"], d["question"][:120], grades.verdicts(d))
                lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return lines


def grading_html(g: dict) -> str:
    e = html.escape
    m = g["models"]
    out = [f"<h2>Human grades (blind)</h2><p>{g['rows_graded']} rows graded by {e(', '.join(g['graders']))} "
           f"({e(', '.join(g['sheets']))}; key: {e(', '.join(g['keys']))}).</p>",
           "<table><tr><th>model</th><th>mean grade (1-5)</th><th>n</th></tr>"
           + "".join(f"<tr><td>{k}</td><td>{grades.num(m[k]['mean'])}</td><td>{m[k]['n']}</td></tr>" for k in ("base", "tuned"))
           + "</table>",
           f"<p><b>{e(grades.headline(g))}</b> A row's verdict is its graders' majority; without a preference the "
           "higher grade wins.</p>"]
    if len(g["per_grader"]) > 1:
        out.append("<table><tr><th>grader</th><th>base mean</th><th>tuned mean</th><th>tuned preferred</th><th>tie</th>"
                   "<th>base preferred</th></tr>" + "".join(
                       f"<tr><td>{e(p['grader'])}</td><td>{grades.num(p['base_mean'])}</td><td>{grades.num(p['tuned_mean'])}</td>"
                       f"<td>{p['prefers_tuned']}</td><td>{p['prefers_tie']}</td><td>{p['prefers_base']}</td></tr>"
                       for p in g["per_grader"]) + "</table>")
    a = g.get("agreement")
    if a:
        out.append(f"<p>{_agreement(a)}</p>")  # numbers and fixed words only: nothing to escape
        if g["disagreements"]:
            out.append("<h3>Rows the graders disagree on</h3><table><tr><th>id</th><th>question</th>"
                       "<th>grades (base/tuned, preferred)</th></tr>" + "".join(
                           f"<tr><td>{e(d['id'])}<br>{e(d['where'])}</td><td>{e(d['question'][:400])}</td>"
                           f"<td>{e(grades.verdicts(d))}</td></tr>" for d in g["disagreements"]) + "</table>")
    return "\n".join(out)


def write_markdown(run_dir: Path, result: dict | None, plot: Path | None, sheet: Path | None = None,
                   grading: dict | None = None) -> Path:
    if result is None:  # grades read back in a run that has no eval.json
        lines = [f"# Evaluation: {run_dir.name}", "", "No eval.json in this run: human grades only."]
        lines += ["", *grading_markdown(grading)] if grading else []
        out = run_dir / "report.md"
        rundir.write_atomic(out, "\n".join(lines) + "\n")
        return out
    s = result["summary"]
    lines = [f"# Evaluation: {run_dir.name}", "",
             f"{result['samples']} held-out samples ({result['data']}), task **{result['task']}**, base model "
             f"`{result['base_model']}`; base and tuned use the same 4-bit base, chat template and greedy decoding.", "",
             "| metric | base | tuned | delta |", "|---|---:|---:|---:|"]
    for label, b, t, d, higher in metric_rows(s):
        lines.append(f"| {label}{'' if higher else ' (lower is better)'} | {_fmt(b)} | {_fmt(t)} | {_fmt(d)} |")
    if grading:
        lines += ["", *grading_markdown(grading)]
    if plot:
        lines += ["", f"![loss curves]({plot.relative_to(run_dir)})"]
    best, worst, key = best_and_worst(result)
    for title, rows in (("Most improved", best), ("Least improved", worst)):
        lines += ["", f"## {title} (by {key})", ""]
        for r in rows:
            lines += [f"**{r['where']}** — {r['question'][:200]}", "",
                      f"- reference: {r['reference'][:300]}", f"- base: {r['base']['answer'][:300]}",
                      f"- tuned: {r['tuned']['answer'][:300]}", ""]
    lines += ["", _ask_to_grade(sheet)] if sheet else []
    out = run_dir / "report.md"
    rundir.write_atomic(out, "\n".join(lines) + "\n")
    return out


def write_html(run_dir: Path, result: dict | None, plot: Path | None, sheet: Path | None = None,
               grading: dict | None = None) -> Path:
    e = html.escape
    graded = grading_html(grading) if grading else ""
    if result is None:  # grades read back in a run that has no eval.json
        return _page(run_dir, "<p>No eval.json in this run: human grades only.</p>" + graded)
    s = result["summary"]
    rows = "".join(
        f"<tr><td>{e(label)}{'' if higher else ' <small>(lower is better)</small>'}</td><td>{_fmt(b)}</td>"
        f"<td>{_fmt(t)}</td><td class='{'good' if d is not None and (d > 0) == higher and d != 0 else 'bad' if d else ''}'>"
        f"{_fmt(d)}</td></tr>" for label, b, t, d, higher in metric_rows(s))
    img = ""
    if plot:
        data = base64.b64encode(plot.read_bytes()).decode()
        img = f"<h2>Training</h2><img alt='train and eval loss' src='data:image/png;base64,{data}'>"
    best, worst, key = best_and_worst(result)

    def examples(title, rs):
        cells = "".join(
            f"<tr><td>{e(r['where'])}<br>{e(r['question'][:400])}</td><td>{e(r['reference'][:600])}</td>"
            f"<td>{e(r['base']['answer'][:600])}</td><td>{e(r['tuned']['answer'][:600])}</td></tr>" for r in rs)
        return (f"<h2>{e(title)} (by {e(key)})</h2><table><tr><th>question</th><th>reference</th><th>base</th>"
                f"<th>tuned</th></tr>{cells}</table>")

    ask = f"<p>{e(_ask_to_grade(sheet))}</p>" if sheet else ""
    body = f"""<p>{result['samples']} held-out samples ({e(str(result['data']))}), task <b>{e(result['task'])}</b>, base model
<code>{e(result['base_model'])}</code>. Base and tuned use the same 4-bit base, chat template and greedy decoding.</p>
<table><tr><th>metric</th><th>base</th><th>tuned</th><th>delta</th></tr>{rows}</table>
{graded}
{img}
{examples('Most improved', best)}
{examples('Least improved', worst)}
{ask}"""
    return _page(run_dir, body)


def _page(run_dir: Path, body: str) -> Path:
    e = html.escape
    page = f"""<!doctype html>
<html lang="zh"><head><meta charset="utf-8"><title>qlora-kit eval: {e(run_dir.name)}</title>
<style>
body{{font-family:system-ui,-apple-system,"PingFang SC","Microsoft YaHei",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;width:100%;margin:1em 0}}td,th{{border:1px solid #ddd;padding:6px 8px;vertical-align:top;text-align:left}}
th{{background:#f5f5f5}}.good{{color:#0a7a2f;font-weight:600}}.bad{{color:#b00020;font-weight:600}}img{{max-width:100%}}
</style></head><body>
<h1>Evaluation: {e(run_dir.name)}</h1>
{body}
</body></html>
"""
    out = run_dir / "report.html"
    rundir.write_atomic(out, page)
    return out


def write(run_dir: Path, result: dict | None, grading: dict | None = None, new_sheet: bool = True) -> dict[str, Path]:
    """The report; with new_sheet a fresh blind review sheet (never over a graded one), with grading
    (grades.summarise) the human grades as a section."""
    sheet = grades.write_sheet(run_dir, result["rows"]) if new_sheet and result else None
    plot = plot_losses(run_dir)
    return {"markdown": write_markdown(run_dir, result, plot, sheet, grading),
            "html": write_html(run_dir, result, plot, sheet, grading),
            **({"review": sheet} if sheet else {}), **({"plot": plot} if plot else {})}
