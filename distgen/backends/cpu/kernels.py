"""generation.cpu_kernels: distgen's own CPU kernels (kernels/cpu_kernels.c), by name (`auto`, `distgen`, `torch`).

A CPU decode step multiplies a few rows by every weight of the model and reads every row's keys and
values: both stream memory, and torch's kernels spent it badly at decode shapes (8 layers/h512, one
thread, 16 rows: MKL's sgemm ran at a fifth of the FMA peak, 36 ms a step; the batched SDPA read the
longest row's width for every row).
- **Packed linear**: each eligible `nn.Linear` weight is re-laid in place into panels of 16 output
  features (no second copy of the weights) and computed by an AVX2 kernel: ~1.9x MKL at 16 rows,
  ~2.2x at 8, ~1.1x on 512-row prefills. Each output is one FMA chain in a fixed order, so a row's
  logits do not depend on which rows decode beside it. Not in sharded (lockstep) layouts, compiled
  steps (inductor has its own GEMMs), quantized models or under autocast.
- **Decode attention**: the slot cache's decode tokens (varlen.py) attend to exactly their own
  slot's columns, one pass over each key and value row.
- **Fused modules**: Llama-style RMSNorms in one pass; gated SiLU MLPs (gate and up into one buffer,
  silu(gate) * up in one pass); each checked against its module's own forward on a probe first.
- **Tied heads**: an lm_head sharing its weight with the input embedding is packed too; the embedding
  then gathers its rows from the packed table (`packed_embedding`), so no second copy.
- **An owned decoder stack** (cpu_model.py): a Llama-style model's layers run distgen's forward over
  these kernels (rotary embedding by a kernel, residual adds in the GEMMs' stores), a decode-only step
  as one C call (`decode_stack`).
The kernels are built once with the C compiler (`$CC`, else `cc`/`gcc`) into `$DISTGEN_KERNEL_CACHE`
(default ~/.cache/distgen/kernels), a second or so; `auto` falls back to torch's, saying why, where they
cannot run (no compiler, no AVX2, not fp32 on CPU); `distgen` makes that a config error.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from distgen.common.errors import ConfigError
from distgen.common.registry import Registry

SOURCE = Path(__file__).parent / "cpu_kernels.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
# Output features per panel (the kernel's two AVX2 vectors); a layer whose out_features is not a
# multiple keeps torch's linear.
PANEL = 16


@dataclass(frozen=True)
class KernelPlan:
    enabled: bool
    reason: str


def cache_dir() -> Path:
    return Path(os.environ.get("DISTGEN_KERNEL_CACHE") or Path.home() / ".cache" / "distgen" / "kernels")


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")


def cpu_blocker() -> Optional[str]:
    """Why this CPU cannot run the kernel (it needs x86-64 with AVX2 and FMA), or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, the kernel is x86-64 AVX2"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU has no AVX2 (torch reports {capability})"
    return None


