"""The runner seam: the two model calls an engine step makes, `prefill` and `decode`.

Each is a small function of the model inputs returning the last-position logits
(rows, vocab). `decode` is what torch.compile wraps (when `generation.compile` says so); the
eager path calls the very same function. Both run under torch.no_grad and, with
`generation.autocast=bf16|fp16`, under torch.autocast in that dtype.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from distgen.common.checks import require
from distgen.common.registry import Registry
from distgen.engine.kv import varlen
from distgen.models.forward_args import model_inputs

logger = logging.getLogger(__name__)


def check_fp32_weights(cfg) -> None:
    """Autocast computes fp32 weights in half precision: it needs fp32 weights."""
    require(cfg.model.dtype in ("auto", "fp32"), "generation.autocast", cfg.generation.autocast,
            f"autocast is for fp32 weights, but model.dtype={cfg.model.dtype}; use generation.autocast=none "
            "(or model.dtype=fp32)")


# generation.autocast -> the dtype the forwards compute in (None: the weights' own).
AUTOCAST: Registry[Optional[torch.dtype]] = Registry("generation.autocast", valued=True)
AUTOCAST.register("none", None, None, doc="compute in the weights' dtype")
AUTOCAST.register("bf16", None, torch.bfloat16, doc="fp32 weights computed under torch.autocast in bf16",
                  check=check_fp32_weights)
AUTOCAST.register("fp16", None, torch.float16, doc="fp32 weights computed under torch.autocast in fp16",
                  check=check_fp32_weights)
# generation.compile_mode: torch.compile's modes.
COMPILE_MODES: Registry[Optional[str]] = Registry("generation.compile_mode", valued=True)
COMPILE_MODES.register("default", None, None, doc="torch.compile's default mode")
COMPILE_MODES.register("reduce-overhead", None, "reduce-overhead", doc="CUDA graphs through torch.compile")
COMPILE_MODES.register("max-autotune", None, "max-autotune", doc="autotuned kernels, and CUDA graphs on CUDA")


def forward_logits(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """(rows, vocab): each row's last logits; a packed prefill (one row of several prompts, `logits_to_keep`
    the index of each prompt's last token) returns one row per prompt."""
    logits = model(**inputs).logits
    return logits[0] if isinstance(inputs.get("logits_to_keep"), torch.Tensor) else logits[:, -1, :]


def split_plan(inputs: dict[str, Any]) -> tuple[dict[str, Any], Optional[varlen.AttentionPlan]]:
    """(the model's inputs, the slot attention plan a varlen forward carries or None)."""
    if "attention_plan" not in inputs:
        return inputs, None
    inputs = dict(inputs)
    return inputs, inputs.pop("attention_plan")


@dataclass(frozen=True)
class CompilePlan:
    enabled: bool
    mode: str = "default"
    reason: str = ""
    # CPU: freeze the weights into the compiled graph and let inductor pick its C++ GEMM kernels
    # (CPU_INDUCTOR_OPTIONS); only where the weights stay put (not a sharded layout).
    freeze: bool = False


# Inductor settings of a frozen CPU compile: weights become prepacked constants and max-autotune may pick
# the C++ GEMM template (measured ~1.3-1.5x MKL on the 8-layer model's decode GEMMs, one thread).
CPU_INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


# A decode function: (model, inputs) -> the rows' last logits.
DecodeFn = Callable[[torch.nn.Module, dict], torch.Tensor]


def frozen_cpu(compiled: DecodeFn) -> DecodeFn:
    """Run `compiled` with CPU_INDUCTOR_OPTIONS in force (compiling happens inside the first call;
    torch.compile's own `options` do not reach freezing)."""
    import torch._inductor.config as inductor_config

    def call(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        with inductor_config.patch(CPU_INDUCTOR_OPTIONS):
            return compiled(model, inputs)
    return call


class Runner:
    def __init__(self, model: torch.nn.Module, compile_plan: CompilePlan, autocast: Optional[torch.dtype] = None):
        """autocast: run the forwards under torch.autocast in this dtype (None: no autocast)."""
        self.model, self.autocast = model, autocast
        self.compiled = compile_plan.enabled
        self.compile_seconds = 0.0  # the first compiled decode step (its compile), once it ran
        self._decode: DecodeFn = forward_logits
        if compile_plan.enabled:
            # Never fullgraph (flash-attention-2 and some models break the graph); fixed shapes, so no dynamic.
            # DISTGEN_COMPILE_BACKEND=eager traces without codegen (the tests use it).
            compiled = torch.compile(forward_logits, mode=COMPILE_MODES.get(compile_plan.mode), dynamic=False,
                                     backend=os.environ.get("DISTGEN_COMPILE_BACKEND", "inductor"))
            self._decode = frozen_cpu(compiled) if compile_plan.freeze else compiled

    def prefill(self, inputs: dict[str, Any]) -> torch.Tensor:
        inputs, plan = split_plan(inputs)
        with self.context(inputs, plan):
            return self.fp32_logits(forward_logits(self.model, model_inputs(self.model, inputs)))

    def prefill_kept(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The model's logits of every position `logits_to_keep` keeps, as the model returns them ((1, kept,
        vocab) for a packed row, (rows, kept, vocab) for a padded batch): a prefill that keeps prompt positions
        (engine.prompt_logprobs)."""
        inputs, plan = split_plan(inputs)
        with self.context(inputs, plan):
            return self.fp32_logits(self.model(**model_inputs(self.model, inputs)).logits)

    def decode(self, inputs: dict[str, Any]) -> torch.Tensor:
        inputs, plan = split_plan(inputs)
        first_compiled = self.compiled and not self.compile_seconds
        start = time.perf_counter()
        with self.context(inputs, plan):
            logits = self.fp32_logits(self._decode(self.model, model_inputs(self.model, inputs)))
        if first_compiled:
            self.compile_seconds = time.perf_counter() - start
        return logits

    def context(self, inputs: dict[str, Any],
                plan: Optional[varlen.AttentionPlan] = None) -> contextlib.AbstractContextManager:
        """no_grad, generation.autocast when set, and the slot attention plan of a varlen forward."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())  # not inference_mode: FSDP updates its gathered params in place later
        if self.autocast is not None:
            stack.enter_context(torch.autocast(inputs["input_ids"].device.type, dtype=self.autocast))
        if plan is not None:
            stack.enter_context(varlen.activated(self.model, plan))
        return stack

    def fp32_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Sampling reads fp32 logits whatever dtype the forward computed in."""
        return logits if self.autocast is None else logits.float()


def persist_inductor_cache(cache_dir: Optional[str]) -> Path:
    """Keep compiled kernels across runs (a cold compile can take minutes on CPU)."""
    path = Path(cache_dir or os.environ.get("TORCHINDUCTOR_CACHE_DIR")
                or Path.home() / ".cache" / "distgen" / "inductor")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path
