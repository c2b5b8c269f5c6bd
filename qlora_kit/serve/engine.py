"""Base + adapters (or a merged model) + each run's stored chat template -> text.

The one place that loads a trained model for inference: `generate`, `eval`, `chat`, `serve` and
the ui's chat page all go through `Engine`, so every prompt is rendered exactly as in training.
One 4-bit base holds any number of adapters; `use(name)` switches without reloading the base,
`use(None)` answers with the base model itself.

The model is shared, so selecting the adapter and generating happen under one lock as one unit:
`generate(..., adapter="legal")` is safe from many threads at once (`serve`), while the older
`use(name)` then `generate(messages)` pair still works for single-user callers (`chat`, `eval`).
"""

from __future__ import annotations

import functools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..run import default_name, is_run_dir, is_run_path, open_run


@dataclass
class Adapter:
    name: str
    run_dir: Path | None
    tokenizer: object
    stop_ids: list[int]
    system_prompt: str | None


class _Current:
    def __repr__(self) -> str:
        return "CURRENT"


CURRENT = _Current()  # generate(adapter=CURRENT): whatever `use()` selected last


@dataclass
class Result:
    text: str
    new_tokens: int
    seconds: float
    prompt_tokens: int = 0
    finish_reason: str = "stop"  # "stop" (end token or stop string) | "length" | "cancelled"


def _flag(input_ids, value: bool):
    import torch

    return torch.full((input_ids.shape[0],), value, dtype=torch.bool, device=input_ids.device)


