"""The KV-cache seam: how a cache lays out rows, builds a forward's inputs and frees rows.

The engine calls, per step: `prefill_inputs(plan)`, `decode_inputs(requests)` or (a cache that
`mixes`) `mixed_inputs(plan)`, runs the forward, samples, then `commit(...)` with the tokens and
which requests finished.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import torch

from distgen.engine.request import Request
from distgen.engine.scheduler import StepPlan


@dataclass
class ForwardBatch:
    """One forward's model inputs, and which logits row belongs to each planned request."""
    inputs: dict[str, Any]
    # logits row of each planned request, in plan order
    rows: list[int]
    # A mixed step: the packed row's first `decode_slots` tokens are the decode part's (one per slot).
    decode_slots: int = 0
    # Rows addressed by slot id (kv/attention.py): the decode rows' slots, on the device (else None).
    decode_rows: Optional[torch.Tensor] = None


class KVCache(ABC):
    # True when decode inputs keep one shape for the whole job (what torch.compile needs).
    fixed_shape: bool = False
    # Whether a prompt may be prefilled in several chunks.
    supports_chunks: bool = False
    # Whether assisted decoding can run on it (verify_inputs / verified).
    verifies_drafts: bool = False
    # Whether a prefill forward packs its prompts into one row (no padding); the scheduler then bounds
    # a prefill's tokens by generation.prefill_chunk_tokens (engine.build.prefill_token_budget).
    packs_prefill: bool = False
    # Whether one forward can carry decode tokens and prompt chunks together (`mixed_inputs`).
    mixes: bool = False
    # Whether a row's first columns can be copied into another row (`copy_prefix`: a shared prefix, engine.prefix).
    copies_prefix: bool = False

    @property
    @abstractmethod
    def free_rows(self) -> int: ...

    @abstractmethod
    def admit(self, request: Request) -> None:
        """Give a queued request a row before its first prefill."""

    @abstractmethod
    def prefill_inputs(self, plan: StepPlan) -> ForwardBatch: ...

    @abstractmethod
    def decode_inputs(self, requests: list[Request]) -> ForwardBatch: ...

    def copy_prefix(self, src: int, dsts: list[int], columns: int) -> None:
        """Rows `dsts` (just admitted) take row `src`'s first `columns` columns (where `copies_prefix`)."""
        raise NotImplementedError(f"{type(self).__name__} does not copy KV between rows")

    def mixed_inputs(self, plan: StepPlan) -> ForwardBatch:
        """A mixed step (StepPlan.kind "mixed"): its decode part's tokens, then its prompt chunks, in one forward."""
        raise NotImplementedError(f"{type(self).__name__} does not mix decode and prefill tokens")

    def advance_state(self, plan: StepPlan, batch: ForwardBatch, tokens: torch.Tensor) -> None:
        """Right after sampling, before the host reads the tokens: the device state a next forward reads (each
        row's next input, its length). tokens: (logits rows,) the sampled ids on the device. Caches that need
        the finished rows to do it (row surgery) do it all in `commit`."""

    @abstractmethod
    def commit(self, plan: StepPlan, batch: ForwardBatch, tokens: torch.Tensor, finished: list[bool]) -> None:
        """Once the host has read the step's tokens: free finished rows (and record each row's next input,
        where `advance_state` did not).

        tokens: (logits rows,) the sampled ids on the device.
        """

    def verify_inputs(self, requests: list[Request], chunks: list[list[int]], keep: int) -> dict[str, Any]:
        """Assisted decoding: inputs that append `chunks[i]` (the last token, then the drafts) to each
        decoding request's row, left-padded to `keep` tokens, and return the logits of all `keep`."""
        raise NotImplementedError(f"{type(self).__name__} does not verify drafts")

    def verified(self, requests: list[Request], chunks: list[list[int]], kept: list[int],
                 finished: list[bool]) -> None:
        """After a verify: request i's cache holds only the first `kept[i]` tokens of `chunks[i]` (its
        next input is its last generated token); finished requests' rows are freed."""
        raise NotImplementedError(f"{type(self).__name__} does not verify drafts")

    def close(self) -> None:
        """Free the cache buffers (the rank is done)."""


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (..., cols) -> 0 where allowed, the dtype's minimum elsewhere (eager and sdpa both add it)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def kv_geometry(model: torch.nn.Module) -> tuple[int, Optional[int]]:
    """(decoder layers, sliding window or None) from the model config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config.num_hidden_layers, getattr(config, "sliding_window", None)
