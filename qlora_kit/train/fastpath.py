"""What a training step runs besides the model: the loss head, metrics, token counting, threads.

TRL 1.16's SFTTrainer computes every training loss through its chunked "fused LM head" and asks
it for the entropy and top-1 accuracy of every token on every step (plus host syncs for both):
on a CPU that head runs as plain torch ops, about a tenth of a small model's step. Here the
training loss comes from the head that fits the device and vocabulary (`choose_loss_head`), the
metrics are computed on logging steps only, from logits that exist anyway, and nothing is read
back from the device between logging steps. Evaluation keeps TRL's own path.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from ..attention import Layout
from ..devices import LARGE_VOCAB, has_gpu, liger_available, usable_cores
from ..errors import UserError


def choose_loss_head(training, vocab_size: int, gpu: bool, liger: bool) -> tuple[str, str]:
    """(head, why). model: the model's own cross-entropy over full logits (CPU: its matmul is the
    cheapest there, and RAM holds the logits; GPU: a small vocabulary). chunked: TRL's tiled
    log-probabilities in the compute dtype, never the full fp32 logits (a large vocabulary on a GPU
    without liger). liger: liger-kernel's fused linear cross-entropy (GPU, installed)."""
    choice = training.liger_kernel
    if choice is True and not liger:
        raise UserError("training.liger_kernel: true needs a CUDA GPU and `pip install liger-kernel`",
                        "set training.liger_kernel: auto")
    if liger and choice in (True, "auto"):
        return "liger", "liger-kernel fused linear cross-entropy (no logits materialised)"
    return head_without_liger(vocab_size, gpu)


def chunked_head_available() -> bool:
    """TRL's tiled LM head (trl >= 1.16 adds it to every SFTTrainer model)."""
    try:
        from trl.trainer.utils import add_fused_lm_head  # noqa: F401
    except ImportError:
        return False
    return True


def head_without_liger(vocab_size: int, gpu: bool = True, note: str = "") -> tuple[str, str]:
    """(head, why) without liger-kernel: on a CPU, on a GPU without it, or (`note` says so) when it
    turns out not to know the architecture."""
    if not gpu:
        return "model", "the model's own cross-entropy (CPU)"
    if vocab_size >= LARGE_VOCAB and chunked_head_available():
        return "chunked", f"cross-entropy in vocabulary tiles in the compute dtype ({vocab_size:,}-token vocabulary{note})"
    return "model", f"the model's own cross-entropy ({vocab_size:,}-token vocabulary{note})"


