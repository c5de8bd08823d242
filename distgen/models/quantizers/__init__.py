"""Quantized weights: how the loaded model's Linear layers are replaced by quantized ones. One module
per backend, each registering its quantizers (and what they can be combined with) in QUANTIZERS."""
from distgen.models.quantizers.base import QUANTIZERS, Quantizer, check_quantization, get_quantizer
# Registration order is the order users see (none first).
from distgen.models.quantizers import torch_dynamic, bnb, quanto  # noqa: F401,E402,I001  (each registers itself)

__all__ = ["QUANTIZERS", "Quantizer", "check_quantization", "get_quantizer"]
