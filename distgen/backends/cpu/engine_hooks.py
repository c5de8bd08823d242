"""What distgen's CPU backend plugs into the engine's seams (imported by distgen/backends/cpu/__init__.py):
- the slot attention `cpu_kernels` (engine/kv/attention.py's table): the decode tokens read exactly their own
  slot's columns through `kernels.decode_attention`, new keys/values are written by `kernels.write_kv`, prompt
  segments run the engine's SDPA; the owned decoder stack (model.py) may take the whole forward;
- the kernel backend `cpu` (engine/kernels.py): generation.cpu_kernels packs and fuses the model's modules, and
  says whether rows are batch-invariant (model.arithmetic: the owned stack runs the forwards).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from distgen.backends.cpu.kernels import decode_attention, decode_attention_blocker, plan_kernels, write_kv
from distgen.backends.cpu.model import apply_kernels, arithmetic
from distgen.config import GenerationConfig
from distgen.engine.kernels import KERNEL_BACKENDS, KernelBackend
from distgen.engine.kv.attention import AttentionContext, SlotAttention, new_out, register, require_plain, \
    segments_into, softcap_blocker, write_columns
from distgen.engine.kv.varlen import AttentionPlan


def write(plan: AttentionPlan, layer: Any, key: torch.Tensor, value: torch.Tensor) -> None:
    if not write_kv(key[0], value[0], layer.keys, layer.values, plan.write_slots, plan.write_cols):
        write_columns(plan, layer, key, value)


def attend(plan: AttentionPlan, layer: Any, query: torch.Tensor, scale: float, window: Optional[int] = None,
           softcap: Optional[float] = None) -> torch.Tensor:
    require_plain("cpu_kernels", window, softcap, windows=False)
    out = new_out(query)
    n = plan.decode
    if n:
        decode_attention(query[0, :, :n].transpose(0, 1), layer.keys, layer.values, plan.decode_lengths, scale,
                         out=out[0, :n])
    return segments_into(out, plan, layer, query, scale)


def blocker(ctx: AttentionContext) -> Optional[str]:
    if ctx.window is not None:
        return f"a sliding window of {ctx.window} binds (the kernels read each slot's columns from 0)"
    return decode_attention_blocker(ctx.device, ctx.weights_dtype, ctx.cpu_kernels, ctx.autocast) \
        or softcap_blocker(ctx)


class CpuKernels:
    """distgen's CPU kernels: each decode token reads exactly its slot's columns; keys/values written by a kernel."""


register(SlotAttention("cpu_kernels", attend, blocker, "distgen's CPU kernel (each slot reads its own columns)",
                       write=write, decode_reads="lengths", owns_stack=True), CpuKernels)


def prepare(gen: GenerationConfig, model: torch.nn.Module, device: torch.device, lockstep: bool, compiling: bool,
            autocast: Optional[torch.dtype]) -> str:
    """generation.cpu_kernels: pack, fuse and own what can run on the kernels; what the engine line says."""
    return apply_kernels(plan_kernels(gen.cpu_kernels, model, device, lockstep, compiling, autocast), model)


def batch_invariant(model: torch.nn.Module) -> bool:
    """Rows are batch-invariant where distgen's owned stack runs the forwards (model.arithmetic)."""
    return arithmetic(model).batch_invariant


KERNEL_BACKENDS.register("cpu", None, KernelBackend("cpu", prepare, batch_invariant))
