"""Row surgery on a left-padded KV cache: drop finished rows, add new ones, trim dead columns.

Every layer holds keys/values shaped (rows, heads, columns, head_dim); the attention mask
(rows, columns) marks which columns hold a real token. Rotary positions are baked into the
cached keys, so moving a row's columns does not change what it attends to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from distgen.engine.host import read


def cache_layers(cache: DynamicCache):
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]


def select_rows(cache: DynamicCache, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    for layer in cache_layers(cache):
        index = rows.to(layer.keys.device)  # an offloaded layer lives on the CPU
        layer.keys, layer.values = layer.keys[index], layer.values[index]
    return mask[rows]


def trim_dead_columns(cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading columns no row attends to any more."""
    live = read(mask.any(dim=0).nonzero()[:1, 0])  # one host read: the first live column
    first = live[0] if live else mask.shape[1]
    if first == 0:
        return mask
    for layer in cache_layers(cache):
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    return mask[:, first:]


def left_pad_columns(cache: DynamicCache, mask: torch.Tensor, width: int) -> torch.Tensor:
    extra = width - mask.shape[1]
    if extra <= 0:
        return mask
    for layer in cache_layers(cache):
        layer.keys = F.pad(layer.keys, (0, 0, extra, 0))
        layer.values = F.pad(layer.values, (0, 0, extra, 0))
    return F.pad(mask, (extra, 0))


def append_rows(cache: DynamicCache, mask: torch.Tensor, new_cache: DynamicCache,
                new_mask: torch.Tensor) -> torch.Tensor:
    """Add `new_cache`'s rows below `cache`'s (in place), both right-aligned to the wider one."""
    width = max(mask.shape[1], new_mask.shape[1])
    mask = left_pad_columns(cache, mask, width)
    new_mask = left_pad_columns(new_cache, new_mask, width)
    for layer, new in zip(cache_layers(cache), cache_layers(new_cache), strict=True):
        layer.keys = torch.cat([layer.keys, new.keys])
        layer.values = torch.cat([layer.values, new.values])
    return torch.cat([mask, new_mask])
