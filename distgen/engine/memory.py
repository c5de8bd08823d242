"""Memory arithmetic for a rank's engine: what a KV cache and a forward's activations take, what the
rank may spend, and the batch size that fits (`generation.batch_size=auto`).

A slot cache packs a prefill's prompts into one forward of at most the prefill token budget, so its activations
are one forward's, charged once (`forward_bytes`), and rows scale with KV memory; caches that pad every row to
the longest prompt (dynamic, offloaded) hold every row's activations at once (`activation_bytes_per_row`).

Everything but `available_bytes` (reads the machine) and `agree_across_ranks` (one all-reduce) is a pure
function of the model config and the numbers it is given.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from distgen.engine.host import read
from distgen.engine.windows import layer_windows, text_config

# generation.batch_size=auto never picks more rows than this (nor more than the rank's prompts).
AUTO_BATCH_MAX = 1024


@dataclass(frozen=True)
class KVShape:
    """What one token of one sequence costs in a KV cache, read from the model config."""
    layers: int
    kv_heads: int
    head_dim: int
    itemsize: int               # bytes per cached element (the model dtype's, or 1 for int8 codes)
    windows: tuple[Optional[int], ...] = ()  # each layer's sliding window (None: global); () : every layer global
    scale_bytes: int = 0        # per token and head: the quantized cache's scale
    ring: Optional[int] = None  # the `sliding_window` cache: columns a local layer's ring holds (None: no ring)

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one token over every layer."""
        return self.layers * self.layer_bytes_per_token

    @property
    def layer_bytes_per_token(self) -> int:
        return 2 * self.kv_heads * (self.head_dim * self.itemsize + self.scale_bytes)

    def layer_columns(self, window: Optional[int], columns: int) -> int:
        """Columns one layer of a sequence of `columns` (prompt + budget) keeps: every one (the slot caches keep
        every column in local layers too and apply the window in attention), or a ring's in a ring's local layer."""
        return min(columns, self.ring) if self.ring is not None and window is not None else columns

    def cached_tokens(self, columns: int) -> int:
        """Token-layers a sequence of `columns` keeps, summed over layers (each layer's columns)."""
        windows = self.windows or (None,) * self.layers
        return sum(self.layer_columns(window, columns) for window in windows)

    def bytes(self, rows: int, columns: int) -> int:
        return rows * self.cached_tokens(columns) * self.layer_bytes_per_token


