"""generation.cache=quantized: keys and values stored in a few bits, by one of several backends.

- `int8`: distgen's int8 slot cache (slots.Int8SlotLayer: a scale per token and head, ~1/4 of fp32).
- `fp8`, `quanto`, `hqq`: transformers' `QuantizedCache` (KIVI-style: recent tokens stay in full precision
  up to `generation.cache_residual_length`, older ones are quantized) over left-padded rows like the
  dynamic cache. Row surgery (a row joins or leaves) cannot cut quantized states, so on such a step the
  rows' states are dequantized, edited and quantized again; decode steps append as transformers does.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from transformers import DynamicCache, QuantizedCache
from transformers.cache_utils import Fp8QuantizedLayer

from distgen.engine.kv.dynamic import DynamicKV
from distgen.engine.kv.kinds import CacheKind, CacheSpec, register
from distgen.engine.kv.rows import cache_layers
from distgen.engine.kv.slots import Int8SlotLayer, build_slots
from distgen.engine.memory import kv_shape
from distgen.engine.scheduler import StepPlan
from distgen.common.checks import require
from distgen.common.errors import ConfigError
from distgen.common.registry import Registry


# transformers' quantization group size, used when head_dim is a multiple of it.
DEFAULT_GROUP = 64


@dataclass(frozen=True)
class QuantBackend:
    name: str
    # generation.cache_quant_bits it takes; the first is the default.
    bits: tuple[int, ...]
    # transformers' QuantizedCache backend, or None: distgen's int8 slots.
    hf_backend: Optional[str]
    # The pip package (import name, requirement) it needs; None: torch and transformers alone.
    package: Optional[tuple[str, str]] = None


class Int8Slots:
    """distgen's int8 slot cache: codes plus a scale per token and head (fixed shape; chunks, compile)."""


class Fp8Rows:
    """transformers' fp8 quantized cache (per-tensor scale), left-padded rows."""


class QuantoRows:
    """transformers' quantized cache with optimum-quanto 2/4-bit groups and a full-precision residual."""


class HqqRows:
    """transformers' quantized cache with HQQ 2/4/8-bit groups (needs the hqq package)."""


QUANT_BACKENDS: Registry[QuantBackend] = Registry("generation.cache_quant_backend", valued=True)
for backend, doc in ((QuantBackend("int8", (8,), None), Int8Slots), (QuantBackend("fp8", (8,), "fp8"), Fp8Rows),
                     (QuantBackend("quanto", (4, 2), "quanto", ("optimum.quanto", "optimum-quanto==0.2.7")),
                      QuantoRows),
                     (QuantBackend("hqq", (4, 2, 8), "hqq", ("hqq", "hqq")), HqqRows)):
    QUANT_BACKENDS.register(backend.name, doc, backend, check=lambda cfg: check_quant_backend(cfg),  # defined below
                            owns=("generation.cache_residual_length",) if backend.name in ("quanto", "hqq") else ())


def check_quant_backend(cfg) -> None:
    """generation.cache_quant_backend: its bits, and its package wherever a quantized cache may be built."""
    gen = cfg.generation
    backend = QUANT_BACKENDS.get(gen.cache_quant_backend)
    if gen.cache_quant_bits is not None:
        require(gen.cache_quant_bits in backend.bits, "generation.cache_quant_bits", gen.cache_quant_bits,
                f"generation.cache_quant_backend={backend.name} takes " + " or ".join(map(str, backend.bits)))
    missing = missing_package(backend)
    if gen.cache in ("auto", "quantized") and missing:
        raise ConfigError(f"generation.cache_quant_backend={backend.name!r} is not allowed: it needs the Python "
                          f"package {missing}, which is not installed (pip install {missing}); backends: "
                          + ", ".join(QUANT_BACKENDS.names()))


def quant_bits(gen) -> int:
    backend = QUANT_BACKENDS.get(gen.cache_quant_backend)
    return gen.cache_quant_bits if gen.cache_quant_bits is not None else backend.bits[0]


