"""qlora_kit.domains: one registry of domains, read by every place that lists them or acts on one.

A fifth domain is a Domain(...) entry, a recipe file, a metric family and (optionally) a synth
generator; these tests register a fake one at run time, with its recipe and family in a temporary
folder, and show that the recipe list, the recipe resolver, `data synth` and eval's metric dispatch
and report all take it without any other module being edited.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import ROOT
from qlora_kit import cli, domains, recipe
from qlora_kit.errors import UserError
from qlora_kit.eval import metrics, report

FAMILY = '''
LABELS = {"shout": ("shouting", False)}
PRIMARY = "shout"


def scores(pred, ref, glossary=()):
    return {"shout": 1.0 if pred.isupper() else 0.0}


def rows(n, seed):
    return [{"question": f"q{seed}-{i}", "answer": "A"} for i in range(n)]
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A domain 'fake': its recipe file, its metric family module and its generator, all in tmp_path."""
    (tmp_path / "fake_family.py").write_text(FAMILY, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    rec = tmp_path / "fake.yaml"
    rec.write_text("name: fake\ndescription: a fifth domain\nbase_model: builtin:tiny\n"
                   "evaluation:\n  task: fake\n  glossary: [loud]\n", encoding="utf-8")
    d = domains.Domain("fake", rec, "fake_family", synth="fake_family:rows", synth_about="shouted answers")
    monkeypatch.setitem(domains.REGISTRY, "fake", d)
    return d


def test_a_registered_domain_is_listed_resolved_synthesised_and_scored(fake, tmp_path):
    assert "fake" in domains.names() and "fake" in domains.tasks() and "fake" in domains.with_synth()

    listed = CliRunner().invoke(cli.app, ["recipes"], terminal_width=200)
    assert listed.exit_code == 0, listed.output
    assert "fake" in listed.output and "a fifth domain" in listed.output

    resolved, path = recipe.resolve("fake")
    assert path == fake.recipe and resolved.evaluation.task == "fake" and resolved.evaluation.glossary == ["loud"]

    out = tmp_path / "synth.jsonl"
    made = CliRunner().invoke(cli.app, ["data", "synth", "fake", "-n", "3", "-o", str(out), "--seed", "7"])
    assert made.exit_code == 0, made.output
    assert [json.loads(line)["question"] for line in out.read_text().splitlines()] == ["q7-0", "q7-1", "q7-2"]

    row = metrics.score("fake", "YES", "yes")
    assert row == {"exact_match": 0.0, "rouge_l": 0.0, "bleu": 0.0, "shout": 1.0}
    assert metrics.primary("fake") == "shout" and not metrics.reads_json("fake")
    summary = {"base": metrics.aggregate([metrics.score("fake", "no", "yes")]),
               "tuned": metrics.aggregate([row])}
    assert ("shouting", 0.0, 1.0, 1.0, False) in report.metric_rows(summary)


def test_without_the_registration_the_fake_domain_is_unknown(tmp_path):
    assert "fake" not in domains.names()
    with pytest.raises(ValueError, match="unknown eval task 'fake'"):
        metrics.score("fake", "a", "a")
    assert domains.synth_generator("fake") is None
    rec = tmp_path / "r.yaml"
    rec.write_text("base_model: builtin:tiny\nevaluation:\n  task: fake\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"evaluation\.task: Input should be 'generic', .* or 'industrial' \(got 'fake'\)"):
        recipe.resolve(str(rec))


@pytest.mark.parametrize("name", domains.names())
def test_each_builtin_domain_has_its_recipe_and_its_family(name):
    """The registry and the recipe files agree: a domain's recipe evaluates as that domain's task,
    and its metric family has what eval and the report read."""
    rec, path = recipe.resolve(name)
    assert path.name == f"{name}.yaml" and rec.name == name and rec.evaluation.task == name
    fam = metrics.family(name)
    assert fam.PRIMARY in fam.LABELS and set(metrics.score(name, "答", "答")) >= set(fam.LABELS) - {
        "json_schema_valid", "json_schema_valid_constrained", "field_accuracy_constrained"}


def test_the_registry_imports_no_metric_or_generator_code():
    code = ("import sys, qlora_kit.domains, qlora_kit.recipe\n"
            "print(sorted(m for m in sys.modules if m.startswith(('qlora_kit.eval', 'qlora_kit.synth', 'qlora_kit.data.synth'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
