"""generation.cache=offloaded (CUDA only): the dynamic cache's rows with every layer offloaded to CPU memory
between its uses (transformers' `DynamicCache(offloading=True)`: the next layer is prefetched on a side
stream while one runs). GPU memory then holds about one layer's keys and values; the cost is PCIe traffic.

When rows join or leave, every layer is brought to the CPU first, edited there (rows.py), and the
first layer is prefetched back for the next forward, as transformers leaves it after a forward.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from distgen.engine.kv.dynamic import DynamicKV
from distgen.engine.kv.kinds import CacheKind, register
from distgen.engine.kv.rows import cache_layers
from distgen.engine.scheduler import StepPlan
from distgen.common.errors import ConfigError


class OffloadedKV(DynamicKV):
    verifies_drafts = False  # its offloaded layers are not moved column by column (assisted decoding)
    def __init__(self, max_rows: int, pad_id: int, device: torch.device):
        if device.type != "cuda":
            raise ConfigError(f"generation.cache='offloaded' is not allowed: it offloads a CUDA KV cache to CPU "
                              f"memory and this rank runs on {device.type}; use generation.cache=auto, dynamic, "
                              "static or quantized")
        super().__init__(max_rows, pad_id, device)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(offloading=True)

    def commit(self, plan: StepPlan, batch, tokens: torch.Tensor, finished: list[bool]) -> None:
        reshaped = plan.kind == "prefill" or any(finished)
        if not reshaped:
            return super().commit(plan, batch, tokens, finished)
        caches = [self.cache] + ([self.pending[0]] if self.pending else [])
        torch.cuda.synchronize(self.device)  # the forward's prefetch and offload copies are done
        for layer in (layer for cache in caches for layer in cache_layers(cache)):
            layer.offload()
        torch.cuda.synchronize(self.device)
        super().commit(plan, batch, tokens, finished)
        for layer in cache_layers(self.cache)[:1]:
            layer.prefetch()


class OffloadedRows:
    """CUDA only: the dynamic cache with each layer offloaded to CPU memory between uses (one layer on the GPU)."""


register(CacheKind("offloaded", lambda spec: OffloadedKV(spec.rows, spec.pad_id, spec.device),
                   slots=lambda gen: False, devices=("cuda",)), OffloadedRows)
