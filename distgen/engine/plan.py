"""The engine plan: every decision the builder (build.py) makes for one rank's engine, each with its reason, as
frozen values.

The builder computes each decision by a small function of the config, the device and what it reads of the model
(and, for what only the built cache knows, of its `CacheFacts`); the `Engine` is constructed from the plan and
reads its flags from it. `describe()` is the engine line the coordinator prints (`distgen: engine: ...`: the
tests and bench/common.py's DistgenWatch read its words); `as_dict()` is what each rank's stats (stats.json's
`ranks[i].engine`) and the report keep of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from distgen.engine.memory import BatchChoice
from distgen.engine.runner import CompilePlan

# What the engine line says of the steps (fixed words: the tests and the bench grep them).
MIXED_SAID = "mixed steps (the decoding rows ride along each prefill forward)"
PIPELINED_SAID = "pipelined steps (step N+1 launched before step N's tokens are read)"
LOCKSTEP_SAID = "out-of-memory back-off off (lockstep layout)"


@dataclass(frozen=True)
class DeviceDefaults:
    """The generation settings left to the device (null in the config) and the values the device gave them."""
    filled: tuple[tuple[str, Any], ...]  # (key, value), e.g. (("batch_size", 4), ("prefill_chunk_tokens", 512))
    device_type: str                      # "cuda" or "cpu"

    @property
    def said(self) -> str:
        """What the engine line says of them ("" when none was left to the device)."""
        if not self.filled:
            return ""
        why = "a GPU forward costs about the same up to thousands of tokens" if self.device_type == "cuda" else \
            "a CPU forward costs in proportion to its tokens"
        said = ", ".join(f"generation.{key}={value}" for key, value in self.filled)
        return f"{said} (the {self.device_type} defaults: {why})"


@dataclass(frozen=True)
class CacheChoice:
    name: str    # a name in engine/kv CACHES
    reason: str


@dataclass(frozen=True)
class AssistantChoice:
    name: str          # model.assistant
    schedule: str      # generation.assistant_schedule
    draft_tokens: int  # generation.num_assistant_tokens


@dataclass(frozen=True)
class AutocastChoice:
    dtype: Optional[str]  # what the forwards autocast to ("bf16", "fp16"), None: the weights' dtype
    reason: str           # "" when no autocast was asked for


@dataclass(frozen=True)
class KernelChoice:
    backend: str  # a name in engine/kernels KERNEL_BACKENDS
    reason: str   # what it did to the model


@dataclass(frozen=True)
class AttentionChoice:
    name: str     # a name in engine/kv/attention ATTENTIONS
    reason: str


@dataclass(frozen=True)
class SharingChoice:
    """Prefix sharing (engine/prefix.py)."""
    copies: bool                # the cache copies KV between slots: a prompt's samples share its prefill
    min_tokens: Optional[int]   # prompts sharing at least this many first tokens share them (None: samples only)
    reason: str


@dataclass(frozen=True)
class GraphsChoice:
    """Decode steps over rows addressed by slot id, padded to row buckets (engine/graphs.py)."""
    buckets: int   # how many row buckets
    largest: int   # the largest bucket's rows
    capture: bool  # each bucket captured as a CUDA graph on first use (else eager)
    reason: str    # why eager ("" when captured)

    @property
    def said(self) -> str:
        how = "each captured as a CUDA graph on first use" if self.capture else f"eager: {self.reason}"
        return f"decode rows padded to {self.buckets} buckets of 1..{self.largest} rows, {how}"


@dataclass(frozen=True)
class Decision:
    """One decision as stats.json and the report name it."""
    name: str
    value: Any    # JSON: a name, a number, a flag, a list or None
    reason: Optional[str]


@dataclass(frozen=True)
class EnginePlan:
    """Every decision behind one rank's engine, in the order the engine line says them."""
    batch: BatchChoice             # rows, and why (generation.batch_size or what auto fitted)
    scheduler: str                 # generation.scheduler
    cache: CacheChoice
    compile: CompilePlan
    lockstep: bool                 # a lockstep layout: out-of-memory back-off off
    defaults: DeviceDefaults
    assistant: Optional[AssistantChoice]
    autocast: AutocastChoice
    kernels: tuple[KernelChoice, ...]   # what each kernel backend that acted on the model did
    attention: Optional[AttentionChoice]  # the slot attention; None: the cache does not attend through that seam
    adapters: Optional[int]        # LoRA adapters swapped in per record (None: no model.lora)
    sharing: SharingChoice
    mixed: bool                    # decoding rows ride along prefill forwards
    pipelined: bool                # step N+1 launched before step N's tokens are read
    graphs: Optional[GraphsChoice]  # None: decode steps go through the cache's own decode inputs
    token_budget: int              # most prompt tokens one prefill forward runs
    # A row's logits do not depend on the other rows of its forward nor on how its prompt is chunked (a kernel
    # backend says so: engine/kernels.py); where False, a resumed sampled job may draw other tokens.
    batch_invariant: bool

    def describe(self) -> str:
        """The engine line (without its `engine: ` prefix)."""
        batch, cache = self.batch, self.cache
        said = [f"batch_size={batch.rows} ({batch.reason}), scheduler={self.scheduler}, cache={cache.name} "
                f"({cache.reason})", self.compile.reason]
        if self.lockstep:
            said.append(LOCKSTEP_SAID)
        if self.defaults.said:
            said.append(self.defaults.said)
        if self.assistant is not None:
            said.append(f"assisted by {self.assistant.name} ({self.assistant.schedule}, "
                        f"{self.assistant.draft_tokens} draft tokens)")
        if self.autocast.reason:
            said.append(self.autocast.reason)
        said += [kernel.reason for kernel in self.kernels]
        if self.attention is not None:
            said.append(f"decode attention: {self.attention.reason}")
        if self.adapters is not None:
            said.append(f"{self.adapters} LoRA adapters swapped in per record")
        said.append(self.sharing.reason)
        if self.mixed and self.scheduler != "static":  # a static batch admits prompts only once no row decodes
            said.append(MIXED_SAID)
        if self.pipelined:
            said.append(PIPELINED_SAID)
        if self.graphs is not None:
            said.append(self.graphs.said)
        return "; ".join(said)

    def decisions(self) -> tuple[Decision, ...]:
        """Every decision as (name, value, reason), in the order of the line."""
        batch, cache, compiled, graphs = self.batch, self.cache, self.compile, self.graphs
        return (
            Decision("batch_size", batch.rows, batch.reason),
            Decision("scheduler", self.scheduler, "generation.scheduler"),
            Decision("cache", cache.name, cache.reason),
            Decision("compile", compiled.mode if compiled.enabled else "off", compiled.reason),
            Decision("oom_backoff", not self.lockstep, LOCKSTEP_SAID if self.lockstep else "ranks run free"),
            Decision("device_defaults", dict(self.defaults.filled), self.defaults.said),
            Decision("assistant", self.assistant and self.assistant.name,
                     self.assistant and f"{self.assistant.schedule}, {self.assistant.draft_tokens} draft tokens"),
            Decision("autocast", self.autocast.dtype, self.autocast.reason),
            Decision("kernels", [kernel.backend for kernel in self.kernels],
                     "; ".join(kernel.reason for kernel in self.kernels)),
            Decision("decode_attention", self.attention and self.attention.name,
                     self.attention.reason if self.attention else "the cache does not attend through slot attention"),
            Decision("lora_adapters", self.adapters, "swapped in per record" if self.adapters is not None else ""),
            Decision("prefix_sharing", self.sharing.min_tokens if self.sharing.copies else None, self.sharing.reason),
            Decision("mixed_steps", self.mixed, MIXED_SAID if self.mixed else ""),
            Decision("pipelined", self.pipelined, PIPELINED_SAID if self.pipelined else ""),
            Decision("decode_buckets", graphs and [graphs.buckets, graphs.largest], graphs.said if graphs else ""),
            Decision("prefill_token_budget", self.token_budget, "most prompt tokens one prefill forward runs"),
            Decision("batch_invariant", self.batch_invariant, "a row's logits do not depend on its batch (a kernel "
                     "backend's decoder stack)" if self.batch_invariant else "torch's GEMMs and SDPA pick their "
                     "blocking by the rows they get"),
        )

    def as_dict(self) -> dict:
        """Every decision as {"value", "reason"} by name (JSON: stats.json's ranks[i].engine), and the line."""
        return {**{d.name: {"value": d.value, "reason": d.reason or ""} for d in self.decisions()},
                "line": self.describe()}


