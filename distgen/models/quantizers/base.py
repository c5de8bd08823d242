"""What a quantizer is, the table of quantizers by name, and the check of what it can be combined with.

A quantizer turns a loaded model's Linear layers (all but the output head) into quantized ones
after the weights are read and before a layout places the model. Each says on which devices its
kernels run, whether a layout that splits tensors over ranks can split its weights (bitsandbytes,
quanto and torch's dynamic int8 weights cannot be split: the layouts say which of them keep every
tensor whole, `Layout.whole_tensors`, and check it), and whether torch.compile may wrap the result (the
engine's compile rule reads `compileable`).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from distgen.common.checks import require
from distgen.common.device import target_device
from distgen.common.errors import ConfigError
from distgen.common.registry import Registry

if TYPE_CHECKING:
    from distgen.config import RunConfig


@dataclass(frozen=True)
class Quantizer:
    name: str
    # Device types its kernels run on.
    devices: tuple[str, ...]
    # A layout that splits weight tensors over ranks (fsdp, zero3) can split its weights; False: only a
    # layout that keeps every tensor whole places them (the layout checks it: Layout.whole_tensors).
    shardable: bool
    # torch.compile may wrap the quantized model (transformers says the same of its own quantizers).
    compileable: bool
    # The pip package (import name, pinned requirement) it needs; None: torch alone.
    package: Optional[tuple[str, str]]
    # (model loaded on CPU, target device) -> the model with quantized Linear layers.
    apply: Callable[[nn.Module, torch.device], nn.Module]
    # model.dtype values it accepts; None: all.
    dtypes: Optional[tuple[str, ...]] = None


QUANTIZERS: Registry[Quantizer] = Registry("model.quantization", valued=True)


def register(quantizer: Quantizer, config: type) -> Quantizer:
    return QUANTIZERS.register(quantizer.name, config, quantizer, check=check_quantization)


def get_quantizer(name: str) -> Quantizer:
    return QUANTIZERS.get(name)


def check_quantization(cfg: "RunConfig") -> None:
    """Refuse, before any worker starts, a quantizer that cannot run with the chosen device, dtype, or without its
    package (the layout checks that it can place the quantized weights)."""
    name = cfg.model.quantization
    quantizer = get_quantizer(name)
    device = target_device(cfg.device)
    require(device in quantizer.devices, "model.quantization", name,
            f"{name} runs on {' and '.join(quantizer.devices)}, not on device={cfg.device} ({device})"
            + ("; use device=cpu" if quantizer.devices == ("cpu",) else ""))
    if quantizer.dtypes is not None:
        require(cfg.model.dtype in quantizer.dtypes, "model.quantization", name,
                f"it needs model.dtype in {', '.join(quantizer.dtypes)}, not {cfg.model.dtype}")
    if quantizer.package is not None:
        module, requirement = quantizer.package
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"model.quantization={name!r} is not allowed: it needs the Python package "
                              f"{requirement.split('==')[0]}, which is not installed "
                              f"(pip install {requirement}, as scripts/setup.sh does)")


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the Linear layers to quantize: all but the output head (kept in full precision,
    as transformers' quantizers keep it)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head]


def replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """Swap each quantizable Linear for `make(linear)`, in place."""
    for name in quantizable_linears(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(getattr(parent, child)))
    return model


@dataclass(frozen=True)
class NoQuantization:
    """Weights stay in model.dtype."""


register(Quantizer("none", devices=("cpu", "cuda"), shardable=True, compileable=True, package=None,
                   apply=lambda model, device: model), NoQuantization)
