"""The runner seam: the two model calls an engine step makes, `prefill` and `decode`.

Each is a small function of the model inputs returning the last-position logits
(rows, vocab). `decode` is what torch.compile wraps (when `generation.compile` says so); the
eager path calls the very same function.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from distgen.forward_args import model_inputs

log = logging.getLogger("distgen.engine")


def forward_logits(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model(**inputs).logits[:, -1, :]


@dataclass(frozen=True)
class CompilePlan:
    enabled: bool
    mode: str = "default"
    reason: str = ""


class Runner:
    def __init__(self, model: torch.nn.Module, compile_plan: CompilePlan):
        self.model = model
        self.compiled = compile_plan.enabled
        self._decode: Callable[[torch.nn.Module, dict], torch.Tensor] = forward_logits
        if compile_plan.enabled:
            # Never fullgraph (flash-attention-2 and some models break the graph); fixed shapes, so no dynamic.
            # DISTGEN_COMPILE_BACKEND=eager traces without codegen (the tests use it).
            mode = None if compile_plan.mode == "default" else compile_plan.mode
            self._decode = torch.compile(forward_logits, mode=mode, dynamic=False, backend=os.environ.get("DISTGEN_COMPILE_BACKEND", "inductor"))

    @torch.no_grad()
    def prefill(self, inputs: dict[str, Any]) -> torch.Tensor:
        return forward_logits(self.model, model_inputs(self.model, inputs))

    @torch.no_grad()
    def decode(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self._decode(self.model, model_inputs(self.model, inputs))


def persist_inductor_cache(cache_dir: Optional[str]) -> Path:
    """Keep compiled kernels across runs (a cold compile can take minutes on CPU)."""
    path = Path(cache_dir or os.environ.get("TORCHINDUCTOR_CACHE_DIR")
                or Path.home() / ".cache" / "distgen" / "inductor")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path
