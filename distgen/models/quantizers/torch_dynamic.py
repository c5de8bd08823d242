"""PyTorch's dynamic int8 Linear (fbgemm/qnnpack kernels): int8 weights, activations quantized per
batch at run time. CPU only. Its Linear modules hold packed weights, not Parameters, so neither
FSDP nor accelerate's offload can move them: replicate and device_map on CPU only."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from distgen.models.quantizers.base import Quantizer, quantizable_linears, register


@dataclass(frozen=True)
class Int8Dynamic:
    """torch dynamic int8 Linear layers (CPU only; fp32 activations)."""
    # Weights are quantized symmetrically per tensor by torch's default dynamic qconfig.
    weight_dtype: str = "qint8"


def apply(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    spec = {name: default_dynamic_qconfig for name in quantizable_linears(model)}
    with warnings.catch_warnings():  # torch.ao.quantization warns that it moves to torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


register(Quantizer("int8_dynamic", devices=("cpu",), shardable=False, compileable=False,
                   package=None, apply=apply, dtypes=("auto", "fp32")), Int8Dynamic)