def apply_liger(model) -> bool:
    """liger-kernel's fused linear cross-entropy (with its RMSNorm/SwiGLU/RoPE kernels) on the causal
    LM itself, before PEFT and TRL wrap it. SFTTrainer forces `fused_linear_cross_entropy: False`
    into `liger_kernel_config` when `use_liger_kernel` is set (it patches the LM head itself), so
    qlora-kit leaves `use_liger_kernel` off and applies liger here. Returns whether the forward was
    replaced (liger knows the architecture)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    before = getattr(model, "forward")
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=True, cross_entropy=False)
    return getattr(model, "forward") != before


def reinstall_chunked_head(model) -> None:
    """SFTTrainer adds a tiled LM head that also computes entropy and top-1 of every token on every
    call. Keep it for evaluation (TRL's compute_loss reads both), and add the same head with
    log-probabilities only for training steps: a call with `qk_lean_head=True` takes that one."""
    import functools
    import types

    from trl.trainer.utils import add_fused_lm_head

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    full = base.forward  # TRL's head (instance attribute) over the model's own forward
    del base.forward
    add_fused_lm_head(base, outputs=("log_probs",))
    lean = base.forward

    @functools.wraps(type(base).forward)  # generate() checks its kwargs against this signature
    def forward(self, *args, qk_lean_head=False, **kwargs):
        return (lean if qk_lean_head else full)(*args, **kwargs)

    base.forward = types.MethodType(forward, base)


class FastStepMixin:
    """Put before SFTTrainer in a subclass. `qk_loss_head` and `qk_keep_dequantized` are set after
    construction."""

    qk_loss_head = "model"
    qk_keep_dequantized = False
    _qk_tokens = 0
    _qk_pending: list | None = None

    def training_step(self, *args, **kwargs):
        if not self.qk_keep_dequantized:
            return super().training_step(*args, **kwargs)
        with keep_dequantized_weights():
            return super().training_step(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not model.training:  # evaluation, predictions: TRL's own path
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        from transformers import Trainer

        inputs = {**inputs, "use_cache": False}
        if self.qk_loss_head == "chunked":
            inputs["fused_lm_head"] = inputs["qk_lean_head"] = True
        self._qk_count(inputs)
        # transformers' own compute_loss: the model's loss with num_items_in_batch (gradient
        # accumulation), averaged across processes like TRL's
        loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        logits = outputs.get("logits") if hasattr(outputs, "get") else None
        if logits is not None and self._qk_logging_step():
            self._qk_metrics(logits, inputs["labels"])
        return loss

    def floating_point_ops(self, inputs) -> int:
        """Trainer's FLOP count for `total_flos`, with the parameter count read once: transformers
        walks every module for it on every step (half a millisecond on a small model)."""
        model = self.model
        name = getattr(model, "main_input_name", "input_ids")
        if name not in inputs or not hasattr(model, "num_parameters"):
            return 0
        if getattr(self, "_qk_params", None) is None:
            self._qk_params = model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[name].numel() * self._qk_params

    def _qk_count(self, inputs) -> None:
        """Tokens seen (what TRL reports as num_tokens), kept on the device until a log."""
        if "attention_mask" in inputs:
            n = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:
            n = inputs["position_ids"].size(1)
        else:
            return
        self._qk_tokens = self._qk_tokens + n

    def _qk_logging_step(self) -> bool:
        args, step = self.args, self.state.global_step  # the step being computed becomes step + 1
        if str(getattr(args.logging_strategy, "value", args.logging_strategy)) != "steps":
            return False
        return (step + 1) % max(int(args.logging_steps), 1) == 0 or (args.logging_first_step and step == 0)

    def _qk_metrics(self, logits, labels) -> None:
        """Entropy and top-1 accuracy of the answer tokens, in row chunks of at most an eighth of
        the logits: the few temporaries per chunk stay below what the loss's backward holds anyway,
        so a logging step's peak memory is the plan's (no full-size copies of the logits)."""
        import torch

        with torch.no_grad():
            vocab = logits.shape[-1]
            rows = max(1, max(1 << 16, logits.numel() // 8) // vocab)
            entropy = torch.zeros((), device=logits.device)
            correct = torch.zeros((), device=logits.device)
            count = torch.zeros((), device=logits.device)
            for b in range(logits.shape[0]):
                target = labels[b, 1:]
                for a in range(0, target.numel(), rows):
                    y = target[a:a + rows]
                    keep = y != -100
                    z = logits[b, a:a + y.numel()][keep].float()  # position p predicts label p + 1
                    logp = torch.log_softmax(z, dim=-1)
                    entropy -= (logp.exp() * logp).sum()
                    correct += (z.argmax(-1) == y[keep]).sum()
                    count += keep.sum()
            if self._qk_pending is None:
                self._qk_pending = []
            self._qk_pending.append((entropy, correct, count))

    def log(self, logs, *args, **kwargs):
        metrics = self._metrics["train"]
        if self.model.training:
            for entropy, correct, count in self._qk_pending or []:
                n = max(float(count), 1.0)
                metrics["entropy"].append(float(entropy) / n)
                metrics["mean_token_accuracy"].append(float(correct) / n)
            self._qk_pending = None
            total = self._qk_tokens
            if not isinstance(total, int):
                total = total.detach()
            import torch

            t = torch.as_tensor(total, device=self.args.device).reshape(1)
            metrics["num_tokens"] = [int(self.accelerator.gather_for_metrics(t).sum()) // getattr(self, "_tp_size", 1)]
        return super().log(logs, *args, **kwargs)


# --- dequantized 4-bit weights kept for backward ------------------------------------------------------

_KEEP = None


def keep_dequantized_weights():
    """A context in which bitsandbytes' 4-bit matmul keeps the weight it dequantized in the forward
    for the backward, instead of dequantizing it again there (bitsandbytes' MatMul4Bit does the
    latter, to hold no full-precision weight). The same values either way (the same dequantization);
    memory: every frozen 4-bit weight of the step in the compute dtype, which the memory plan
    grants only when it fits beside everything else (plan.make, keep_dequantized). Anything the
    swap does not cover (an `out` tensor, empty inputs, no gradient) goes to bitsandbytes' own."""
    import contextlib

    global _KEEP
    try:
        import bitsandbytes.autograd._functions as bnb_fn
        import bitsandbytes.functional as bnb_f
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(bnb_fn, "MatMul4Bit") or not hasattr(bnb_f, "dequantize_4bit"):
        return contextlib.nullcontext()  # another bitsandbytes layout: its own path
    if _KEEP is None:
        _KEEP = _build_keep(bnb_fn.MatMul4Bit, bnb_f.dequantize_4bit)

    @contextlib.contextmanager
    def swapped():
        original = bnb_fn.MatMul4Bit
        bnb_fn.MatMul4Bit = _KEEP
        try:
            yield
        finally:
            bnb_fn.MatMul4Bit = original

    return swapped()


def _build_keep(original, dequantize_4bit):
    import torch

    class _KeepWeight(torch.autograd.Function):
        @staticmethod
        def forward(ctx, A, B, bias, quant_state):
            W = dequantize_4bit(B.view(-1, 1), quant_state).to(A.dtype)  # [out, in]
            # saved as a tensor, not an attribute: checkpointing releases and recomputes it with its layer
            ctx.save_for_backward(W if ctx.needs_input_grad[0] else None)
            ctx.bias_dtype = None if bias is None else bias.dtype
            return torch.nn.functional.linear(A, W, bias)

        @staticmethod
        def backward(ctx, grad_output):
            (W,) = ctx.saved_tensors
            grad_A = torch.matmul(grad_output, W.to(grad_output.dtype)) if ctx.needs_input_grad[0] else None
            grad_bias = None
            if ctx.needs_input_grad[2]:
                grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0, dtype=ctx.bias_dtype)
            return grad_A, None, grad_bias, None

    class _Dispatch:
        """Stands in for MatMul4Bit inside keep_dequantized_weights()."""

        @staticmethod
        def apply(A, B, out=None, bias=None, quant_state=None):
            if out is not None or A.numel() == 0 or quant_state is None or not torch.is_grad_enabled() \
                    or not (A.requires_grad or (bias is not None and bias.requires_grad)):
                return original.apply(A, B, out, bias, quant_state)
            return _KeepWeight.apply(A, B, bias, quant_state)

    return _Dispatch


