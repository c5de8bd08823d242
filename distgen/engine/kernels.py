"""The model-kernel seam: a backend that runs some of a model's modules on kernels of its own (distgen/backends/,
above the engine) registers a `KernelBackend` here; the engine builder applies every registered one, and the
engine plan keeps what each says and whether any makes a row's logits independent of its batch. Registration
happens when the backend is imported (the catalog imports every implementation), so the engine never imports
a backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from distgen.common.registry import Registry
from distgen.config import GenerationConfig
from distgen.engine.plan import KernelChoice

# (generation settings, model, device, lockstep, compiling, autocast dtype) -> what the engine line says ("": nothing).
# May raise ConfigError (a kernel choice the settings force where it cannot run).
Prepare = Callable[[GenerationConfig, torch.nn.Module, torch.device, bool, bool, Optional[torch.dtype]], str]
# model (once prepared) -> whether this backend computes its forwards so that a row's logits do not depend on the
# other rows of its forward nor on how its prompt is chunked (False: it does not, or it does not run this model).
BatchInvariant = Callable[[torch.nn.Module], bool]


def never_invariant(model: torch.nn.Module) -> bool:
    return False


@dataclass(frozen=True)
class KernelBackend:
    name: str
    prepare: Prepare
    batch_invariant: BatchInvariant = never_invariant


KERNEL_BACKENDS: Registry[KernelBackend] = Registry("kernel backend", valued=True)


def apply_backends(gen: GenerationConfig, model: torch.nn.Module, device: torch.device, lockstep: bool,
                   compiling: bool, autocast: Optional[torch.dtype]) -> tuple[KernelChoice, ...]:
    """Each registered backend prepares the model; what they say, in registration order (silent ones left out)."""
    said = [KernelChoice(entry.name, entry.impl.prepare(gen, model, device, lockstep, compiling, autocast))
            for entry in KERNEL_BACKENDS.entries.values()]
    return tuple(choice for choice in said if choice.reason)


def batch_invariant(model: torch.nn.Module) -> bool:
    """Whether a registered backend computes this (prepared) model's forwards batch-invariantly; torch's own GEMMs
    and SDPA pick their blocking by the rows they get, so without one a row's logits may depend on its batch."""
    return any(entry.impl.batch_invariant(model) for entry in KERNEL_BACKENDS.entries.values())
