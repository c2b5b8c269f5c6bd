"""Attention that matches the batch layout, and the layout itself.

Two layouts never build a dense mask over a micro-batch:

    padding-free  the micro-batch is one flattened row with each sample's own positions (TRL passes
                  `cu_seq_lens_q`). Only with a kernel that attends within each sample: flash-attention
                  varlen on a GPU, elsewhere `PER_SEQUENCE` below (causal SDPA on each sample's slice).
    padded        samples grouped by length (little padding), padded on the right to the longest
                  (a multiple of 8). Right padding needs no mask at all: with causal attention no real
                  token can see a pad that comes after it, and pad positions carry no loss.

transformers' own SDPA path does neither: for a flattened row it builds a (T x T) block-diagonal
mask (T^2 work instead of sum(len^2), and no causal fast path), and for a padded batch a 4D
padding mask. `register()` adds an attention function and its mask function under one name, so
`create_causal_mask` asks ours, which returns no mask for these two layouts and transformers'
own `sdpa_mask` for anything else (left padding, decoding with a cache, sliding windows).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import UserError

PER_SEQUENCE = "qlora_kit_sdpa"  # the registered name: SDPA, per sequence when flattened
# Measured on CPU (stories260K peers job, 1 thread, process time): padding-free with per-sequence
# SDPA vs padded batches grouped by length; see the note in choose().
CPU_PADDING_FREE = True


@dataclass
class Layout:
    """How micro-batches are laid out and which attention kernel computes them."""
    attn_implementation: str  # what the model runs: flash_attention_2, qlora_kit_sdpa, sdpa, eager
    padding_free: bool
    group_by_length: bool
    pad_to_multiple_of: int | None
    why: str

    def to_dict(self) -> dict:
        return asdict(self)


def flash_attn_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def choose(training, gpu: bool, flash: bool) -> Layout:
    """The layout for a recipe's training section on this machine. Explicit choices are honoured;
    a padding-free or packed layout is refused with a kernel that would attend across samples."""
    impl, pf = training.attn_implementation, training.padding_free
    if impl == "flash_attention_2" and not flash:
        raise UserError("training.attn_implementation: flash_attention_2 needs a CUDA GPU and `pip install flash-attn`",
                        "set training.attn_implementation: auto")
    if impl == "auto":
        impl = "flash_attention_2" if flash else "sdpa"
    flat_needed = training.packing or pf is True
    if impl == "eager" and flat_needed:
        what = "training.packing" if training.packing else "training.padding_free"
        raise UserError(f"{what} with attn_implementation: eager would attend across samples through a dense mask",
                        "use attn_implementation: auto (or sdpa / flash_attention_2), or set padding_free: false")
    if pf == "auto":
        # flash varlen computes each sample separately at no cost. Per-sequence SDPA loops over the
        # samples, which on a GPU costs a host sync per layer: there, grouped padding is the choice.
        pf = impl == "flash_attention_2" or (impl == "sdpa" and not gpu and CPU_PADDING_FREE)
    pf = bool(pf or training.packing)
    kernel = PER_SEQUENCE if impl == "sdpa" else impl
    if pf:
        why = ("flash-attention varlen: each sample attends only to itself" if impl == "flash_attention_2"
               else "causal SDPA on each sample of the flattened micro-batch, no mask")
        return Layout(kernel, True, False, None, f"padding-free; {why}")
    why = "causal SDPA without a mask (right padding)" if kernel == PER_SEQUENCE else f"{impl} with a padding mask"
    return Layout(kernel, False, True, 8, f"micro-batches grouped by length, padded to a multiple of 8; {why}")


def inference_implementation(recipe) -> str:
    """What generation, merge and evaluation load a base with: transformers' own kernels."""
    impl = recipe.training.attn_implementation
    return "sdpa" if impl == "auto" else impl


# --- the registered kernel --------------------------------------------------------------------------

_registered = False


def register() -> str:
    """Make `PER_SEQUENCE` known to transformers (idempotent); returns the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(PER_SEQUENCE, per_sequence_attention)
        AttentionMaskInterface.register(PER_SEQUENCE, no_mask_when_causal_suffices)
        _registered = True
    return PER_SEQUENCE


def no_mask_when_causal_suffices(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None,
                                 local_size=None, **kwargs):
    """The mask function of `PER_SEQUENCE`: None (the attention runs causal, per sequence when the row
    is flattened) when the whole query attends to the whole key range and padding, if any, is on the
    right; transformers' `sdpa_mask` otherwise."""
    from transformers.masking_utils import sdpa_mask

    plain = q_length == kv_length and not kv_offset and (local_size is None or kv_length <= local_size)
    if plain and (attention_mask is None or right_padded(attention_mask)):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask,
                     local_size=local_size, **kwargs)


def right_padded(mask) -> bool:
    """Every row of a 2D 0/1 mask is ones then zeros (a row of zeros is fine too)."""
    if mask.dim() != 2:
        return False
    m = mask.to(bool)
    return bool((m[:, 1:] <= m[:, :-1]).all())


def per_sequence_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
    """transformers' SDPA, run separately on each sample of a flattened row (no mask), or on the
    whole batch as given. query/key/value: (batch, heads, tokens, head_dim)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = sequence_spans(query, key, attention_mask, kwargs)
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    outs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout=dropout,
                                   scaling=scaling, is_causal=is_causal, **kwargs)[0] for a, b in spans]
    return torch.cat(outs, dim=1), None  # outputs are (batch, tokens, heads, head_dim)


_spans_cache: list = [None, None]  # (the boundary tensor seen last, its spans): once per forward, not per layer


def sequence_spans(query, key, attention_mask, kwargs) -> list[tuple[int, int]] | None:
    """[(start, end), ...] of the samples in a flattened row; None when there is nothing to split
    (a batch of separate rows, one sample, a mask given, or decoding against a cache)."""
    if attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    src = cu if cu is not None else kwargs.get("position_ids")
    if src is None:
        return None
    if _spans_cache[0] is src:
        return _spans_cache[1]
    if cu is not None:
        bounds = [int(x) for x in cu.tolist()]
    else:  # a sample starts where its position is 0
        pos = src.reshape(-1).tolist()
        bounds = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        if bounds[0] != 0:
            bounds.insert(0, 0)
    spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    spans = spans if len(spans) > 1 else None
    _spans_cache[:] = [src, spans]
    return spans
