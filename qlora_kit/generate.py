"""Base + adapter (or a merged model) + the stored chat template -> text.

The one place that loads a trained model for inference, so every command that generates (this
`generate` command now; eval, chat and serve later) renders prompts exactly as training did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import rundir
from .errors import UserError


@dataclass
class Loaded:
    model: object
    tokenizer: object
    stop_ids: list[int]
    system_prompt: str | None
    kind: str  # "adapter" | "merged"


def load(path: str | Path) -> Loaded:
    """A run directory (4-bit base + adapter, as trained) or a merged model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import quiet_libraries

    quiet_libraries()
    p = Path(path)
    if rundir.is_run_dir(p):
        from peft import PeftModel

        from .model import load_4bit
        from .recipe import load_saved

        info = rundir.read_info(p)
        adapter = rundir.require_adapter(p)
        recipe = load_saved(p / "recipe.yaml")
        tok = AutoTokenizer.from_pretrained(p / rundir.TOKENIZER)
        model = PeftModel.from_pretrained(load_4bit(info["base_model_path"], recipe), adapter).eval()
        stop = info["tokenizer"]["stop_token_ids"]
        return Loaded(model, tok, stop, recipe.data.system_prompt, "adapter")
    if (p / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(p)
        model = AutoModelForCausalLM.from_pretrained(p).eval()
        stop = model.generation_config.eos_token_id
        stop = stop if isinstance(stop, list) else [stop]
        system = None
        meta = p / "qlora_kit_merge.json"
        if meta.is_file():
            src = Path(json.loads(meta.read_text(encoding="utf-8"))["run_dir"])
            if rundir.is_run_dir(src):
                from .recipe import load_saved

                system = load_saved(src / "recipe.yaml").data.system_prompt
        return Loaded(model, tok, stop, system, "merged")
    raise UserError(f"{p} is neither a qlora-kit run directory nor a model directory",
                    "pass a run directory from `qlora-kit train` or a folder from `qlora-kit merge`")


def answer(loaded: Loaded, question: str, max_new_tokens: int = 256, history: list[dict] | None = None) -> str:
    """Greedy answer to one question, rendered with the stored chat template."""
    import torch

    msgs = list(history or [])
    if loaded.system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": loaded.system_prompt})
    msgs.append({"role": "user", "content": question})
    text = loaded.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(loaded.model.device)
    with torch.no_grad():
        out = loaded.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=loaded.stop_ids, pad_token_id=loaded.tokenizer.pad_token_id,
        )
    return loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
