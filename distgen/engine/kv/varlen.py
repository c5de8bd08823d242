"""Variable-length attention over the slot cache: each sequence attends to its own slot's columns.

A slot-cache forward is one packed row of tokens: first `decode` tokens, one per decoding row, then
prefill (or chunk) segments, each a run of one sequence's tokens. The model's attention calls
`distgen::slot_attention`, a custom op that writes the new keys/values into the slot buffers and attends
through the forward's `SlotAttention` (attention.py, picked by name): with `torch_sdpa` the decode tokens are
slots 0..decode-1 in one batched SDPA over their first `width` columns (masked by the columns each may see)
and each segment one causal SDPA over its own slot's columns; with `cuda_varlen` every sequence of the step is
one row of a single FlashAttention varlen call that reads its own slot through `cu_k`/`seqused_k` (decode rows
are then addressed by slot id); distgen's CPU kernels (backends/cpu) read `decode_lengths`. A local layer's
window and Gemma 2's soft-capping come from the model's attention call (`sliding_window`, `softcap`) and go to
the implementation (attention.py).

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
from transformers import AttentionInterface

from distgen.engine.kv.attention import ATTENTIONS, SlotAttention
from distgen.engine.windows import binding
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
    decode: int = 0            # the first `decode` tokens are the decoding rows' next tokens
    width: int = 0             # columns the decode tokens read (torch_sdpa: slots 0..decode-1's first `width`)
    decode_mask: Optional[torch.Tensor] = None  # (decode, 1, 1, width) additive
    # (decode,) each decode token's position (column = position): local layers narrow decode_mask to their window
    decode_positions: Optional[torch.Tensor] = None
    # window -> decode_mask narrowed to it (attention.windowed_decode_mask: built once per forward and window)
    window_masks: dict = field(default_factory=dict)
    # (decode,) columns each decode token reads: set when distgen's CPU decode-attention kernel runs
    # (kernels.decode_attention reads exactly those, not the mask's width).
    decode_lengths: Optional[torch.Tensor] = None
    # The CPU backend runs this forward (its decoder stack may take it; keys/values written by its kernel).
    cpu_kernels: bool = False
    segments: list[Segment] = field(default_factory=list)
    # Which implementation attends (None: cpu_kernels where the flag above says so and it is registered, else
    # torch_sdpa).
    impl: Optional[SlotAttention] = None
    # Varlen metadata (implementations whose decode_reads is "varlen"): sequence b (the decode rows, then the
    # segments) is queries cu_q[b]:cu_q[b+1] of the packed row over the token-major rows cu_k[b] ..
    # cu_k[b] + seqused_k[b] (its slot's columns); all int32 on the forward's device.
    cu_q: Optional[torch.Tensor] = None       # (sequences + 1,)
    cu_k: Optional[torch.Tensor] = None       # (sequences + 1,) slot * columns; the last entry slots * columns
    seqused_k: Optional[torch.Tensor] = None  # (sequences,) columns each sequence reads (0: a padding row)
    max_q: int = 0                            # the most queries of one sequence
    max_k: int = 0                            # the most columns one reads: the slot width (what a graph bakes in)
    rows: Optional[torch.Tensor] = None       # (decode,) the decode rows' slots (long)


def implementation(plan: AttentionPlan) -> SlotAttention:
    if plan.impl is not None:
        return plan.impl
    name = "cpu_kernels" if plan.cpu_kernels and "cpu_kernels" in ATTENTIONS.entries else "torch_sdpa"
    return ATTENTIONS.get(name)


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


def layer_window(cache_layer, layer: int, window: int) -> Optional[int]:
    """The window a layer applies: the model passes the one its own attention would (0: none); the slot cache
    planned each layer's from the config (SlotLayer.config_window, engine/windows.py) and applies it only where a
    sequence reaches it (SlotLayer.window). A model that computes another window than its config says stops here,
    where the difference could change a token (either window reached by the cache's columns).
    Layers that are not SlotLayers (the CPU backend's probe buffers) apply none: the probe checks the owned stack's
    arithmetic, which runs only forwards no window reaches (backends/cpu/model.py LlamaStack.owns)."""
    passed = window or None
    declared = getattr(cache_layer, "config_window", passed)
    if passed != declared and any(binding((passed, declared), cache_layer.owner.max_len)):
        raise RuntimeError(f"layer {layer} attends over a sliding window of {passed}, but distgen read "
                           f"{declared} from the model config (engine/windows.py)")
    return getattr(cache_layer, "window", None)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float, window: int = 0,
           softcap: float = 0.0) -> torch.Tensor:
    """query (1, heads, tokens, head_dim), key/value (1, kv_heads, tokens, head_dim) -> (1, tokens, heads, head_dim);
    window: the layer's sliding window (0: a global layer), softcap: its attention logit soft-capping (0: none).
    What the op `distgen::slot_attention` runs (eager forwards call it directly, without the dispatcher)."""
    plan = ACTIVE[0]
    assert plan is not None, "distgen::slot_attention runs only inside varlen.activated"
    cache_layer = plan.layers[layer]
    if not cache_layer.is_initialized:
        cache_layer.lazy_initialization(key, value)
    impl = implementation(plan)
    impl.write(plan, cache_layer, key, value)
    return impl.attend(plan, cache_layer, query, scale, window=layer_window(cache_layer, layer, window),
                       softcap=softcap or None)


slot_attention = torch.library.custom_op("distgen::slot_attention", attend, mutates_args=())


@slot_attention.register_fake
def _(query, key, value, layer, scale, window=0, softcap=0.0):
    return query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))


def slot_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                           dropout: float = 0.0, sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """The transformers attention function `distgen_slots` (cache=None: the op keeps the keys); `sliding_window`
    and `softcap` are what the model's attention passes every implementation (Mistral, Qwen2, Gemma)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window, cap = int(sliding_window or 0), float(softcap or 0.0)
    if torch.compiler.is_compiling():
        return torch.ops.distgen.slot_attention(query, key, value, module.layer_idx, scale, window, cap), None
    return attend(query, key, value, module.layer_idx, scale, window, cap), None


AttentionInterface.register(ATTENTION_NAME, slot_attention_forward)