def kv_shape(model_config, dtype: torch.dtype, quantized: bool = False, ring: Optional[int] = None) -> KVShape:
    """The KV geometry of a model config; `quantized` prices the int8 slot cache (codes plus a scale per
    token and head, in `dtype`). Other quantized backends take less (2 or 4 bits): this is their upper bound.
    `ring`: the columns of the `sliding_window` cache's ring (slots.ring_columns), charged in local layers only."""
    config = text_config(model_config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    windows = layer_windows(config)
    if quantized:
        return KVShape(config.num_hidden_layers, kv_heads, head_dim, 1, windows, scale_bytes=itemsize, ring=ring)
    return KVShape(config.num_hidden_layers, kv_heads, head_dim, itemsize, windows, ring=ring)


def activation_bytes_per_row(model_config, dtype: torch.dtype, query_tokens: int, columns: int) -> int:
    """A rough peak of one row's transient tensors in a padded forward of `query_tokens` over `columns` cached
    ones (per_token_activation each), one layer's attention scores (heads x query x columns) and the additive
    mask (query x columns), plus the last position's fp32 logits. Layers run one after the other, so one
    layer's worth is live at a time."""
    config = text_config(model_config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    scores = (config.num_attention_heads + 1) * query_tokens * columns * itemsize
    return query_tokens * per_token_activation(config, itemsize) + scores + 4 * config.vocab_size


def per_token_activation(config, itemsize: int) -> int:
    """Bytes of one token's transient tensors in one layer: hidden states and residuals (4 x hidden), the MLP's
    gate, up and product (3 x intermediate)."""
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return (4 * config.hidden_size + 3 * intermediate) * itemsize


def forward_bytes(model_config, dtype: torch.dtype, tokens: int, scored_tokens: int = 0) -> int:
    """A rough peak of ONE packed forward of `tokens` tokens (the widest forward a slot cache runs: the prefill
    token budget), layers one after the other; where attention materialises scores (SDPA's math path) one
    layer's for the longest sequence of `scored_tokens` (heads x q x k, q = k at most) and its mask."""
    config = text_config(model_config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    scores = (config.num_attention_heads + 1) * scored_tokens * scored_tokens * itemsize
    return tokens * per_token_activation(config, itemsize) + scores


def logits_bytes_per_row(model_config, dtype: torch.dtype) -> int:
    """A decoding row's last-position logits in the model's dtype and their fp32 copy (what sampling reads)."""
    config = text_config(model_config)
    return config.vocab_size * (torch.empty((), dtype=dtype).element_size() + 4)


def available_bytes(device: torch.device) -> int:
    """Memory free now: the CUDA device's free memory, or the host's MemAvailable on CPU. Measured once
    the model is placed, so its parameters are already out of it."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    for line in meminfo.read_text().splitlines() if meminfo.exists() else []:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 40


def memory_budget(available: int, fraction: float, sharing: int = 1, params: int = 0) -> int:
    """What one rank may spend on its KV cache and activations: `fraction` of `available`, split among the
    `sharing` ranks that draw on the same memory (ranks on one host share its RAM), less `params` when the
    figure was taken before the parameters were loaded."""
    return max(0, int(available * fraction) // max(1, sharing) - params)


@dataclass(frozen=True)
class BatchChoice:
    rows: int
    reason: str


def auto_batch_size(kv: KVShape, row_activation: int, columns: int, prompts: int, budget: int, forward: int = 0,
                    forward_tokens: int = 0) -> BatchChoice:
    """The most rows whose KV cache (`columns` = longest prompt + budget) plus per-row activations (a padded cache's
    whole forward, or a slot cache's logits) fit `budget` less `forward` (one packed forward of `forward_tokens`
    tokens), at least 1, at most the rank's prompts and AUTO_BATCH_MAX."""
    per_row = kv.bytes(1, columns) + row_activation
    fits = max(0, budget - forward) // per_row
    cap, capped_by = min((prompts, f"the rank's {prompts} prompts"), (AUTO_BATCH_MAX, f"the cap {AUTO_BATCH_MAX}"))
    rows = max(1, min(fits, cap))
    charged = f"{row_activation >> 10} KiB logits) + {forward >> 20} MiB for one forward of {forward_tokens} tokens" \
        if forward else f"{row_activation >> 10} KiB activations)"
    why = (f"{rows} rows x ({kv.bytes(1, columns) >> 10} KiB KV for {columns} columns + {charged} within a budget "
           f"of {budget >> 20} MiB")
    if fits > cap:
        why += f"; {fits} would fit, capped at {capped_by}"
    elif fits < 1:
        why = f"1 row: not even one row ({(per_row + forward) >> 20} MiB) fits the budget of {budget >> 20} MiB"
    return BatchChoice(rows, why)


def agree_across_ranks(choice: BatchChoice, has_prompts: bool, device: torch.device, group=None) -> BatchChoice:
    """Lockstep layouts: every rank of the group takes the least batch any of them fits (one all-reduce at
    start). A rank without prompts has no say."""
    none = 2**31 - 1
    rows = torch.tensor([choice.rows if has_prompts else none], dtype=torch.int64, device=device)
    dist.all_reduce(rows, op=dist.ReduceOp.MIN, group=group)
    agreed = read(rows)[0]
    agreed = choice.rows if agreed == none else agreed
    if agreed == choice.rows:
        return choice
    return BatchChoice(agreed, f"the least a rank of the lockstep group fits (this rank alone: {choice.reason})")