# --- threads ------------------------------------------------------------------------------------------


def set_threads() -> dict:
    """torch intra-op threads = usable_cores(), or an explicit OMP_NUM_THREADS; inter-op threads 1
    (a training step has no independent ops to overlap). Returns what was set."""
    import torch

    cores = usable_cores()
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        threads, source = int(env), "OMP_NUM_THREADS"
    else:
        threads, source = cores, f"sched_getaffinity: {cores} usable core{'s' if cores != 1 else ''}"
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already ran in this process
        pass
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "source": source, "usable_cores": cores}


# --- the decisions for one run ------------------------------------------------------------------------


@dataclass
class FastPath:
    """What train decided for this run and why: written to run.json and the run card."""
    layout: Layout
    loss_head: str
    loss_head_why: str
    checkpointing: str  # none | all layers | every nth layer (k of L)
    every_n_layers: int  # 0: none, 1: all
    checkpointing_why: str
    threads: dict | None = None
    keep_dequantized: bool = False  # 4-bit weights kept dequantized from forward to backward
    keep_dequantized_why: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layout"] = self.layout.to_dict()
        return d

    def lines(self) -> list[str]:
        out = [f"attention: {self.layout.attn_implementation}; {self.layout.why}",
               f"gradient checkpointing: {self.checkpointing} ({self.checkpointing_why})",
               f"loss: {self.loss_head_why}",
               f"dequantized weights kept for backward: {'yes' if self.keep_dequantized else 'no'} "
               f"({self.keep_dequantized_why})"]
        if self.threads:
            out.append(f"torch threads: {self.threads['threads']} ({self.threads['source']}), "
                       f"inter-op {self.threads['interop_threads']}")
        return out


def decide(recipe, model_dir: str, threads: dict | None = None) -> FastPath:
    """Layout and attention kernel, loss head, and (gradient_checkpointing: auto) checkpointing from
    the memory plan within this machine's budget: the GPU's free memory, on CPU the available RAM."""
    from .. import attention, plan

    gpu = has_gpu()
    layout = attention.choose(recipe.training, gpu, attention.flash_attn_available())
    try:
        cfg, _ = plan.load_config(model_dir)
        shape = plan.Shape.from_config(cfg)
    except UserError as e:  # an architecture the planner cannot read: the safe choices
        setting = recipe.training.gradient_checkpointing
        n = 0 if setting is False else 1
        head, why = choose_loss_head(recipe.training, 0, gpu, liger_available())
        return FastPath(layout, head, why, plan.describe_checkpointing(n, 1),
                        n, f"no memory plan for this model ({e.message})" if setting == "auto" else
                        f"training.gradient_checkpointing: {str(setting).lower()}", threads)
    head, head_why = choose_loss_head(recipe.training, shape.vocab, gpu, liger_available())
    budget, budget_name = plan.memory_budget(gpu)
    p = plan.make(recipe, model_dir, budget, device="cuda" if gpu else "cpu", loss_head=head, budget_name=budget_name)
    keep, keep_why = p.keep_dequantized, p.keep_dequantized_why
    from ..distributed import world

    if keep and world().strategy == "fsdp":  # FSDP hands the layers flattened shards, not whole 4-bit weights
        keep, keep_why = False, "FSDP: each weight is dequantized again in backward"
    return FastPath(layout, head, head_why, p.checkpointing, p.every_n_layers, p.checkpointing_why, threads,
                    keep, keep_why)
