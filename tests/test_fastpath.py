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


def _tiny_lora(tiny_dir, attn):
    """qlora-kit's own loading (4-bit base, LoRA), no dropout so two layouts see the same function,
    non-zero LoRA B so the adapter matters."""
    from qlora_kit import attention
    from qlora_kit.model import attach_lora, load_4bit, load_tokenizer, prepare_tokenizer
    from qlora_kit.recipe import Recipe

    rec = Recipe.model_validate({"base_model": str(tiny_dir), "lora": {"lora_dropout": 0.0}})
    tok = load_tokenizer(str(tiny_dir), rec)
    info = prepare_tokenizer(tok, rec, str(tiny_dir))
    attention.register()
    torch.manual_seed(0)
    model = attach_lora(load_4bit(str(tiny_dir), rec, attn_implementation=attn), rec)
    model.config.use_cache = False  # as in training
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    return model, tok, info


def _rows(tok, info, n=4):
    from qlora_kit.template import encode_batch

    convs = [[{"role": "user", "content": "问" * (3 + 7 * i)}, {"role": "assistant", "content": "答" * (5 + 3 * (i % 3))}]
             for i in range(n)]
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encode_batch(tok, convs, 256, set(info.stop_token_ids))]


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    keys = ("input_ids", "labels", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
            "max_length_k")
    loss = model(**{k: batch[k] for k in keys if k in batch}).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_layouts_give_the_padded_loss_and_gradients(tiny_dir):
    """The reference is transformers' SDPA on a padded batch with its 4D padding mask. Per-sequence
    SDPA on the flattened batch (padding-free) and mask-free causal SDPA on the right-padded batch
    (grouped padding) give the same loss and gradients."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qlora_kit import attention

    model, tok, info = _tiny_lora(tiny_dir, attention.PER_SEQUENCE)
    model.train()
    rows = _rows(tok, info)
    assert len({len(r["input_ids"]) for r in rows}) == len(rows)  # really uneven
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, pad_to_multiple_of=8)(rows)
    flat = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(rows)
    assert padded["attention_mask"].float().mean() < 0.9  # the padded batch really carries padding
    results = {}
    for name, impl, batch in [("sdpa+mask", "sdpa", padded), ("per-sequence", attention.PER_SEQUENCE, flat),
                              ("padded, no mask", attention.PER_SEQUENCE, padded)]:
        model.set_attn_implementation(impl)
        results[name] = _loss_and_grads(model, batch)
    ref_loss, ref_grads = results.pop("sdpa+mask")
    for name, (loss, grads) in results.items():
        assert abs(loss - ref_loss) < 1e-5, (name, loss, ref_loss)
        assert grads.keys() == ref_grads.keys() and ref_grads
        for k, g in grads.items():
            assert torch.allclose(g, ref_grads[k], rtol=1e-4, atol=1e-6), (name, k, float((g - ref_grads[k]).abs().max()))


def test_padding_free_training_builds_no_dense_mask(tiny_dir, uneven, tmp_path, monkeypatch):
    """Through `train`: every attention call of the padding-free path gets no mask and one sample's
    tokens; transformers' mask builder is never asked for a mask; the run records its layout."""
    import transformers.integrations.sdpa_attention as sdpa_mod
    import transformers.masking_utils as masking

    calls, masks = [], []
    real_attention, real_mask = sdpa_mod.sdpa_attention_forward, masking.sdpa_mask

    def spy_attention(module, query, key, value, attention_mask, *a, **k):
        calls.append((attention_mask, query.shape[2]))
        return real_attention(module, query, key, value, attention_mask, *a, **k)

    def spy_mask(*a, **k):
        masks.append(k.get("q_length"))
        return real_mask(*a, **k)

    monkeypatch.setattr(sdpa_mod, "sdpa_attention_forward", spy_attention)
    monkeypatch.setattr(masking, "sdpa_mask", spy_mask)
    rec = make_recipe(str(tiny_dir), uneven, max_steps=3, early_stopping_patience=0, per_device_train_batch_size=4)
    run = train.run(rec, str(tmp_path / "r"))
    fast = json.loads((run / "run.json").read_text())["fast_path"]
    assert fast["layout"]["padding_free"] and fast["layout"]["attn_implementation"] == "qlora_kit_sdpa"
    assert calls and all(m is None for m, _ in calls)
    longest = max(len(r["input_ids"]) for r in _encoded(rec))
    assert max(q for _, q in calls) <= longest  # never a flattened row of several samples
    assert masks == []  # no 4D mask was built


