"""A growing left-padded cache (transformers' DynamicCache) edited row by row.

Rows are the running requests in order. A prefill runs in its own DynamicCache; its
surviving rows are then appended right-aligned to the running cache. Finished rows are
dropped and leading columns no row needs are trimmed (`rows.py`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers import DynamicCache

from distgen.engine.kv.base import ForwardBatch, KVCache
from distgen.engine.kv.kinds import CacheKind, register
from distgen.engine.kv.rows import append_rows, cache_layers, select_rows, trim_dead_columns
from distgen.engine.request import Request
from distgen.engine.scheduler import StepPlan


def left_pad(token_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding shifts each row, so positions count real tokens only (as HF generate does)."""
    positions = attention_mask.cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


class DynamicKV(KVCache):
    verifies_drafts = True
    def __init__(self, max_rows: int, pad_id: int, device: torch.device):
        self.max_rows, self.pad_id, self.device = max_rows, pad_id, device
        self.cache = self.new_cache()
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)  # (rows, cols)
        self.next_input = torch.zeros((0, 1), dtype=torch.long, device=device)  # (rows, 1)
        self.rows = 0
        self.pending: Optional[tuple[DynamicCache, torch.Tensor]] = None

    @property
    def free_rows(self) -> int:
        return self.max_rows - self.rows - (len(self.pending[1]) if self.pending else 0)

    def admit(self, request: Request) -> None:
        pass

    def prefill_inputs(self, plan: StepPlan) -> ForwardBatch:
        assert all(chunk == r.prompt_length for r, chunk in zip(plan.requests, plan.chunks)), "whole prompts only"
        input_ids, mask = left_pad([r.token_ids for r in plan.requests], self.pad_id)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        self.pending = (self.new_cache(), mask)
        inputs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                      cache=self.pending[0], use_cache=True, logits_to_keep=1)
        return ForwardBatch(inputs, list(range(len(plan.requests))))

    def decode_inputs(self, requests: list[Request]) -> ForwardBatch:
        self.mask = torch.cat([self.mask, torch.ones_like(self.next_input)], dim=-1)
        positions = self.mask.sum(dim=-1, keepdim=True) - 1
        inputs = dict(input_ids=self.next_input, attention_mask=self.mask, position_ids=positions,
                      cache=self.cache, use_cache=True, logits_to_keep=1)
        return ForwardBatch(inputs, list(range(len(requests))))

    def commit(self, plan: StepPlan, batch: ForwardBatch, tokens: torch.Tensor, finished: list[bool]) -> None:
        joining = plan.kind == "prefill"
        cache, mask = self.pending if joining else (self.cache, self.mask)
        self.pending = None
        kept = [row for row, done in enumerate(finished) if not done]
        if len(kept) < len(finished):
            rows = torch.tensor(kept, dtype=torch.long, device=self.device)
            mask, tokens = select_rows(cache, mask, rows), tokens[rows]
        if joining and self.rows:
            self.mask = append_rows(self.cache, self.mask, cache, mask)
            self.next_input = torch.cat([self.next_input, tokens.unsqueeze(-1)])
            self.rows += len(kept)
        else:
            self.cache, self.mask, self.next_input, self.rows = cache, mask, tokens.unsqueeze(-1), len(kept)
        if joining or len(kept) < len(finished):
            # Columns die only when rows leave or join; finding them reads the mask on the host (a sync).
            self.mask = trim_dead_columns(self.cache, self.mask)

    def new_cache(self) -> DynamicCache:
        """An empty cache for the running rows or a prefill (a subclass may offload or quantize it)."""
        return DynamicCache()

    def verify_inputs(self, requests: list[Request], chunks: list[list[int]], keep: int) -> dict:
        """Every row gets `keep` new columns: its chunk right-aligned, masked padding before it."""
        input_ids, block = left_pad(chunks, self.pad_id)  # (rows, keep)
        self.mask = torch.cat([self.mask, block.to(self.device)], dim=-1)
        positions = positions_from_mask(self.mask)[:, -keep:]
        return dict(input_ids=input_ids.to(self.device), attention_mask=self.mask, position_ids=positions,
                    cache=self.cache, use_cache=True, logits_to_keep=keep)

    def verified(self, requests: list[Request], chunks: list[list[int]], kept: list[int],
                 finished: list[bool]) -> None:
        """Drop each row's padding and rejected columns of the verify block: the row's old columns move
        right by their count, its kept ones follow, so every row ends in the last column again and the
        dropped columns become masked padding at the left. Rotary positions are baked into the keys, so
        moving columns is safe."""
        columns, keep = self.mask.shape[1], max(len(c) for c in chunks)
        old = columns - keep
        long = dict(dtype=torch.long, device=self.device)
        pad = torch.tensor([keep - len(c) for c in chunks], **long).unsqueeze(-1)  # (rows, 1)
        junk = torch.tensor([keep - k for k in kept], **long).unsqueeze(-1)  # padding + rejected, (rows, 1)
        col = torch.arange(columns, **long)
        # (rows, columns): new column c <- old column source[c]; the first `junk` columns are masked
        source = torch.where(col < junk, 0, torch.where(col < junk + old, col - junk, old + pad + col - junk - old))
        self.mask = self.mask.gather(1, source).masked_fill(col < junk, 0)
        for layer in cache_layers(self.cache):
            index = source[:, None, :, None].expand_as(layer.keys)  # (rows, heads, columns, head_dim)
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
        self.next_input = torch.tensor([[r.generated[-1]] for r in requests], dtype=torch.long, device=self.device)
        keep_rows = [row for row, done in enumerate(finished) if not done]
        if len(keep_rows) < len(finished):
            rows = torch.tensor(keep_rows, dtype=torch.long, device=self.device)
            self.mask, self.next_input = select_rows(self.cache, self.mask, rows), self.next_input[rows]
        self.rows = len(keep_rows)
        self.mask = trim_dead_columns(self.cache, self.mask)

    def close(self) -> None:
        self.cache, self.pending = self.new_cache(), None
        self.mask, self.next_input = self.mask.new_zeros((0, 0)), self.next_input.new_zeros((0, 1))


class GrowingRows:
    """transformers' DynamicCache, left-padded rows: finished rows dropped and new ones appended by row surgery."""


register(CacheKind("dynamic", lambda spec: DynamicKV(spec.rows, spec.pad_id, spec.device), slots=lambda gen: False),
         GrowingRows)
