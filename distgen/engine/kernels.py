"""The model-kernel seam: a backend that runs some of a model's modules on kernels of its own (distgen/backends/,
above the engine) registers a `KernelBackend` here; the engine builder applies every registered one and adds
what each says to the engine line. Registration happens when the backend is imported (the job's worker does;
a catalog of every implementation will), so the engine never imports a backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from distgen.common.registry import Registry
from distgen.config import GenerationConfig

# (generation settings, model, device, lockstep, compiling, autocast dtype) -> what the engine line says ("": nothing).
# May raise ConfigError (a kernel choice the settings force where it cannot run).
Prepare = Callable[[GenerationConfig, torch.nn.Module, torch.device, bool, bool, Optional[torch.dtype]], str]


@dataclass(frozen=True)
class KernelBackend:
    name: str
    prepare: Prepare


KERNEL_BACKENDS: Registry[KernelBackend] = Registry("kernel backend", valued=True)


def apply_backends(gen: GenerationConfig, model: torch.nn.Module, device: torch.device, lockstep: bool,
                   compiling: bool, autocast: Optional[torch.dtype]) -> list[str]:
    """Each registered backend prepares the model; what they say, in registration order (empty ones left out)."""
    said = [entry.impl.prepare(gen, model, device, lockstep, compiling, autocast)
            for entry in KERNEL_BACKENDS.entries.values()]
    return [text for text in said if text]
