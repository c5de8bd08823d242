"""Variable-length attention over the slot cache: each sequence attends to its own slot's columns.

A slot-cache forward is one packed row of tokens: first `decode` tokens, one per slot 0..decode-1
(rows are compacted), then prefill (or chunk) segments, each a run of one sequence's tokens. The
model's attention calls `distgen::slot_attention`, a custom op that writes the new keys/values into
the slot buffers and attends: the decode tokens in one batched SDPA over their slots' first `width`
columns (masked by the columns each may see), each segment in one causal SDPA over its own slot's
columns (no block-diagonal square over the whole packed row, no gathered copy of the keys). With
distgen's CPU kernels (generation.cpu_kernels, cpu_kernels.py) the keys/values are written by a kernel
and each decode token reads exactly its own slot's columns (`AttentionPlan.decode_lengths`).

The op reads the forward's `AttentionPlan` from `ACTIVE` (set by `activated` around the forward),
as vLLM's attention reads its forward context: torch.compile sees an opaque op with a fixed
signature, so a compiled forward's graph depends only on the token count, not on widths or segments.
The op is what the attention implementation `distgen_slots` calls; it is set on the model's config
only for the forwards that carry a plan, so the same model still runs `generate` as before.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from distgen.backends.cpu.kernels import decode_attention, write_kv
from distgen.models.forward_args import unwrapped

ATTENTION_NAME = "distgen_slots"


@dataclass(frozen=True)
class Segment:
    """Tokens q0..q1 of the packed row are one sequence's positions start..start+(q1-q0) in `slot`;
    they attend to that slot's columns 0..end (end = start + q1 - q0)."""
    q0: int
    q1: int
    slot: int
    start: int

    @property
    def end(self) -> int:
        return self.start + self.q1 - self.q0


@dataclass
class AttentionPlan:
    layers: list  # the slot cache's layers (SlotLayer): buffers (slots, kv_heads, columns + 1, head_dim)
    write_slots: torch.Tensor  # (tokens,) the slot each token's key/value goes to
    write_cols: torch.Tensor   # (tokens,) and its column
    decode: int = 0            # the first `decode` tokens are slots 0..decode-1's next tokens
    width: int = 0             # columns the decode tokens read
    decode_mask: Optional[torch.Tensor] = None  # (decode, 1, 1, width) additive
    # (decode,) columns each decode token reads: set when distgen's CPU decode-attention kernel runs
    # (cpu_kernels.decode_attention reads exactly those, not the mask's width).
    decode_lengths: Optional[torch.Tensor] = None
    # Write the new keys/values with distgen's CPU kernel (cpu_kernels.write_kv) instead of index_put.
    cpu_kernels: bool = False
    segments: list[Segment] = field(default_factory=list)


ACTIVE: list[Optional[AttentionPlan]] = [None]


@contextlib.contextmanager
def activated(model: torch.nn.Module, plan: AttentionPlan) -> Iterator[None]:
    """Run the forward(s) inside with `plan` and the `distgen_slots` attention implementation."""
    config = unwrapped(model).config
    configs = list({id(c): c for c in (config, config.get_text_config())}.values())
    previous = [config._attn_implementation for config in configs]
    ACTIVE[0] = plan
    for config in configs:
        config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        ACTIVE[0] = None
        for config, name in zip(configs, previous):
            config._attn_implementation = name


def causal_continuation(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """(queries, keys) bool: query i (the key at keys - queries + i) sees keys up to its own."""
    return torch.ones((queries, keys), dtype=torch.bool, device=device).tril(keys - queries)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """query (1, heads, tokens, head_dim), key/value (1, kv_heads, tokens, head_dim) -> (1, tokens, heads, head_dim).
    What the op `distgen::slot_attention` runs (eager forwards call it directly, without the dispatcher)."""
    plan = ACTIVE[0]
    assert plan is not None, "distgen::slot_attention runs only inside varlen.activated"
    cache_layer = plan.layers[layer]
    if not cache_layer.is_initialized:
        cache_layer.lazy_initialization(key, value)
    keys, values = cache_layer.keys, cache_layer.values
    if not (plan.cpu_kernels and write_kv(key[0], value[0], keys, values, plan.write_slots, plan.write_cols)):
        keys[plan.write_slots, :, plan.write_cols] = key[0].transpose(0, 1)
        values[plan.write_slots, :, plan.write_cols] = value[0].transpose(0, 1)
    gqa = query.shape[1] != key.shape[1]
    out = query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))
    n = plan.decode
    if n and plan.decode_lengths is not None:
        decode_attention(query[0, :, :n].transpose(0, 1), keys, values, plan.decode_lengths, scale, out=out[0, :n])
    elif n:
        q = query[0, :, :n].transpose(0, 1).unsqueeze(2)  # (n, heads, 1, head_dim)
        o = F.scaled_dot_product_attention(q, keys[:n, :, :plan.width], values[:n, :, :plan.width],
                                           attn_mask=plan.decode_mask, scale=scale, enable_gqa=gqa)
        out[0, :n] = o.squeeze(2)
    for seg in plan.segments:
        q = query[:, :, seg.q0:seg.q1]
        k, v = keys[seg.slot:seg.slot + 1, :, :seg.end], values[seg.slot:seg.slot + 1, :, :seg.end]
        if seg.start == 0:  # a whole prompt (or its first chunk): plain causal
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            mask = causal_continuation(seg.q1 - seg.q0, seg.end, query.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[0, seg.q0:seg.q1] = o[0].transpose(0, 1)
    return out


slot_attention = torch.library.custom_op("distgen::slot_attention", attend, mutates_args=())


@slot_attention.register_fake
def _(query, key, value, layer, scale):
    return query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))


def slot_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                           dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """The transformers attention function `distgen_slots` (cache=None: the op keeps the keys)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        return torch.ops.distgen.slot_attention(query, key, value, module.layer_idx, scale), None
    return attend(query, key, value, module.layer_idx, scale), None


AttentionInterface.register(ATTENTION_NAME, slot_attention_forward)