@dataclass(frozen=True)
class CacheFacts:
    """What the plan reads of the built KV cache."""
    varlen: bool       # attends through the slot-attention seam (engine/kv/attention.py)
    addressed: bool    # rows addressed by slot id (a decode step's inputs come from device state)
    mixes: bool        # packs decode tokens and prompt segments into one forward
    buckets: tuple[int, ...]  # the row buckets of an addressed cache's padded decode step

    @classmethod
    def of(cls, kv: Any) -> "CacheFacts":
        return cls(bool(getattr(kv, "varlen", False)), bool(getattr(kv, "addressed", False)),
                   bool(getattr(kv, "mixes", False)), tuple(getattr(kv, "buckets", ())))


def mixes(mixed_steps: bool, cache: CacheFacts, assisted: bool) -> bool:
    """Decoding rows ride along prefill forwards: asked for (generation.mixed_steps), and the cache packs both into
    one forward (an assisted decode is a verify forward of its own, so it never mixes)."""
    return mixed_steps and cache.mixes and not assisted


def pipelines(cache: CacheFacts, lockstep: bool, assisted: bool) -> bool:
    """Rows addressed by slot id: a step's inputs come from device state, so the next step can be launched before
    this one's tokens are read. Not in lockstep layouts (every step a collective, landed in step) nor with an
    assistant (its accept step reads every row's tokens)."""
    return cache.addressed and not lockstep and not assisted


def plan_graphs(cache: CacheFacts, assisted: bool, blocker: Optional[str]) -> Optional[GraphsChoice]:
    """The padded decode step of an addressed cache (None: not addressed, or assisted); `blocker`: why it cannot
    be captured (graphs.graphs_blocker), None: captured."""
    if not cache.addressed or assisted:
        return None
    return GraphsChoice(len(cache.buckets), cache.buckets[-1], blocker is None, blocker or "")
