"""Shared fixtures: built-in tiny models in a private cache, the real stories260K when present,
and one trained run per model that several tests inspect (training is the slow part)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"


def pytest_configure(config):
    # Fixed thread count: the machines are 2-core and busy; results must not depend on it.
    import torch

    torch.set_num_threads(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("qlora-kit-cache")
    os.environ["QLORA_KIT_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def tiny_dir(cache) -> Path:
    from qlora_kit import tiny

    return tiny.ensure("tiny")


@pytest.fixture(scope="session")
def tiny_chat_dir(cache) -> Path:
    from qlora_kit import tiny

    return tiny.ensure("tiny-chat")


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not (STORIES / "config.json").is_file():
        pytest.skip("../shared/models/stories260K is not present")
    return STORIES


TOPICS = ["试用期", "加班费", "年休假", "工伤认定", "竞业限制", "经济补偿", "押金退还", "借款利息", "定金罚则",
          "离婚财产", "遗嘱效力", "交通事故", "网购退货", "房屋租赁", "劳务派遣", "社保缴纳", "产假工资", "解除合同",
          "拖欠工资", "医疗期", "培训违约金", "保密义务", "调岗降薪", "诉讼时效", "仲裁时效", "物业纠纷", "装修质量",
          "继承顺序", "抚养费", "彩礼返还"]


def write_qa(path: Path, n: int = 24, template: str | None = None, answer: str | None = None) -> Path:
    """n distinct legal-style pairs (distinct enough that the near-duplicate check keeps them apart)."""
    import random

    rng = random.Random(n)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            t = TOPICS[i % len(TOPICS)]
            q = template.format(i=i) if template else f"{t}的问题：{''.join(rng.sample(TOPICS[:20], 2))}怎么处理？"
            a = answer.format(i=i) if answer else f"依据《劳动合同法》第{i + 10}条，{t}应当{rng.choice(['协商', '仲裁', '起诉'])}解决。"
            f.write(json.dumps({"question": q, "answer": a}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def qa_file(tmp_path_factory) -> Path:
    return write_qa(tmp_path_factory.mktemp("data") / "qa.jsonl")


def make_recipe(base_model: str, data: Path, **training):
    from qlora_kit.recipe import Recipe

    t = {"max_steps": 6, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
         "learning_rate": 5e-3, "logging_steps": 1, "eval_steps": 3, "save_steps": 3, "max_length": 256, "warmup_ratio": 0.0}
    t.update(training)
    return Recipe.model_validate({
        "name": "test", "base_model": base_model,
        "data": {"path": str(data), "eval_fraction": 0.25, "system_prompt": "你是律师。"},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "training": t,
    })


class Snapshot:
    """TrainerCallback that records the live model's parameters before and after training."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Snap(TrainerCallback):
            def __init__(self):
                self.before, self.after, self.linear4bit_targets, self.loss = {}, {}, [], []

            @staticmethod
            def _state(model):
                out = {}
                for name, p in model.named_parameters():
                    out[name] = p.detach().clone().float() if p.dtype.is_floating_point else p.detach().clone()
                for name, m in model.named_modules():  # quantization constants live outside parameters
                    qs = getattr(getattr(m, "weight", None), "quant_state", None)
                    if qs is not None:
                        out[name + ".absmax"] = qs.absmax.detach().clone()
                return out

            def on_train_begin(self, args, state, control, model=None, **kw):
                import bitsandbytes as bnb

                self.before = self._state(model)
                self.linear4bit_targets = [
                    (n, isinstance(m.base_layer, bnb.nn.Linear4bit))
                    for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
                ]

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.loss.append(float(logs["loss"]))

            def on_train_end(self, args, state, control, model=None, **kw):
                self.after = self._state(model)

        return _Snap()


@pytest.fixture(scope="session")
def tiny_run(tiny_dir, qa_file, tmp_path_factory):
    """One real QLoRA run on the built-in tiny Llama: (run_dir, snapshot)."""
    from qlora_kit import train

    snap = Snapshot()
    run_dir = train.run(make_recipe(str(tiny_dir), qa_file, max_steps=10, learning_rate=1e-2), str(tmp_path_factory.mktemp("runs") / "tiny"), [snap])
    return run_dir, snap