@functools.cache
def load_kernel() -> tuple[Optional[ctypes.CDLL], str]:
    """(the built kernel, "") or (None, why not). Built once per source, flags and compiler into cache_dir()."""
    blocker = cpu_blocker()
    if blocker:
        return None, blocker
    cc = compiler()
    if cc is None:
        return None, "no C compiler to build the kernel: set CC or install gcc"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((cc,) + FLAGS).encode()).hexdigest()[:16]
    built = cache_dir() / f"cpu_kernels-{key}.so"
    try:
        if not built.exists():
            built.parent.mkdir(parents=True, exist_ok=True)
            # Ranks build at once on a shared cache: each writes its own file, the rename is atomic.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=built.parent)
            os.close(fd)
            result = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if result.returncode != 0:
                os.unlink(tmp)
                return None, f"{cc} could not build {SOURCE.name}: {result.stderr.strip()[-300:]}"
            os.replace(tmp, built)
        lib = ctypes.CDLL(str(built))
    except OSError as error:
        return None, f"the kernels could not be built or loaded in {built.parent} ({error}; set DISTGEN_KERNEL_CACHE)"
    lib.packed_linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_int64, ctypes.c_int]
    lib.packed_linear.restype = None
    lib.decode_attention.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 + \
        [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int]
    lib.write_kv.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 2 + \
        [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
    lib.write_kv.restype = None
    lib.decode_attention.restype = None
    lib.rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float]
    lib.silu_mul.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    lib.rms_norm.restype = lib.silu_mul.restype = None
    lib.rotary.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2 + [ctypes.c_int64]
    lib.rotary.restype = None
    lib.decode_stack.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + \
        [ctypes.c_float] + [ctypes.c_int64] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + \
        [ctypes.c_int]
    lib.decode_stack.restype = None
    lib.packed_embedding.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.packed_embedding.restype = None
    return lib, ""


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> the same shape holding panels [N/16][K][16] (feature p*16+j, input k at (p, k, j))."""
    n, k = weight.shape
    return weight.view(n // PANEL, PANEL, k).transpose(1, 2).contiguous().view(n, k)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    n, k = packed.shape
    return packed.view(n // PANEL, k, PANEL).transpose(1, 2).contiguous().view(n, k)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  out: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ W^T + b with `weight` as `pack` left it; into `out` (rows, N) when given (its rows may be strided,
    e.g. one half of a wider buffer); plus `residual` (x's shape but N wide) when given, rounded as
    `residual + linear(x)` is."""
    lib, why = load_kernel()
    if lib is None:
        raise RuntimeError(f"distgen's packed CPU linear is not available: {why}")
    n, k = weight.shape
    if n % PANEL:
        raise ValueError(f"a packed weight has a multiple of {PANEL} output features, this one {n}")
    if x.dtype != torch.float32 or x.device.type != "cpu" or weight.dtype != torch.float32 \
            or (bias is not None and bias.dtype != torch.float32):
        raise RuntimeError(f"distgen's packed CPU linear takes fp32 CPU input and weights, got {x.dtype} on "
                           f"{x.device}, weight {weight.dtype}")
    rows = x.reshape(-1, k).contiguous()
    if out is None:
        result = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
        out = result.view(-1, n)
    else:
        result = out
        if out.shape != (rows.shape[0], n) or out.dtype != torch.float32 or out.stride(1) != 1:
            raise ValueError(f"out must be fp32 ({rows.shape[0]}, {n}) with contiguous rows, got {out.dtype} "
                             f"{tuple(out.shape)} strides {out.stride()}")
    if residual is not None:
        residual = residual.reshape(-1, n)
        if residual.shape != out.shape or residual.dtype != torch.float32 or residual.stride(1) != 1:
            raise ValueError(f"residual must be fp32 {tuple(out.shape)} with contiguous rows, got {residual.dtype} "
                             f"{tuple(residual.shape)} strides {residual.stride()}")
    if rows.shape[0]:
        lib.packed_linear(rows.data_ptr(), k, weight.data_ptr(), None if bias is None else bias.data_ptr(),
                          out.data_ptr(), out.stride(0), None if residual is None else residual.data_ptr(),
                          0 if residual is None else residual.stride(0), rows.shape[0], n, k, torch.get_num_threads())
    return result


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place: x (tokens, heads, head_dim; rows may be strided, heads contiguous) <- transformers'
    `x * cos + rotate_half(x) * sin`, bit for bit; cos/sin (tokens, head_dim)."""
    tokens, heads, dim = x.shape
    if {x.dtype, cos.dtype, sin.dtype} != {torch.float32} or x.stride(2) != 1 or x.stride(1) != dim \
            or cos.shape != (tokens, dim) or sin.shape != cos.shape or dim % 2:
        raise ValueError(f"rotary takes fp32 x (tokens, heads, head_dim) with contiguous heads and cos/sin "
                         f"(tokens, head_dim), got x {x.dtype} {tuple(x.shape)} strides {x.stride()}, cos "
                         f"{cos.dtype} {tuple(cos.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    load_kernel()[0].rotary(x.data_ptr(), x.stride(0), tokens, heads, dim, cos.data_ptr(), sin.data_ptr(), dim)


def decode_attention_blocker(device: torch.device, dtype: torch.dtype, name: str, autocast: str = "none") -> Optional[str]:
    """Why the slot cache's decode tokens keep SDPA (generation.cpu_kernels=`name`, the weights' `dtype`,
    generation.autocast=`autocast`), or None: the kernels read and write fp32 only."""
    if name == "torch" or device.type != "cpu":
        return "generation.cpu_kernels=torch" if name == "torch" else f"the cache is on {device.type}"
    if dtype != torch.float32 or autocast != "none":
        return f"the cache is not fp32 (weights {dtype}, generation.autocast={autocast})"
    return load_kernel()[1] or None


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     scale: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """query (n, heads, head_dim) (any strides); keys/values (slots, kv_heads, columns, head_dim) slot
    buffers; slot i's query attends to its columns 0..lengths[i]-1 -> (n, heads, head_dim), into `out`
    when given (contiguous). SDPA where the kernel cannot."""
    n, heads, dim = query.shape
    lib = load_kernel()[0]
    if lib is None or dim % 8 or {query.dtype, keys.dtype, values.dtype} != {torch.float32} \
            or (out is not None and out.dtype != torch.float32) or lengths.dtype != torch.long \
            or query.stride(-1) != 1 or keys.stride(-1) != 1 or keys.stride() != values.stride():
        mask = torch.arange(keys.shape[2]) < lengths.unsqueeze(-1)  # (n, columns)
        result = F.scaled_dot_product_attention(query.unsqueeze(2), keys[:n], values[:n],
                                                attn_mask=mask[:, None, None], scale=scale,
                                                enable_gqa=heads != keys.shape[1]).squeeze(2)
        return result if out is None else out.copy_(result)
    lengths = lengths.contiguous()
    out = torch.empty((n, heads, dim), dtype=torch.float32) if out is None else out
    assert out.is_contiguous()
    lib.decode_attention(query.data_ptr(), query.stride(0), query.stride(1), keys.data_ptr(), values.data_ptr(),
                         keys.stride(0), keys.stride(1), keys.stride(2), lengths.data_ptr(), out.data_ptr(), n, heads,
                         keys.shape[1], dim, scale, torch.get_num_threads())
    return out


def write_kv(key: torch.Tensor, value: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
             cols: torch.Tensor) -> bool:
    """key/value (kv_heads, tokens, head_dim) -> keys/values[slots[t], :, cols[t]]; False (nothing written)
    where the kernel cannot (the caller indexes instead)."""
    lib = load_kernel()[0]
    if lib is None or {key.dtype, value.dtype, keys.dtype, values.dtype} != {torch.float32} \
            or key.stride() != value.stride() \
            or key.stride(-1) != 1 or keys.stride(-1) != 1 or keys.stride() != values.stride() \
            or slots.dtype != torch.long or cols.dtype != torch.long:
        return False
    slots, cols = slots.contiguous(), cols.contiguous()
    lib.write_kv(key.data_ptr(), value.data_ptr(), key.stride(1), key.stride(0), key.shape[1], key.shape[0],
                 key.shape[2], keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2),
                 slots.data_ptr(), cols.data_ptr())
    return True


def packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return packed_linear(x, self.weight, self.bias)


def packed_embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.embedding(ids, W) with `weight` as `pack` left it (a tied lm_head's weight, packed for its GEMM)."""
    vocab, width = weight.shape
    flat = ids.reshape(-1).contiguous()
    if flat.dtype != torch.long or weight.dtype != torch.float32:
        raise RuntimeError(f"a packed embedding takes int64 ids and an fp32 weight, got {flat.dtype}, {weight.dtype}")
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab):
        raise IndexError(f"token ids must lie in [0, {vocab}), got {int(flat.min())}..{int(flat.max())}")
    out = torch.empty((*ids.shape, width), dtype=torch.float32)
    load_kernel()[0].packed_embedding(flat.data_ptr(), flat.numel(), weight.data_ptr(), width, out.data_ptr())
    return out