def _encoded(rec):
    from qlora_kit.data import check as datacheck
    from qlora_kit.model import load_tokenizer, prepare_tokenizer

    prep = datacheck.prepare(rec)
    tok = load_tokenizer(rec.base_model, rec)
    info = prepare_tokenizer(tok, rec, rec.base_model)
    datacheck.encode(prep, rec, tok, set(info.stop_token_ids))
    return train.training_rows(prep, prep.train_idx)


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
                                    {"gradient_checkpointing": True}])
def test_switches_keep_the_loss(tiny_dir, uneven, tmp_path, switch):
    """Each switch against the default path: the same losses (fp32 on CPU, so within rounding).
    eager runs the padded layout with transformers' 4D mask: compared with the default padded
    layout (length-grouped, right-padded, causal SDPA without a mask) on the same batches."""
    padded = {"padding_free": False} if "attn_implementation" in switch else {}
    base = make_recipe(str(tiny_dir), uneven, max_steps=3, early_stopping_patience=0, **padded)
    other = make_recipe(str(tiny_dir), uneven, max_steps=3, early_stopping_patience=0, **switch)
    a = _losses(train.run(base, str(tmp_path / "default")))
    b = _losses(train.run(other, str(tmp_path / "switched")))
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3, (switch, a, b)
    if padded:
        layouts = [json.loads((tmp_path / d / "run.json").read_text())["fast_path"]["layout"] for d in ("default", "switched")]
        assert [x["attn_implementation"] for x in layouts] == ["qlora_kit_sdpa", "eager"]
        assert all(not x["padding_free"] and x["group_by_length"] and x["pad_to_multiple_of"] == 8 for x in layouts)