class _Cancelled:
    """StoppingCriteria: ends generation at the next token once `event` is set (client gone)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return _flag(input_ids, self.event.is_set())


def cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one occurred."""
    cuts = [i for i in (text.find(x) for x in stop or []) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class _StopFilter:
    """Wraps on_text so streamed pieces never show a stop string or anything after it: text that
    could be the start of a stop string is held back until it is known not to be one."""

    def __init__(self, on_text, stop: list[str]):
        self.on_text, self.stop, self.pending, self.done = on_text, stop, "", False

    def __call__(self, piece: str) -> None:
        if self.done:
            return
        self.pending += piece
        text, hit = cut_at_stop(self.pending, self.stop)
        if hit:
            self.done = True
            self.pending = ""
            if text:
                self.on_text(text)
            return
        keep = max((k for x in self.stop for k in range(1, len(x)) if self.pending.endswith(x[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        if out:
            self.on_text(out)

    def flush(self) -> None:
        if self.pending and not self.done:
            self.on_text(self.pending)
        self.pending = ""


@dataclass
class Engine:
    model: object
    adapters: dict[str, Adapter]
    kind: str  # "adapter" | "merged"
    active: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    # --- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_runs(cls, runs: dict[str, str | Path], grants=None) -> Engine:
        """One 4-bit base (the runs must share it) with each run's adapter loaded under its name.
        `grants` (recipe.Grants): what this command's own flags allow; the runs' recipes grant nothing."""
        # RUN, or RUN/checkpoints/checkpoint-N with its adapter: a wrong path is refused before torch loads
        opened = {name: open_run(path, grants) for name, path in runs.items()}
        from peft import PeftModel

        from ..model import load_4bit, load_saved_tokenizer
        from ..quiet import quiet_libraries

        quiet_libraries()
        model, adapters, base_path = None, {}, None
        for name, r in opened.items():
            if base_path is None:
                base_path = r.base_model_path
                model = PeftModel.from_pretrained(load_4bit(base_path, r.recipe), r.adapter, adapter_name=name)
            elif r.info.base_model_path != base_path:
                raise UserError(f"adapter '{name}' ({r.dir}) was trained on {r.info.base_model}, not on the first "
                                f"adapter's base", "adapters on one base must share that base model")
            else:
                model.load_adapter(r.adapter, adapter_name=name)
            tok = load_saved_tokenizer(r.tokenizer_dir, r.recipe.trust_remote_code)
            adapters[name] = Adapter(name, r.dir, tok, r.info.tokenizer.stop_token_ids, r.recipe.data.system_prompt)
        model.eval()
        engine = cls(model, adapters, "adapter")
        engine.use(next(iter(adapters)))
        return engine

    @classmethod
    def from_merged(cls, path: str | Path, grants=None) -> Engine:
        from transformers import AutoModelForCausalLM

        from ..model import load_saved_tokenizer, refuse_unsafe
        from ..quiet import quiet_libraries
        from ..recipe import Grants, load_saved

        grants = grants or Grants()
        quiet_libraries()
        p = Path(path)
        refuse_unsafe(p, grants.trust_remote_code, grants.allow_pickle)
        tok = load_saved_tokenizer(p, grants.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(p, trust_remote_code=grants.trust_remote_code,
                                                     use_safetensors=None if grants.allow_pickle else True).eval()
        stop = model.generation_config.eos_token_id
        stop = stop if isinstance(stop, list) else [stop]
        system = None
        meta = p / "qlora_kit_merge.json"
        if meta.is_file():
            merge_info = json.loads(meta.read_text(encoding="utf-8"))
            src = Path(merge_info["run_dir"])
            if "system_prompt" in merge_info:  # recorded by merge: the folder needs no run directory
                system = merge_info["system_prompt"]
            elif is_run_dir(src):
                system = load_saved(src / "recipe.yaml").data.system_prompt
        name = p.name
        engine = cls(model, {name: Adapter(name, None, tok, stop, system)}, "merged")
        engine.active = name
        return engine

    # --- switching and generating -----------------------------------------------------------------

    def _check(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            raise UserError(f"no adapter named '{name}'", f"loaded: {', '.join(self.adapters)}")

    def use(self, name: str | None) -> None:
        """Switch adapter (None: the base model) without reloading anything."""
        self._check(name)
        with self.lock:  # never switch under a generation running in another thread
            self._select(name)
            self.active = name

    def _select(self, name: str | None) -> None:
        # caller holds the lock; the base model is handled by disable_adapter() around generation
        if name is not None and self.kind == "adapter" and self.model.active_adapter != name:
            self.model.set_adapter(name)

    def template_for(self, name: str | None) -> Adapter:
        """The adapter whose tokenizer, template and system prompt render prompts for `name`."""
        # the base model answers with the first adapter's template: same prompt, fair comparison
        return self.adapters[name] if name else next(iter(self.adapters.values()))

    @property
    def current(self) -> Adapter:
        return self.template_for(self.active)

    def system_prompt_for(self, name: str | None) -> str | None:
        """The system prompt a model answers with: its run's; the base model (None) has none of its own,
        so it answers as the untuned model does, not with a prompt some adapter was trained under."""
        return None if (name is None and self.kind == "adapter") else self.template_for(name).system_prompt

    def messages(self, question: str, history: list[dict] | None = None, adapter=CURRENT) -> list[dict]:
        msgs = list(history or [])
        sp = self.system_prompt_for(self.active if adapter is CURRENT else adapter)
        if sp and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": sp})
        return msgs + [{"role": "user", "content": question}]

    def prompt_ids(self, messages: list[dict], adapter: str | None):
        """The prompt as the model reads it (a 1 x n tensor): `messages` rendered with the adapter's
        stored chat template, tokenized. Template errors propagate (jinja2's TemplateError)."""
        a = self.template_for(adapter)
        text = a.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return a.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids

    def generate(self, messages: list[dict], max_new_tokens: int = 256, on_text=None, *, adapter=CURRENT,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None, cancel: threading.Event | None = None,
                 constraint=None, prompt_ids=None) -> Result:
        """Complete the last user turn; `on_text(str)` receives the answer as it streams.

        `adapter`: a name, None for the base model, or CURRENT (what `use()` selected); it is
        selected inside the lock, so concurrent calls with different adapters never cross.
        temperature 0 is greedy; above 0 samples with `top_p` (and `seed`, if given). The text is
        cut before the first `stop` string. Setting `cancel` ends the generation at the next token
        (or before it starts, if still waiting for the lock) with finish_reason "cancelled".
        An exception from `on_text` stops the generation and propagates; the lock is released.
        `constraint` (structured.Constraint): the answer is JSON matching it, finished within
        max_new_tokens when the schema allows (else finish_reason "length").
        `prompt_ids`: `prompt_ids(messages, adapter)` when the caller has it already (serve counts
        the prompt to admit a request), so a long prompt is not tokenized a second time.
        """
        import contextlib

        import torch
        from transformers import StoppingCriteriaList

        stop = [x for x in (stop or []) if x]
        if adapter is not CURRENT:
            self._check(adapter)
        with self.lock:  # one generation at a time on the shared model, adapter chosen inside
            name = self.active if adapter is CURRENT else adapter
            a = self.template_for(name)
            ids = (self.prompt_ids(messages, name) if prompt_ids is None else prompt_ids).to(self.model.device)
            n_prompt = int(ids.shape[1])
            if cancel is not None and cancel.is_set():
                return Result("", 0, 0.0, n_prompt, "cancelled")
            self._select(name)
            criteria = StoppingCriteriaList()
            if cancel is not None:
                criteria.append(_Cancelled(cancel))
            kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": max_new_tokens,
                      "eos_token_id": a.stop_ids, "pad_token_id": a.tokenizer.pad_token_id, "stopping_criteria": criteria}
            if constraint is not None:  # JSON only: llguidance's grammar masks each step's logits
                from transformers import LogitsProcessorList

                sample = bool(temperature and temperature > 0)
                kwargs["logits_processor"] = LogitsProcessorList([constraint.processor(a.tokenizer, a.stop_ids,
                                                                                       max_new_tokens, sample)])
            if stop:  # transformers' own stop-string criterion; the text is cut below
                kwargs.update(stop_strings=stop, tokenizer=a.tokenizer)
            if temperature and temperature > 0:
                kwargs.update(do_sample=True, temperature=float(temperature), top_k=0,  # top_k 0: OpenAI has none
                              top_p=1.0 if top_p is None else float(top_p))
            else:
                kwargs.update(do_sample=False)
            sink = _StopFilter(on_text, stop) if (on_text is not None and stop) else on_text
            if sink is not None:
                # runs in this thread, inside generate(): nothing can be left blocked on a queue
                kwargs["streamer"] = _streamer_class()(a.tokenizer, sink)
            base_off = self.model.disable_adapter() if (name is None and self.kind == "adapter") else contextlib.nullcontext()
            with base_off, torch.no_grad():
                if seed is not None and kwargs["do_sample"]:
                    torch.manual_seed(int(seed))  # global RNG, but only this generation runs now
                t0 = time.perf_counter()
                out = self.model.generate(**kwargs)
                seconds = time.perf_counter() - t0
            if isinstance(sink, _StopFilter):
                sink.flush()
        new = out[0, n_prompt:]
        answer, hit = cut_at_stop(a.tokenizer.decode(new, skip_special_tokens=True), stop)
        if cancel is not None and cancel.is_set():
            reason = "cancelled"
        elif hit or (new.shape[0] and int(new[-1]) in a.stop_ids):
            reason = "stop"
        else:
            reason = "length" if new.shape[0] >= max_new_tokens else "stop"
        if reason == "length" and constraint is not None and constraint.problem(answer) is None:
            reason = "stop"  # the JSON closed on the budget's last token, with no room left for the end token
        return Result(answer, int(new.shape[0]), seconds, n_prompt, reason)


@functools.cache
def _streamer_class():
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        """TextStreamer's incremental decoding handed to a callback instead of stdout or a queue, and
        token by token rather than word by word: a client sees each token as it comes, and JSON has
        no spaces to break words at."""

        def __init__(self, tokenizer, on_text):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self._on_text = on_text

        def put(self, value):
            """Each token's text at once, except a trailing partial character (bytes still to come)
            or trailing whitespace (a clean-up may yet drop it before punctuation)."""
            if self.skip_prompt and self.next_tokens_are_prompt:
                return super().put(value)  # skips the prompt
            self.token_cache.extend(value.reshape(-1).tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            stable = len(text.rstrip("\ufffd").rstrip())
            if stable > self.print_len:
                self.on_finalized_text(text[self.print_len:stable])
                self.print_len = stable

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                self._on_text(text)

    return CallbackStreamer


def load(path: str | Path, grants=None) -> Engine:
    """A run directory (4-bit base + its adapter, as trained) or a merged model directory."""
    p = Path(path)
    if is_run_path(p):
        return Engine.from_runs({default_name(p): p}, grants)
    if (p / "config.json").is_file():
        return Engine.from_merged(p, grants)
    raise UserError(f"{p} is neither a qlora-kit run directory nor a model directory",
                    "pass a run directory from `qlora-kit train` or a folder from `qlora-kit merge`")


def answer(engine: Engine, question: str, max_new_tokens: int = 256, history: list[dict] | None = None) -> str:
    """Greedy answer to one question with the active adapter and its stored chat template."""
    return engine.generate(engine.messages(question, history), max_new_tokens).text