def missing_package(backend: QuantBackend) -> Optional[str]:
    """The pip requirement the backend needs and this environment lacks, or None."""
    if backend.package is None or importlib.util.find_spec(backend.package[0]) is not None:
        return None
    return backend.package[1]


def dequantized(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized layer's whole states in full precision (rows, heads, columns, head_dim)."""
    keys, values = [layer._dequantize(layer._quantized_keys)], [layer._dequantize(layer._quantized_values)]
    if layer.keys.dim() == 4:  # the full-precision residual (quanto, hqq)
        keys.append(layer.keys)
        values.append(layer.values)
    return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)


def load_states(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Quantize `keys`/`values` (rows, heads, columns, head_dim) into an empty quantized layer."""
    layer.lazy_initialization(keys, values)  # fp8's also quantizes them
    if not isinstance(layer, Fp8QuantizedLayer):
        layer._quantized_keys = layer._quantize(keys.contiguous(), axis=layer.axis_key)
        layer._quantized_values = layer._quantize(values.contiguous(), axis=layer.axis_value)
    layer.cumulative_length = keys.shape[-2]


def unpack(cache: QuantizedCache) -> DynamicCache:
    plain = DynamicCache()
    for index, layer in enumerate(cache.layers):
        plain.update(*dequantized(layer), index)
    return plain


class QuantizedRowsKV(DynamicKV):
    """The dynamic cache's rows, held in a transformers QuantizedCache between steps that change rows."""
    verifies_drafts = False  # its packed layers are not moved column by column (assisted decoding)

    def __init__(self, max_rows: int, pad_id: int, device: torch.device, make: Callable[[], QuantizedCache]):
        super().__init__(max_rows, pad_id, device)
        self.make = make

    def pack(self, plain: DynamicCache) -> QuantizedCache:
        cache = self.make()
        for layer, source in zip(cache.layers, cache_layers(plain), strict=True):
            load_states(layer, source.keys, source.values)
        return cache

    def commit(self, plan: StepPlan, batch, tokens: torch.Tensor, finished: list[bool]) -> None:
        # Rows join (a prefill) or leave: edit them in full precision, then quantize again.
        reshaped = plan.kind == "prefill" or any(finished)
        if reshaped and isinstance(self.cache, QuantizedCache):
            self.cache = unpack(self.cache)
        super().commit(plan, batch, tokens, finished)
        if reshaped:
            self.cache = self.pack(self.cache) if self.rows else DynamicCache()


def build_quantized(spec: CacheSpec):
    gen = spec.gen
    backend = QUANT_BACKENDS.get(gen.cache_quant_backend)
    if backend.hf_backend is None:
        return build_slots(spec, layer_class=Int8SlotLayer)
    if backend.hf_backend == "fp8":
        make = lambda: QuantizedCache("fp8", spec.model.config)  # noqa: E731  (per-tensor: no group settings)
    else:
        # Groups within one token's head vector (a divisor of head_dim), so any number of rows and columns
        # groups evenly (transformers' default of 64 needs rows x heads x columns x head_dim / 64 whole).
        group = math.gcd(DEFAULT_GROUP, kv_shape(spec.model.config, torch.float32).head_dim)
        make = lambda: QuantizedCache(backend.hf_backend, spec.model.config, nbits=quant_bits(gen),  # noqa: E731
                                      q_group_size=group, residual_length=gen.cache_residual_length)
    return QuantizedRowsKV(spec.rows, spec.pad_id, spec.device, make)


class QuantizedCacheSettings:
    """Keys and values in a few bits, by generation.cache_quant_backend (tokens may differ from full precision)."""


register(CacheKind("quantized", build_quantized, slots=lambda gen: gen.cache_quant_backend == "int8"),
         QuantizedCacheSettings, owns=("generation.cache_quant_backend", "generation.cache_quant_bits",
                                       "generation.cache_residual_length"))
