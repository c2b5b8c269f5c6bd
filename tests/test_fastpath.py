"""The fast path gives the plain path's loss: padding-free batches, packed-sequence isolation."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_kit import train

from conftest import make_recipe, write_qa


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Answers of very different lengths, so padded batches carry many pad tokens."""
    p = write_qa(tmp_path_factory.mktemp("uneven") / "qa.jsonl", n=24)
    rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]
    for i, r in enumerate(rows):
        r["answer"] = r["answer"] * (1 + i % 5)
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return p


def _losses(run_dir):
    hist = json.loads((run_dir / "metrics.json").read_text())["log_history"]
    return [h["loss"] for h in hist if "loss" in h]


def test_padding_free_trains_exactly_like_padded(tiny_dir, uneven, tmp_path):
    from safetensors.torch import load_file

    runs = {}
    for pf in (True, False):
        rec = make_recipe(str(tiny_dir), uneven, max_steps=5, padding_free=pf, early_stopping_patience=0)
        runs[pf] = train.run(rec, str(tmp_path / f"pf-{pf}"))
    a, b = _losses(runs[True]), _losses(runs[False])
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    wa = load_file(runs[True] / "adapter" / "adapter_model.safetensors")
    wb = load_file(runs[False] / "adapter" / "adapter_model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def test_flattened_sequences_do_not_attend_to_each_other(tiny_dir):
    """Through qlora-kit's own loading: a sample's logits are the same alone or flattened after another."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qlora_kit.model import attach_lora, load_4bit, load_tokenizer, prepare_tokenizer
    from qlora_kit.recipe import Recipe
    from qlora_kit.template import encode_batch

    rec = Recipe(base_model=str(tiny_dir))
    tok = load_tokenizer(str(tiny_dir), rec)
    info = prepare_tokenizer(tok, rec, str(tiny_dir))
    model = attach_lora(load_4bit(str(tiny_dir), rec), rec).eval()
    model.config.use_cache = False  # as in training
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    convs = [[{"role": "user", "content": "问" * (3 + i)}, {"role": "assistant", "content": "答" * (5 - i)}] for i in range(3)]
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in encode_batch(tok, convs, 256, set(info.stop_token_ids))]
    flat = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(rows)
    with torch.no_grad():
        out = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits[0]
        start = 0
        for r in rows:
            alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            n = len(r["input_ids"])
            assert float((out[start:start + n] - alone).abs().max()) < 1e-5
            start += n


def test_packing_trains_with_fewer_fuller_steps(tiny_dir, uneven, tmp_path):
    rec = make_recipe(str(tiny_dir), uneven, max_steps=-1, num_train_epochs=1, packing=True, padding_free=True,
                      per_device_train_batch_size=2, max_length=512, early_stopping_patience=0)
    packed = train.run(rec, str(tmp_path / "packed"))
    rec2 = make_recipe(str(tiny_dir), uneven, max_steps=-1, num_train_epochs=1, per_device_train_batch_size=2,
                       max_length=512, early_stopping_patience=0)
    plain = train.run(rec2, str(tmp_path / "plain"))
    steps = [json.loads((r / "metrics.json").read_text())["global_step"] for r in (packed, plain)]
    assert steps[0] < steps[1]
    assert all(x == x for x in _losses(packed))  # finite


def test_liger_is_gpu_only(tiny_dir, qa_file):
    from qlora_kit.errors import UserError
    from qlora_kit.train import use_liger

    rec = make_recipe(str(tiny_dir), qa_file)
    assert use_liger(rec) is False  # auto, no GPU here
    rec.training.liger_kernel = True
    with pytest.raises(UserError, match="liger"):
        use_liger(rec)


@pytest.mark.parametrize("switch", [{"attn_implementation": "eager"}, {"upcast_embeddings": True},
                                    {"gradient_checkpointing": False}])
def test_switches_keep_the_loss(tiny_dir, uneven, tmp_path, switch):
    """Each switch against the default path: the same losses (fp32 on CPU, so within rounding)."""
    base = make_recipe(str(tiny_dir), uneven, max_steps=3, early_stopping_patience=0)
    other = make_recipe(str(tiny_dir), uneven, max_steps=3, early_stopping_patience=0, **switch)
    a = _losses(train.run(base, str(tmp_path / "default")))
    b = _losses(train.run(other, str(tmp_path / "switched")))
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3, (switch, a, b)


def test_activation_offloading_needs_a_gpu(tiny_dir, qa_file, tmp_path):
    from qlora_kit.errors import UserError

    with pytest.raises(UserError, match="no GPU here"):
        train.run(make_recipe(str(tiny_dir), qa_file, max_steps=2, activation_offloading=True), str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()
