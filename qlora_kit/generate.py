"""Base + adapters (or a merged model) + each run's stored chat template -> text.

The one place that loads a trained model for inference: `generate`, `eval`, `chat` (and later
`serve` and `ui`) all go through `Engine`, so every prompt is rendered exactly as in training.
One 4-bit base holds any number of adapters; `use(name)` switches without reloading the base,
`use(None)` answers with the base model itself.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import rundir
from .errors import UserError


@dataclass
class Adapter:
    name: str
    run_dir: Path | None
    tokenizer: object
    stop_ids: list[int]
    system_prompt: str | None


@dataclass
class Result:
    text: str
    new_tokens: int
    seconds: float


@dataclass
class Engine:
    model: object
    adapters: dict[str, Adapter]
    kind: str  # "adapter" | "merged"
    active: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    # --- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_runs(cls, runs: dict[str, str | Path]) -> "Engine":
        """One 4-bit base (the runs must share it) with each run's adapter loaded under its name."""
        from peft import PeftModel
        from transformers import AutoTokenizer

        from .model import load_4bit, quiet_libraries
        from .recipe import load_saved

        quiet_libraries()
        model, adapters, base_path = None, {}, None
        for name, path in runs.items():
            p = Path(path)
            info = rundir.read_info(p)
            adapter_dir = rundir.require_adapter(p)
            recipe = load_saved(p / "recipe.yaml")
            if base_path is None:
                base_path = info["base_model_path"]
                model = PeftModel.from_pretrained(load_4bit(base_path, recipe), adapter_dir, adapter_name=name)
            elif info["base_model_path"] != base_path:
                raise UserError(f"adapter '{name}' ({p}) was trained on {info['base_model']}, not on the first "
                                f"adapter's base", "adapters on one base must share that base model")
            else:
                model.load_adapter(adapter_dir, adapter_name=name)
            tok = AutoTokenizer.from_pretrained(p / rundir.TOKENIZER)
            adapters[name] = Adapter(name, p, tok, info["tokenizer"]["stop_token_ids"], recipe.data.system_prompt)
        model.eval()
        engine = cls(model, adapters, "adapter")
        engine.use(next(iter(adapters)))
        return engine

    @classmethod
    def from_merged(cls, path: str | Path) -> "Engine":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .model import quiet_libraries
        from .recipe import load_saved

        quiet_libraries()
        p = Path(path)
        tok = AutoTokenizer.from_pretrained(p)
        model = AutoModelForCausalLM.from_pretrained(p).eval()
        stop = model.generation_config.eos_token_id
        stop = stop if isinstance(stop, list) else [stop]
        system = None
        meta = p / "qlora_kit_merge.json"
        if meta.is_file():
            src = Path(json.loads(meta.read_text(encoding="utf-8"))["run_dir"])
            if rundir.is_run_dir(src):
                system = load_saved(src / "recipe.yaml").data.system_prompt
        name = p.name
        engine = cls(model, {name: Adapter(name, None, tok, stop, system)}, "merged")
        engine.active = name
        return engine

    # --- switching and generating -----------------------------------------------------------------

    def use(self, name: str | None) -> None:
        """Switch adapter (None: the base model) without reloading anything."""
        if name is not None and name not in self.adapters:
            raise UserError(f"no adapter named '{name}'", f"loaded: {', '.join(self.adapters)}")
        if name is not None and self.kind == "adapter":
            self.model.set_adapter(name)
        self.active = name

    @property
    def current(self) -> Adapter:
        # the base model answers with the first adapter's template: same prompt, fair comparison
        return self.adapters[self.active] if self.active else next(iter(self.adapters.values()))

    def messages(self, question: str, history: list[dict] | None = None) -> list[dict]:
        msgs = list(history or [])
        sp = self.current.system_prompt
        if sp and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": sp})
        return msgs + [{"role": "user", "content": question}]

    def generate(self, messages: list[dict], max_new_tokens: int = 256, on_text=None) -> Result:
        """Greedy completion of the last user turn; `on_text(str)` receives the answer as it streams."""
        import contextlib

        import torch
        from transformers import TextIteratorStreamer

        a = self.current
        text = a.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = a.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(self.model.device)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                      do_sample=False, eos_token_id=a.stop_ids, pad_token_id=a.tokenizer.pad_token_id)
        base_off = self.model.disable_adapter() if (self.active is None and self.kind == "adapter") else contextlib.nullcontext()
        with self.lock, base_off, torch.no_grad():  # one generation at a time on the shared model
            t0 = time.perf_counter()
            if on_text is None:
                out = self.model.generate(**kwargs)
            else:
                streamer = TextIteratorStreamer(a.tokenizer, skip_prompt=True, skip_special_tokens=True)
                result: dict = {}
                th = threading.Thread(target=lambda: result.setdefault("out", self.model.generate(streamer=streamer, **kwargs)))
                th.start()
                for piece in streamer:
                    on_text(piece)
                th.join()
                out = result["out"]
            seconds = time.perf_counter() - t0
        new = out[0, ids.shape[1]:]
        return Result(a.tokenizer.decode(new, skip_special_tokens=True), int(new.shape[0]), seconds)


def load(path: str | Path) -> Engine:
    """A run directory (4-bit base + its adapter, as trained) or a merged model directory."""
    p = Path(path)
    if rundir.is_run_dir(p):
        return Engine.from_runs({p.name: p})
    if (p / "config.json").is_file():
        return Engine.from_merged(p)
    raise UserError(f"{p} is neither a qlora-kit run directory nor a model directory",
                    "pass a run directory from `qlora-kit train` or a folder from `qlora-kit merge`")


def answer(engine: Engine, question: str, max_new_tokens: int = 256, history: list[dict] | None = None) -> str:
    """Greedy answer to one question with the active adapter and its stored chat template."""
    return engine.generate(engine.messages(question, history), max_new_tokens).text
