"""`qlora-kit data check`'s report (data.check's dict) as a Rich table, the rows it dropped, its
warnings and a loss-marked sample. Only presentation: every number comes from the report, which
`--json` prints unchanged."""

from __future__ import annotations

from pathlib import Path


def render(report: dict, console) -> None:
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"data check: {report['file']}", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("format / encoding", f"{report['format']} / {report['encoding']}")
    t.add_row("layout", report["layout"])
    t.add_row("rows read", str(report["rows_read"]))
    sources = report.get("sources") or []
    for src in sources if len(sources) > 1 else ():
        t.add_row(f"  {src['path']}", f"{src['format']}: {src['rows_read']} read, {src['rows']} usable, "
                  f"duplicates dropped {src.get('duplicates_dropped', 0)}, train / eval {src.get('train')} / {src.get('eval')}")
    t.add_row("columns not used", _unused_line(sources))
    t.add_row("unreadable rows skipped", str(len(report["bad_rows"])))
    t.add_row("dropped (empty Q or A)", str(len(report["dropped"])))
    du = report["duplicates"]
    t.add_row("exact duplicates", f"{du['exact']}" + (f" ({du.get('exact_dropped', 0)} dropped)" if du.get("exact_dropped") else ""))
    t.add_row("near duplicates", str(du["near"]))
    sp = report["split"]
    t.add_row("train / eval", f"{sp['train']} / {sp['eval']}")
    t.add_row("train/eval leakage", f"{sp['leakage']} (a plain row split would leak {sp['leakage_with_row_split']})")
    if "tool_calls" in report:
        tc = report["tool_calls"]
        t.add_row("tool-calling rows", f"{tc['rows']} ({tc['calls']} calls trained on, {tc['results']} tool results not trained on)")
    if "pii_redacted" in report:
        t.add_row("personal data redacted", ", ".join(f"{k} {v}" for k, v in report["pii_redacted"].items()) or "none found")
    tok = report["tokens"]
    if "skipped" in tok:
        t.add_row("token lengths", f"skipped: {tok['skipped']}")
        ch = report["chars"]
        t.add_row("characters (question / answer)", f"p50 {ch['question'].get('p50')} / {ch['answer'].get('p50')}, "
                  f"max {ch['question'].get('max')} / {ch['answer'].get('max')}")
    else:
        L = tok["length"]
        t.add_row("tokenizer", f"{tok['tokenizer']}" + (" (cached)" if tok["cached"] else ""))
        t.add_row("tokens per sample", f"min {L['min']} · p50 {L['p50']} · p90 {L['p90']} · p99 {L['p99']} · max {L['max']}")
        t.add_row(f"longer than max_length {tok['max_length']}", f"{tok['truncated']} (answer cut in {tok['answer_cut']})")
        if tok.get("context"):
            t.add_row("max_length capped", f"{tok['context']['requested']} -> {tok['context']['used']} (the model's context)")
    console.print(t)
    for key, title in (("bad_rows", "unreadable"), ("dropped", "dropped")):
        for row in report[key][:10]:
            console.print(f"  [yellow]{title}[/] {row['where']}: {row['reason']}", highlight=False)
        if len(report[key]) > 10:
            console.print(f"  ... and {len(report[key]) - 10} more")
    for ex in du["near_examples"][:3]:
        console.print(f"  [cyan]near duplicate[/] {ex['row']} ~ {ex['like']}: {ex['question']}", highlight=False)
    for w in report["warnings"]:
        console.print(f"[yellow]warning[/]: {w}", highlight=False)
    if report.get("question_template"):
        ex = report["question_template"]["example"]
        console.print(f"\nquestion made by the template, {ex['where']}:\n{ex['question']}", highlight=False, markup=False)
    if "sample" in report:
        console.print(f"\nsample {report['sample']['where']} ([green]green[/] carries loss):")
        text = Text()
        for seg, loss in report["sample"]["segments"]:
            text.append(seg, style="bold green" if loss else "dim")
        console.print(text)


def _unused_line(sources: list[dict]) -> str:
    """Columns read by nothing (no field, no template): "none", or per file when there are several."""
    if not any(s.get("unused_columns") for s in sources):
        return "none"
    if len(sources) == 1:
        return ", ".join(sources[0]["unused_columns"])
    return "; ".join(f"{Path(s['path']).name}: {', '.join(s['unused_columns']) or 'none'}" for s in sources)
