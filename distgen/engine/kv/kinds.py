"""The name table of KV caches (`generation.cache`): each implementation module registers its kinds here,
and the config check, the engine builder and the docs read this one table.

`python -c "from distgen.engine.kv import CACHES; print(CACHES.describe())"` lists it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch

from distgen.common.checks import require
from distgen.common.device import target_device
from distgen.common.registry import Registry

if TYPE_CHECKING:
    from distgen.config import GenerationConfig
    from distgen.engine.kv.attention import SlotAttention
    from distgen.engine.kv.base import KVCache
    from distgen.inputs.records import Prompt


@dataclass(frozen=True)
class QueueShape:
    """A rank's sequences as the length table sees them (no request needs to exist): each one's prompt token
    count and budget, in any order; a prompt with n samples (generation.n) is n sequences."""
    lengths: np.ndarray  # (prompts,)
    budgets: np.ndarray  # (prompts,) each prompt's own max_new_tokens or generation.max_new_tokens

    @classmethod
    def of(cls, queue: Sequence[tuple["Prompt", Sequence[int]]], gen: "GenerationConfig") -> "QueueShape":
        samples = [p.samples(gen.n) for p, _ in queue]
        return cls(np.repeat(np.asarray([len(ids) for _, ids in queue], dtype=np.int64), samples),
                   np.repeat(np.asarray([p.budget(gen.max_new_tokens) for p, _ in queue], dtype=np.int64), samples))

    @property
    def prompts(self) -> int:
        return len(self.lengths)

    @property
    def columns(self) -> int:
        """The most cache columns one sequence needs: prompt plus budget."""
        return int((self.lengths + self.budgets).max()) if len(self.lengths) else 1

    @property
    def longest_prompt(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 1

    def decode_steps(self, batch_size: int) -> int:
        return int(self.budgets.sum()) // batch_size


@dataclass(frozen=True)
class CacheSpec:
    """What a cache builder gets: the model, the settings, the rank's prompts and the rows to hold."""
    model: torch.nn.Module
    gen: "GenerationConfig"
    shape: QueueShape
    rows: int
    pad_id: int
    device: torch.device
    compiling: bool
    # The most tokens a row writes in one decode forward (an assisted verify: its drafts + 1).
    verify_tokens: int = 1
    # The slot attention implementation (kv/attention.py) the varlen slot cache runs; None: torch_sdpa.
    attention: Optional["SlotAttention"] = None


@dataclass(frozen=True)
class CacheKind:
    name: str
    build: Callable[[CacheSpec], "KVCache"]
    # Whether, with these settings, it is a slot cache (fixed shape: chunked prefill and compile need one;
    # it also needs a model that takes position ids and a 4D mask, see engine.build.slot_cache_blocker).
    slots: Callable[["GenerationConfig"], bool]
    # Device types it runs on.
    devices: tuple[str, ...] = ("cpu", "cuda")


# generation.cache: auto (the builder picks one: engine.build.plan_cache) or a registered kind.
CACHES: Registry[CacheKind] = Registry("generation.cache", valued=True, also={
    "auto": "picked per job: sliding_window/quantized/offloaded when memory is short, static, else dynamic"})


def register(kind: CacheKind, config: type, owns: tuple[str, ...] = ()) -> CacheKind:
    """`config`: the kind's settings (its docstring is the one-line summary the docs print); `owns`: the generation
    keys only this kind reads."""
    return CACHES.register(kind.name, config, kind, check=check_cache_kind, owns=owns)


def slot_cache_names(gen: "GenerationConfig") -> list[str]:
    return [name for name, entry in CACHES.entries.items() if entry.impl.slots(gen)]


def check_cache_kind(cfg) -> None:
    """generation.cache=<kind>: it runs on the job's device, and is a slot cache where chunked prefill or a
    compiled decode needs one."""
    gen = cfg.generation
    kind = CACHES.get(gen.cache)
    device = target_device(cfg.device)
    require(device in kind.devices, "generation.cache", gen.cache,
            f"it runs on {' and '.join(kind.devices)} only, and this job runs on {device}; caches for "
            f"{device}: auto, " + ", ".join(n for n, e in CACHES.entries.items() if device in e.impl.devices))
    slot_names = ", ".join(slot_cache_names(gen)) + " or auto"
    slots = kind.slots(gen)
    require(slots or gen.scheduler != "chunked", "generation.cache", gen.cache,
            f"generation.scheduler=chunked needs a slot cache: {slot_names}")
    require(slots or gen.compile != "on", "generation.cache", gen.cache,
            f"generation.compile=on needs a fixed-shape cache: {slot_names}")
