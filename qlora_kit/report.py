"""The evaluation report a domain expert reads: report.md, report.html, plots/, review.csv.

The HTML is one self-contained file (plots embedded as data: URIs, no CDN, no script), so it
opens offline and can be mailed to a colleague. review.csv is for grading answers by hand.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

from . import rundir

LABELS = {
    "eval_loss": ("eval loss", False), "perplexity": ("perplexity", False), "exact_match": ("exact match", True),
    "rouge_l": ("ROUGE-L (char)", True), "bleu": ("BLEU-4 (char)", True), "citation_f1": ("citation F1", True),
    "citation_exact": ("citation exact", True), "json_valid": ("valid JSON", True),
    "field_accuracy": ("JSON field accuracy", True), "term_recall": ("key-term recall", True),
    "contradiction": ("contradiction rate", False), "tokens_per_s": ("tokens/s", True),
    "latency_p50_s": ("latency p50 (s)", False), "latency_p99_s": ("latency p99 (s)", False),
}
PRIMARY = {"legal": "citation_f1", "finance": "field_accuracy", "medical": "term_recall", "industrial": "term_recall"}


def metric_rows(summary: dict) -> list[tuple[str, float | None, float | None, float | None, bool]]:
    out = []
    for key, (label, higher) in LABELS.items():
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
    key = PRIMARY.get(result["task"], "rouge_l")

    def gain(r):
        t, b = r["tuned"].get(key), r["base"].get(key)
        if t is None or b is None:
            t, b = r["tuned"]["rouge_l"], r["base"]["rouge_l"]
        return t - b

    rows = sorted(result["rows"], key=gain)
    return rows[::-1][:k], rows[:k], key


def write_markdown(run_dir: Path, result: dict, plot: Path | None) -> Path:
    s = result["summary"]
    lines = [f"# Evaluation: {run_dir.name}", "",
             f"{result['samples']} held-out samples ({result['data']}), task **{result['task']}**, base model "
             f"`{result['base_model']}`; base and tuned use the same 4-bit base, chat template and greedy decoding.", "",
             "| metric | base | tuned | delta |", "|---|---:|---:|---:|"]
    for label, b, t, d, higher in metric_rows(s):
        lines.append(f"| {label}{'' if higher else ' (lower is better)'} | {_fmt(b)} | {_fmt(t)} | {_fmt(d)} |")
    if plot:
        lines += ["", f"![loss curves]({plot.relative_to(run_dir)})"]
    best, worst, key = best_and_worst(result)
    for title, rows in (("Most improved", best), ("Least improved", worst)):
        lines += ["", f"## {title} (by {key})", ""]
        for r in rows:
            lines += [f"**{r['where']}** — {r['question'][:200]}", "",
                      f"- reference: {r['reference'][:300]}", f"- base: {r['base']['answer'][:300]}",
                      f"- tuned: {r['tuned']['answer'][:300]}", ""]
    lines += ["", "Grade answers by hand in `review.csv`."]
    out = run_dir / "report.md"
    rundir.write_atomic(out, "\n".join(lines) + "\n")
    return out


def write_html(run_dir: Path, result: dict, plot: Path | None) -> Path:
    e = html.escape
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

    page = f"""<!doctype html>
<html lang="zh"><head><meta charset="utf-8"><title>qlora-kit eval: {e(run_dir.name)}</title>
<style>
body{{font-family:system-ui,-apple-system,"PingFang SC","Microsoft YaHei",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;width:100%;margin:1em 0}}td,th{{border:1px solid #ddd;padding:6px 8px;vertical-align:top;text-align:left}}
th{{background:#f5f5f5}}.good{{color:#0a7a2f;font-weight:600}}.bad{{color:#b00020;font-weight:600}}img{{max-width:100%}}
</style></head><body>
<h1>Evaluation: {e(run_dir.name)}</h1>
<p>{result['samples']} held-out samples ({e(str(result['data']))}), task <b>{e(result['task'])}</b>, base model
<code>{e(result['base_model'])}</code>. Base and tuned use the same 4-bit base, chat template and greedy decoding.</p>
<table><tr><th>metric</th><th>base</th><th>tuned</th><th>delta</th></tr>{rows}</table>
{img}
{examples('Most improved', best)}
{examples('Least improved', worst)}
<p>Grade answers by hand in <code>review.csv</code>.</p>
</body></html>
"""
    out = run_dir / "report.html"
    rundir.write_atomic(out, page)
    return out


def write_review(run_dir: Path, result: dict) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["where", "question", "reference", "base_answer", "tuned_answer", "grade_base (1-5)",
                "grade_tuned (1-5)", "reviewer_notes"])
    for r in result["rows"]:
        w.writerow([r["where"], r["question"], r["reference"], r["base"]["answer"], r["tuned"]["answer"], "", "", ""])
    out = run_dir / "review.csv"
    rundir.write_atomic(out, "\ufeff" + buf.getvalue())  # BOM: Excel opens UTF-8 CSV with Chinese correctly
    return out


def write(run_dir: Path, result: dict) -> dict[str, Path]:
    plot = plot_losses(run_dir)
    return {"markdown": write_markdown(run_dir, result, plot), "html": write_html(run_dir, result, plot),
            "review": write_review(run_dir, result), **({"plot": plot} if plot else {})}
