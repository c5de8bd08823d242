"""bitsandbytes 8-bit (LLM.int8) and 4-bit (NF4) weights. CUDA kernels, and since bitsandbytes
0.45 a CPU backend (used here when device=cpu). A bitsandbytes parameter quantizes itself when
it is first moved to a device, so `apply` swaps the Linear layers and moves them to the rank's
device. FSDP cannot shard these parameters (their shape and quantization state are not
shardable tensors): only layouts that keep tensors whole."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from distgen.models.quantizers.base import Quantizer, register, replace_linears

PACKAGE = ("bitsandbytes", "bitsandbytes==0.50.2")


@dataclass(frozen=True)
class Bnb8bit:
    """bitsandbytes LLM.int8 weights (outlier columns above `threshold` kept in 16 bits)."""
    threshold: float = 6.0


@dataclass(frozen=True)
class Bnb4bit:
    """bitsandbytes 4-bit NF4 weights with double-quantized scales, compute in the model dtype."""
    quant_type: str = "nf4"
    double_quant: bool = True


def apply_8bit(model: nn.Module, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    settings = Bnb8bit()
    # On CPU LLM.int8 casts fp32 inputs to fp16 and says so on every call.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")

    def make(linear: nn.Linear) -> nn.Module:
        with torch.device("meta"):
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                        has_fp16_weights=False, threshold=settings.threshold)
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
        layer.bias = linear.bias
        return layer.to(device)  # quantizes the weight

    return replace_linears(model, make)


def apply_4bit(model: nn.Module, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    settings = Bnb4bit()

    def make(linear: nn.Linear) -> nn.Module:
        with torch.device("meta"):
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=linear.weight.dtype, quant_type=settings.quant_type,
                                      compress_statistics=settings.double_quant)
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type=settings.quant_type,
                                         compress_statistics=settings.double_quant)
        layer.bias = linear.bias
        return layer.to(device)  # quantizes the weight

    return replace_linears(model, make)


register(Quantizer("bnb_8bit", devices=("cpu", "cuda"), shardable=False, compileable=False, package=PACKAGE,
                   apply=apply_8bit), Bnb8bit)
register(Quantizer("bnb_4bit", devices=("cpu", "cuda"), shardable=False, compileable=False, package=PACKAGE,
                   apply=apply_4bit), Bnb4bit)
