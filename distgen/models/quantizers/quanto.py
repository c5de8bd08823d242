"""optimum-quanto int8 / int4 weights (activations stay in the model dtype), quantized and frozen
in place. Its weights are tensor subclasses FSDP cannot shard: only layouts that keep tensors whole.
On CPU, int4 unpacks with a C++ extension quanto compiles on first use (once per install)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distgen.models.quantizers.base import Quantizer, quantizable_linears, register

PACKAGE = ("optimum.quanto", "optimum-quanto==0.2.7")


@dataclass(frozen=True)
class QuantoInt8:
    """optimum-quanto int8 weights, per output channel."""
    weights: str = "qint8"


@dataclass(frozen=True)
class QuantoInt4:
    """optimum-quanto int4 weights, grouped scales along the input (quanto's default group size)."""
    weights: str = "qint4"


def quantizer(weights: str):
    def apply(model: nn.Module, device: torch.device) -> nn.Module:
        import optimum.quanto as quanto

        keep = set(quantizable_linears(model))
        head = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in keep]
        quanto.quantize(model, weights=getattr(quanto, weights), exclude=head)
        quanto.freeze(model)  # the float weights are replaced by their quantized form now
        return model
    return apply


register(Quantizer("quanto_int8", devices=("cpu", "cuda"), shardable=False, compileable=False, package=PACKAGE,
                   apply=quantizer("qint8")), QuantoInt8)
register(Quantizer("quanto_int4", devices=("cpu", "cuda"), shardable=False, compileable=False, package=PACKAGE,
                   apply=quantizer("qint4")), QuantoInt4)