def test_activation_offloading_needs_a_gpu(tiny_dir, qa_file, tmp_path):
    from qlora_kit.errors import UserError

    with pytest.raises(UserError, match="no GPU here"):
        train.run(make_recipe(str(tiny_dir), qa_file, max_steps=2, activation_offloading=True), str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_checkpointing_from_the_plan_threads_and_metrics_recorded(tiny_dir, uneven, tmp_path, monkeypatch):
    """gradient_checkpointing: auto under a budget that fits only with some layers checkpointed:
    train checkpoints every 2nd layer (1 of 2) and says why in run.json and the card. The torch
    thread count (an explicit OMP_NUM_THREADS wins) is recorded. Entropy and token accuracy are
    computed on logging steps only (the first, then every logging_steps)."""
    from qlora_kit import plan
    from qlora_kit.train import fastpath

    rec = make_recipe(str(tiny_dir), uneven, max_steps=4, logging_steps=2, early_stopping_patience=0)
    shape = plan.Shape.from_config(plan.load_config(str(tiny_dir))[0])
    kw = dict(r=rec.lora.r, target=rec.lora.target_modules, max_length=rec.training.max_length,
              micro_batch=rec.training.per_device_train_batch_size, optim=rec.training.optim, act_bytes=4,
              device="cpu", loss_head="model")
    none, every2 = (sum(plan.estimate(shape, checkpointing=n, **kw).values()) for n in (0, 2))
    assert every2 < none
    roomy = plan.make(rec, str(tiny_dir), 1 << 40, device="cpu")  # the same estimate, plus kept weights
    assert roomy.keep_dequantized and roomy.total == sum(plan.estimate(shape, checkpointing=0, keep_dequantized=True,
                                                                       **kw).values())
    budget = int((none + every2) / 2 / plan.AUTO_HEADROOM)  # automatic choices plan within 90 % of it
    monkeypatch.setattr(plan, "memory_budget", lambda gpu: (budget, "test budget"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    flags, metric_steps = [], []
    real_metrics = fastpath.FastStepMixin._qk_metrics

    def counting(self, logits, labels):
        metric_steps.append(self.state.global_step + 1)
        return real_metrics(self, logits, labels)

    monkeypatch.setattr(fastpath.FastStepMixin, "_qk_metrics", counting)
    from transformers import TrainerCallback

    class Flags(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if not flags:
                flags.append([layer.gradient_checkpointing for layer in model.get_base_model().model.layers])
    try:
        run = train.run(rec, str(tmp_path / "r"), callbacks=[Flags()])
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(2)  # conftest's setting for the rest of the session
    fast = json.loads((run / "run.json").read_text())["fast_path"]
    assert fast["every_n_layers"] == 2 and fast["checkpointing"] == "every 2nd layer (1 of 2)"
    assert "test budget" in fast["checkpointing_why"] and flags == [[True, False]]
    assert fast["threads"]["threads"] == threads == 1 and fast["threads"]["source"] == "OMP_NUM_THREADS"
    assert fast["threads"]["interop_threads"] == 1
    card = (run / "README.md").read_text()
    assert "every 2nd layer (1 of 2)" in card and "1 thread" in card
    assert metric_steps == [1, 2, 4]  # logging_first_step, then every 2nd
    hist = json.loads((run / "metrics.json").read_text())["log_history"]
    assert [h["step"] for h in hist if "mean_token_accuracy" in h and "loss" in h] == [1, 2, 4]


def test_loss_head_fits_device_and_vocabulary():
    from qlora_kit.train.fastpath import LARGE_VOCAB, choose_loss_head
    from qlora_kit.recipe import TrainingConfig

    auto, off, on = TrainingConfig(), TrainingConfig(liger_kernel=False), TrainingConfig(liger_kernel=True)
    assert choose_loss_head(auto, 152064, gpu=False, liger=False)[0] == "model"  # CPU: the model's own
    assert choose_loss_head(auto, 32000, gpu=True, liger=False)[0] == "model"
    assert choose_loss_head(auto, LARGE_VOCAB, gpu=True, liger=False)[0] == "chunked"
    assert choose_loss_head(auto, 152064, gpu=True, liger=True)[0] == "liger"
    assert choose_loss_head(off, 152064, gpu=True, liger=True)[0] == "chunked"
    from qlora_kit.errors import UserError

    with pytest.raises(UserError, match="liger"):
        choose_loss_head(on, 152064, gpu=False, liger=False)


def test_kept_dequantized_weights_give_the_same_loss_and_gradients(tiny_dir):
    """keep_dequantized_weights: bitsandbytes' 4-bit matmul keeps its forward's dequantized weight
    for backward instead of dequantizing again: bit-identical loss and gradients, and the kept
    weights are released with the graph (saved tensors, so checkpointing can drop them too)."""
    import contextlib

    from qlora_kit import attention
    from qlora_kit.train import fastpath

    model, tok, info = _tiny_lora(tiny_dir, attention.PER_SEQUENCE)
    model.train()
    batch = {"input_ids": torch.tensor([r["input_ids"] for r in _rows(tok, info, 2)][:1])}
    batch["labels"] = batch["input_ids"].clone()
    saved = []
    results = []
    for keep in (False, True):
        ctx = fastpath.keep_dequantized_weights() if keep else contextlib.nullcontext()
        with ctx, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((keep, t.shape)) or t, lambda t: t):
            results.append(_loss_and_grads(model, batch))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == loss_b and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    # the frozen 4-bit weights (out x in of the model's linears) appear among the saved tensors only when kept
    weights = {tuple(m.weight.quant_state.shape) for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state")}
    kept = {tuple(s) for k, s in saved if k} & weights
    assert kept and not ({tuple(s) for k, s in saved if not k} & weights)
    from bitsandbytes.autograd import _functions

    assert _functions.MatMul4Bit.__name__ == "MatMul4Bit"  # restored after the context


def test_chunked_loss_head_trains_like_the_model_head(tiny_dir, uneven, tmp_path, monkeypatch):
    """The large-vocabulary GPU head (TRL's tiled log-probabilities, re-installed with log-probs only),
    forced here on CPU: the same losses as the model's own cross-entropy, and it is what ran."""
    from qlora_kit.train import fastpath

    calls = []
    real = fastpath.reinstall_chunked_head

    def spy(model):
        calls.append(model)
        return real(model)

    a = _losses(train.run(make_recipe(str(tiny_dir), uneven, max_steps=3, early_stopping_patience=0),
                          str(tmp_path / "model-head")))
    monkeypatch.setattr(fastpath, "choose_loss_head", lambda *a, **k: ("chunked", "forced for the test"))
    monkeypatch.setattr(fastpath, "reinstall_chunked_head", spy)
    run = train.run(make_recipe(str(tiny_dir), uneven, max_steps=3, early_stopping_patience=0), str(tmp_path / "chunked"))
    b = _losses(run)
    assert json.loads((run / "run.json").read_text())["fast_path"]["loss_head"] == "chunked" and len(calls) == 1
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