def packed_embedding_forward(self: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    return packed_embedding(ids, self.weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama-style RMSNorm (`weight * (x * rsqrt(mean(x^2) + eps))`) in one pass."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty_like(rows)
    load_kernel()[0].rms_norm(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0], rows.shape[1], eps)
    return out.view(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2I) [gate | up] -> (..., I) silu(gate) * up."""
    half = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * half).contiguous()
    out = torch.empty((rows.shape[0], half), dtype=torch.float32)
    load_kernel()[0].silu_mul(rows.data_ptr(), out.data_ptr(), rows.shape[0], half)
    return out.view(*gate_up.shape[:-1], half)


def rms_norm_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or self.weight.dtype != torch.float32:
        return type(self).forward(self, x)
    return rms_norm(x, self.weight, self._distgen_eps)


def gate_up(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(..., 2I): [x @ gate^T | x @ up^T] in one buffer (two packed GEMMs, each writing its half of the rows)."""
    n = gate.shape[0]
    out = torch.empty((*x.shape[:-1], 2 * n), dtype=torch.float32)
    rows = out.view(-1, 2 * n)
    packed_linear(x, gate, None, out=rows[:, :n])
    packed_linear(x, up, None, out=rows[:, n:])
    return out


def gated_activation(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) of a fused gated MLP (what its down projection reads)."""
    return silu_mul(gate_up(x, mlp.gate_proj.weight, mlp.up_proj.weight))


def gated_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or self.gate_proj.weight.dtype != torch.float32:
        return type(self).forward(self, x)
    return self.down_proj(gated_activation(self, x))


def is_silu(act: torch.nn.Module) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


@torch.no_grad()
def agrees(module: torch.nn.Module, width: int) -> bool:
    """Does the module's fused forward (already set) match its class's own on a random probe? A model
    whose norm or MLP computes something else (e.g. `(1 + weight)`) keeps its own forward."""
    probe = torch.randn(3, width, generator=torch.Generator().manual_seed(0))
    return torch.allclose(module.forward(probe), type(module).forward(module, probe), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def fuse_modules(model: torch.nn.Module) -> int:
    """Llama-style RMSNorms run as one kernel; gated SiLU MLPs whose gate and up projections are packed
    write both projections into one buffer and run silu(gate) * up as one kernel. Each fused module is
    checked against its own forward first; (fused)."""
    fused = 0
    for module in model.modules():
        if getattr(module, "_distgen_fused", False):
            fused += 1
            continue
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1 \
                and weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.is_contiguous() \
                and isinstance(eps, float) and not hasattr(module, "_hf_hook"):
            module._distgen_eps = eps
            module.forward = types.MethodType(rms_norm_forward, module)
            candidate = weight.shape[0]
        elif all(is_packed(getattr(module, name, None)) and getattr(module, name).bias is None
                 for name in ("gate_proj", "up_proj")) and isinstance(getattr(module, "down_proj", None),
                                                                      torch.nn.Linear) \
                and is_silu(getattr(module, "act_fn", None)) \
                and module.gate_proj.weight.shape == module.up_proj.weight.shape:
            module.forward = types.MethodType(gated_mlp_forward, module)
            candidate = module.gate_proj.weight.shape[1]
        else:
            continue
        if agrees(module, candidate):
            module._distgen_fused = True
            fused += 1
        else:
            del module.forward
    return fused


def unfuse_modules(model: torch.nn.Module) -> None:
    for module in model.modules():
        if getattr(module, "_distgen_fused", False):
            del module.forward
            module._distgen_fused = False


def tied_embeddings(model: torch.nn.Module, shared: Counter) -> dict[int, torch.nn.Embedding]:
    """weight address -> the plain nn.Embedding sharing it with one linear layer (a tied lm_head): packing
    that linear packs the embedding's table too, which then gathers its rows from the packed layout.
    `shared`: how many parameters each address holds (pack_linears counts them)."""
    linears = Counter(m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {m.weight.data_ptr(): m for m in model.modules()
            if type(m) is torch.nn.Embedding and m.max_norm is None and shared[m.weight.data_ptr()] == 2
            and linears[m.weight.data_ptr()] == 1 and not hasattr(m, "_hf_hook")}


def module_blocker(module: torch.nn.Module, shared: Counter, tied: Optional[dict] = None) -> Optional[str]:
    """Why this module keeps torch's linear, or None. `tied`: tied_embeddings(model, shared)."""
    if type(module) is not torch.nn.Linear:
        return "not a plain nn.Linear"
    weight, bias = module.weight, module.bias
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not weight.is_contiguous():
        return "not a contiguous fp32 CPU weight"
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return "not an fp32 bias"
    if weight.shape[0] % PANEL:
        return f"out_features {weight.shape[0]} is not a multiple of {PANEL}"
    if shared[weight.data_ptr()] > 1 and weight.data_ptr() not in (tied or {}):
        return "its weight is shared (tied) with something other than one embedding"
    if hasattr(module, "_hf_hook"):
        return "accelerate hooks place its weight"
    return None


def is_packed(module: torch.nn.Module) -> bool:
    return getattr(module, "_distgen_packed", False)


@torch.no_grad()
def pack_linears(model: torch.nn.Module) -> tuple[int, int]:
    """Pack every eligible linear layer in place (idempotent); (packed, linear layers)."""
    shared = Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    tied = tied_embeddings(model, shared)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for module in linears:
        if not is_packed(module) and module_blocker(module, shared, tied) is None:
            module.weight.data.copy_(pack(module.weight.data))
            module.forward = types.MethodType(packed_forward, module)
            module._distgen_packed = True
            embedding = tied.get(module.weight.data_ptr())
            if embedding is not None:
                embedding.forward = types.MethodType(packed_embedding_forward, embedding)
                embedding._distgen_packed_rows = True
    return sum(is_packed(m) for m in linears), len(linears)


@torch.no_grad()
def unpack_linears(model: torch.nn.Module) -> None:
    """Undo `pack_linears`: torch's linear over the original layout."""
    for module in model.modules():
        if getattr(module, "_distgen_packed_rows", False):  # a tied embedding: its linear unpacks the table
            del module.forward
            module._distgen_packed_rows = False
    for module in model.modules():
        if is_packed(module):
            module.weight.data.copy_(unpack(module.weight.data))
            del module.forward
            module._distgen_packed = False


def model_blocker(model: torch.nn.Module, device: torch.device, lockstep: bool, compiling: bool,
                  autocast: Optional[torch.dtype]) -> Optional[str]:
    """Why this model's linear layers and norms/MLPs keep torch's kernels in this engine, or None."""
    if device.type != "cpu":
        return f"the model runs on {device.type}"
    if lockstep:
        return "a lockstep (sharded) layout owns the weights"
    if compiling:
        return "the compiled step has its own GEMMs"
    if getattr(model, "hf_quantizer", None) is not None:
        return "the weights are quantized"
    placed = {str(place) for place in (getattr(model, "hf_device_map", None) or {}).values()}
    if placed - {"cpu"}:
        return f"accelerate places the weights (device_map over {', '.join(sorted(placed))})"
    if autocast is not None:
        return "the forwards autocast"
    return load_kernel()[1] or None


# A generation.cpu_kernels policy: (model, device, lockstep, compiling, autocast dtype) -> the plan.
KernelPolicy = Callable[[torch.nn.Module, torch.device, bool, bool, Optional[torch.dtype]], KernelPlan]


def kernels_auto(model: torch.nn.Module, device: torch.device, lockstep: bool, compiling: bool,
                autocast: Optional[torch.dtype]) -> KernelPlan:
    """distgen's CPU kernels where they can run (CPU, fp32; the linear not sharded or compiled), else torch's."""
    blocker = model_blocker(model, device, lockstep, compiling, autocast)
    if blocker:
        return KernelPlan(False, f"torch kernels ({blocker})" if device.type == "cpu" else "")
    return KernelPlan(True, "distgen CPU kernels")


def kernels_distgen(model: torch.nn.Module, device: torch.device, lockstep: bool, compiling: bool,
                  autocast: Optional[torch.dtype]) -> KernelPlan:
    """distgen's CPU kernels (a config error where they cannot run)."""
    blocker = model_blocker(model, device, lockstep, compiling, autocast)
    if blocker:
        raise ConfigError(f"generation.cpu_kernels=distgen is not possible: {blocker}; use generation.cpu_kernels=auto "
                          "or torch")
    return KernelPlan(True, "distgen CPU kernels (generation.cpu_kernels=distgen)")


def kernels_torch(model: torch.nn.Module, device: torch.device, lockstep: bool, compiling: bool,
                 autocast: Optional[torch.dtype]) -> KernelPlan:
    """torch's kernels (MKL/oneDNN GEMMs, SDPA)."""
    return KernelPlan(False, "torch kernels (generation.cpu_kernels=torch)" if device.type == "cpu" else "")


# generation.cpu_kernels's names (the config check and --help read them).
CPU_KERNELS: Registry[KernelPolicy] = Registry("generation.cpu_kernels", valued=True)
CPU_KERNELS.register("auto", None, kernels_auto)
CPU_KERNELS.register("distgen", None, kernels_distgen)
CPU_KERNELS.register("torch", None, kernels_torch)


def plan_kernels(name: str, model: torch.nn.Module, device: torch.device, lockstep: bool, compiling: bool,
                autocast: Optional[torch.dtype]) -> KernelPlan:
    return CPU_KERNELS.get(name)(model, device, lockstep, compiling, autocast)


def apply_kernels(plan: KernelPlan, model: torch.nn.Module) -> str:
    """Pack or unpack the model's linear layers as the plan says; what the engine line adds."""
    from distgen.backends.cpu.model import own_stack, release_stack  # it builds on this module
    if not plan.enabled:
        release_stack(model)
        unfuse_modules(model)
        unpack_linears(model)
        return plan.reason
    packed, total = pack_linears(model)
    fused = fuse_modules(model)
    return f"{plan.reason}: {packed} of {total} linear layers packed in place, {fused} norms/MLPs fused, " \
        f"{own_stack(model)}"
