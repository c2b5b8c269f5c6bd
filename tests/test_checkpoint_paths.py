"""Any checkpoint (issue 16, item 5): generate, chat, eval, merge, export and serve take
RUN/checkpoints/checkpoint-N in place of RUN and use that checkpoint's adapter with the run's
recipe, tokenizer and base; a checkpoint without its complete-marker is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import make_recipe, write_qa
from test_cli import assert_user_error, run


@pytest.fixture(scope="module")
def ckpt_run(tmp_path_factory, tiny_dir):
    """A tiny run of 4 steps with checkpoints at 2 and 4; no eval split, so the final adapter is step 4's."""
    from qlora_kit import train

    d = tmp_path_factory.mktemp("ckpt")
    data = write_qa(d / "qa.jsonl", 16)
    recipe = make_recipe(str(tiny_dir), data, max_steps=4, save_steps=2, eval_steps=2, learning_rate=2e-2)
    recipe.data.eval_fraction = 0.0
    out = train.run(recipe, str(d / "run"))
    assert (out / "checkpoints" / "checkpoint-2" / "qlora_kit_complete.json").is_file()
    return out, data


def _weights(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_merge_and_generate_from_a_checkpoint_use_its_adapter(ckpt_run):
    out, _ = ckpt_run
    ck = out / "checkpoints" / "checkpoint-2"
    r = run(["merge", str(ck), "--dtype", "fp32"])
    assert r.returncode == 0, r.stderr
    merged_ck = out / "merged-checkpoint-2"
    assert r.stdout.strip() == str(merged_ck)
    meta = json.loads((merged_ck / "qlora_kit_merge.json").read_text())
    assert meta["adapter"] == str(ck.resolve()) and meta["run_dir"] == str(out.resolve())
    from qlora_kit import merge

    final = merge.run(out, out / "merged", dtype="fp32")
    a, b = _weights(merged_ck), _weights(Path(final["out"]))
    assert a.keys() == b.keys()
    differ = [k for k in a if not (a[k] == b[k]).all()]
    assert differ, "step 2's adapter must merge into other weights than step 4's"

    r = run(["generate", str(ck), "-p", "试用期怎么处理？", "--max-new-tokens", "6"])
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_eval_and_export_from_a_checkpoint_write_beside_it(ckpt_run):
    out, data = ckpt_run
    ck = out / "checkpoints" / "checkpoint-2"
    from qlora_kit import export
    from qlora_kit.eval import evaluate

    evaluate.run(ck, str(data), limit=2, max_new_tokens=4)
    ev = json.loads((ck / "eval.json").read_text())
    assert ev["adapter"] == str(ck) and (ck / "report.html").is_file()
    assert not (out / "eval.json").exists()  # the final adapter's results stay its own
    peft = out / "export" / "peft-checkpoint-2"
    assert export.run(ck, "peft")["out"] == str(peft)
    assert (peft / "adapter_model.safetensors").read_bytes() == (ck / "adapter_model.safetensors").read_bytes()
    assert "--lora-modules run-checkpoint-2=" in (peft / "README.md").read_text()


def test_serve_and_chat_name_a_checkpoint_after_its_run(ckpt_run):
    from qlora_kit import serve
    from qlora_kit.serve import chat

    out, _ = ckpt_run
    ck = out / "checkpoints" / "checkpoint-2"
    assert list(chat.parse_adapters(ck, [])) == ["run-checkpoint-2"]
    named = serve.parse_runs([str(out), str(ck)])
    assert list(named) == ["run", "run-checkpoint-2"]
    infos = serve.run_infos(named)
    assert infos[1].run_dir == out and infos[1].adapter_dir == ck and infos[0].adapter_dir == out / "adapter"


def test_incomplete_checkpoint_and_checkpoints_folder_are_refused(ckpt_run):
    out, _ = ckpt_run
    half = out / "checkpoints" / "checkpoint-3"
    shutil.copytree(out / "checkpoints" / "checkpoint-2", half)
    (half / "qlora_kit_complete.json").unlink()
    try:
        for cmd in (["generate", str(half), "-p", "x"], ["merge", str(half)]):  # refused before torch loads
            r = run(cmd)
            assert_user_error(r, f"{half} is not a complete checkpoint", "use a complete one (checkpoint-2, checkpoint-4)")
        assert not (out / "merged-checkpoint-3").exists()
    finally:
        shutil.rmtree(half)
    assert_user_error(run(["merge", str(out / "checkpoints")]), "holds several checkpoints",
                      "complete checkpoints: checkpoint-2, checkpoint-4")
