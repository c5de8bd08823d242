"""generation.cpu_kernels: distgen's own CPU kernels (cpu_kernels.c), by name (`auto`, `distgen`, `torch`).

A CPU decode step multiplies a few rows by every weight of the model and reads every row's keys and
values: both stream memory, and torch's kernels spent it badly at decode shapes (8 layers/h512, one
thread, 16 rows: MKL's sgemm ran at a fifth of the FMA peak, 36 ms a step; the batched SDPA read the
longest row's width for every row).
- **Packed linear**: each eligible `nn.Linear` becomes a `PackedLinear` holding the same weight, re-laid
  in place into panels of 16 output features (no second copy): ~1.9x MKL at 16 rows, ~2.2x at 8, ~1.1x
  on 512-row prefills. Each output is one FMA chain in a fixed order, so a row's logits do not depend on
  which rows share its forward (MKL's do: it picks its kernel by the row count). Not in sharded
  (lockstep) layouts, compiled steps (inductor has its own GEMMs), quantized models or under autocast.
- **Slot attention**: each token of a slot-cache forward attends to exactly its own slot's columns, one
  pass over each key and value row (`decode_attention` for the engine's decode tokens).
- **Fused modules**: Llama-style RMSNorms become `FusedRMSNorm` (one pass), gated SiLU MLPs
  `FusedGatedMLP` (gate and up into one buffer, silu(gate) * up in one pass); each is checked against
  the module it replaces on a probe first.
- **Tied heads**: an lm_head sharing its weight with the input embedding is packed too; the embedding
  becomes a `PackedRowsEmbedding` gathering its rows from the packed table, so no second copy.
- **An owned decoder stack** (model.py): a Llama-style model's decoder runs as one C call per forward.
Modules are swapped in (same parameters under the same names, so state dicts and ties are unchanged) and
swapped back out by `apply_kernels` (model.py, which swaps the stack in last) with a plan that is off.

The C boundary: every wrapper here checks its tensors' dtypes, devices, shapes and strides before a
pointer goes to C and raises a ValueError naming the argument; slots, columns, lengths and token ids are
checked by the C code before it writes anything, and an IndexError names the bad entry. No `assert`.

The kernels are built once with the C compiler (`$CC`, else `cc`/`gcc`, plus `$DISTGEN_KERNEL_CFLAGS`)
from the package's cpu_kernels.c into `$DISTGEN_KERNEL_CACHE` (default ~/.cache/distgen/kernels), a
second or so; `auto` falls back to torch's, saying why, where they cannot run (no compiler, no AVX2, a
cache folder that cannot be written, not fp32 on CPU); `distgen` makes that a config error.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from distgen.common.errors import ConfigError
from distgen.common.files import atomic_path
from distgen.common.registry import Registry

SOURCE = Path(__file__).parent / "cpu_kernels.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
# Output features per panel (the kernel's two AVX2 vectors); the out_features % 16 left over form one
# narrow panel at the end.
PANEL = 16
# What a C kernel's error code says was out of range (cpu_kernels.c's DG_* codes).
ERRORS = {1: "slot", 2: "column", 3: "length", 4: "token id"}


@dataclass(frozen=True)
class KernelPlan:
    enabled: bool
    reason: str


# ---------------------------------------------------------------------------------------------------
# Build and load

def cache_dir() -> Path:
    return Path(os.environ.get("DISTGEN_KERNEL_CACHE") or Path.home() / ".cache" / "distgen" / "kernels")


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")


def build_flags() -> tuple[str, ...]:
    """FLAGS plus $DISTGEN_KERNEL_CFLAGS (e.g. `-fsanitize=address,undefined` for the sanitizer test)."""
    return FLAGS + tuple(shlex.split(os.environ.get("DISTGEN_KERNEL_CFLAGS", "")))


def cpu_blocker() -> Optional[str]:
    """Why this CPU cannot run the kernel (it needs x86-64 with AVX2 and FMA), or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, the kernel is x86-64 AVX2"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU has no AVX2 (torch reports {capability})"
    return None


class BuildFailed(Exception):
    """The compiler refused the source: what it said (the half-built file is not kept)."""


def build(cc: str, flags: tuple[str, ...], built: Path) -> Optional[str]:
    """Compile SOURCE into `built` (atomically: ranks may build at once on a shared cache); None, or why not."""
    try:
        with atomic_path(built, suffix=".so") as tmp:
            try:
                result = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
            except OSError as error:
                raise BuildFailed(f"{cc} could not run ({error.strerror})") from None
            if result.returncode != 0:
                raise BuildFailed(f"{cc} could not build {SOURCE.name} (exit {result.returncode}): "
                                  f"{result.stderr.strip()[-300:]}")
    except BuildFailed as failed:
        return str(failed)
    except OSError as error:
        return f"the kernel cache {built.parent} cannot be written ({error.strerror}; set DISTGEN_KERNEL_CACHE)"
    return None


def build_key(cc: str, flags: tuple[str, ...]) -> str:
    """What the built kernels' arithmetic follows from: the source, the compiler and its flags."""
    return hashlib.sha256(SOURCE.read_bytes() + " ".join((cc,) + flags).encode()).hexdigest()[:16]


@functools.cache
def load_kernel() -> tuple[Optional[ctypes.CDLL], str]:
    """(the built kernel, "") or (None, why not). Built once per source, flags and compiler into cache_dir()."""
    blocker = cpu_blocker()
    if blocker:
        return None, blocker
    cc = compiler()
    if cc is None:
        return None, "no C compiler to build the kernel: set CC or install gcc"
    if not SOURCE.is_file():
        return None, f"the kernel source {SOURCE} is missing from the installed package"
    flags = build_flags()
    built = cache_dir() / f"cpu_kernels-{build_key(cc, flags)}.so"
    if not built.exists():
        why = build(cc, flags, built)
        if why:
            return None, why
    try:
        lib = ctypes.CDLL(str(built))
    except OSError as error:
        return None, f"the built kernels {built} could not be loaded ({error})"
    declare(lib)
    return lib, ""


def declare(lib: ctypes.CDLL) -> None:
    """The C functions' argument and result types (cpu_kernels.c's signatures)."""
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    signatures = {
        "packed_linear": ([ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32], None),
        "attention_scratch": ([i64] * 4, i64),
        "slot_attention": ([ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, ptr, i64, i64, ptr, i64, i64, i64, i64,
                            f32, ptr, i32, ptr], i32),
        "write_kv": ([ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, i64, i64, ptr, ptr, i64, i64, ptr], i32),
        "rms_norm": ([ptr, ptr, ptr, i64, i64, f32], None),
        "silu_mul": ([ptr, ptr, i64, i64], None),
        "rotary": ([ptr, i64, i64, i64, i64, ptr, ptr, i64], None),
        "stack_scratch": ([i64] * 7 + [i32], i64),
        "llama_stack": ([ptr, ptr, i64, i64, i64, ptr, ptr, ptr, f32, i64, i64, i64, i64, f32, ptr, ptr, ptr, ptr,
                         ptr, i64, i64, i64, i64, i64, ptr, i32, ptr], i32),
        "packed_embedding": ([ptr, i64, ptr, i64, i64, ptr, ptr], i32),
    }
    for name, (args, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result


def kernel() -> ctypes.CDLL:
    """The loaded kernels; a RuntimeError saying why where they cannot run."""
    lib, why = load_kernel()
    if lib is None:
        raise RuntimeError(f"distgen's CPU kernels are not available: {why}")
    return lib


def checked(name: str, call: Callable[[ctypes.Array], int]) -> None:
    """Run a C kernel that checks its indexes; an IndexError naming the first bad one."""
    info = (ctypes.c_int64 * 3)()
    code = call(info)
    if code:
        index, value, bound = info
        raise IndexError(f"{name}: entry {index}'s {ERRORS.get(code, f'value (error {code})')} is {value}, "
                         f"outside [0, {bound})")


# ---------------------------------------------------------------------------------------------------
# Checks at the boundary (ValueError naming the argument)

def require(ok: bool, name: str, what: str, tensor: torch.Tensor) -> None:
    if not ok:
        raise ValueError(f"{name} must be {what}, got {tensor.dtype} {tuple(tensor.shape)} strides "
                         f"{tensor.stride()} on {tensor.device}")


def require_fp32(name: str, tensor: torch.Tensor, shape: Optional[tuple] = None, contiguous: bool = False) -> None:
    """fp32 on the CPU, of `shape` where given (None entries: any size), contiguous where asked."""
    ok = tensor.dtype == torch.float32 and tensor.device.type == "cpu" \
        and (shape is None or (tensor.dim() == len(shape)
                               and all(want is None or want == got for want, got in zip(shape, tensor.shape)))) \
        and (not contiguous or tensor.is_contiguous())
    require(ok, name, f"fp32 on the CPU{f' shaped {shape}' if shape else ''}{', contiguous' if contiguous else ''}",
            tensor)


def require_indexes(name: str, tensor: torch.Tensor, count: int) -> torch.Tensor:
    """A contiguous int64 CPU vector of `count` entries (the C code checks their range)."""
    require(tensor.dtype == torch.long and tensor.device.type == "cpu" and tensor.shape == (count,), name,
            f"int64 on the CPU shaped ({count},)", tensor)
    return tensor.contiguous()


def extent(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses a strided tensor can touch."""
    if tensor.numel() == 0:
        return tensor.data_ptr(), tensor.data_ptr()
    span = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())) + 1
    return tensor.data_ptr(), tensor.data_ptr() + span * tensor.element_size()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = extent(a), extent(b)
    return a0 < b1 and b0 < a1


# ---------------------------------------------------------------------------------------------------
# Kernels

def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> the same shape holding panels [N/16][K][16] (feature p*16+j, input k at (p, k, j)), then
    the last N % 16 features as one narrow panel [K][N % 16]."""
    n, k = weight.shape
    full = n - n % PANEL
    panels = weight[:full].reshape(full // PANEL, PANEL, k).transpose(1, 2).reshape(-1)
    return torch.cat([panels, weight[full:].t().reshape(-1)]).view(n, k)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    n, k = packed.shape
    full = n - n % PANEL
    flat = packed.reshape(-1)
    panels = flat[:full * k].view(full // PANEL, k, PANEL).transpose(1, 2).reshape(full, k)
    return torch.cat([panels, flat[full * k:].view(k, n - full).t()])


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  out: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ W^T + b with `weight` as `pack` left it; into `out` (rows, N) when given (its rows may be strided,
    e.g. one half of a wider buffer; it must not overlap x); plus `residual` (x's shape but N wide) when
    given, rounded as `residual + linear(x)` is."""
    lib = kernel()
    require_fp32("the packed weight", weight, (None, None), contiguous=True)
    n, k = weight.shape
    require_fp32("x", x, (None,) * (x.dim() - 1) + (k,))
    if bias is not None:
        require_fp32("bias", bias, (n,), contiguous=True)
    rows = x.reshape(-1, k).contiguous()
    if out is None:
        result = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
        out = result.view(-1, n)
    else:
        result = out
        require_fp32("out", out, (rows.shape[0], n))
        require(out.stride(1) == 1 and not overlaps(out, rows), "out", "rows of contiguous features apart from x",
                out)
    if residual is not None:
        require(residual.shape == (*x.shape[:-1], n), "residual", f"x's shape {n} wide ({(*x.shape[:-1], n)})",
                residual)
        residual = residual.reshape(-1, n)
        require_fp32("residual", residual, (rows.shape[0], n))
        same = residual.data_ptr() == out.data_ptr() and residual.stride() == out.stride()
        require(residual.stride(1) == 1 and (same or not overlaps(residual, out)), "residual",
                "rows of contiguous features, out itself or apart from it", residual)
    if rows.shape[0]:
        lib.packed_linear(rows.data_ptr(), k, weight.data_ptr(), None if bias is None else bias.data_ptr(),
                          out.data_ptr(), out.stride(0), None if residual is None else residual.data_ptr(),
                          0 if residual is None else residual.stride(0), rows.shape[0], n, k, torch.get_num_threads())
    return result


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place: x (tokens, heads, head_dim; rows may be strided, heads contiguous) <- transformers'
    `x * cos + rotate_half(x) * sin`, bit for bit; cos/sin (tokens, head_dim)."""
    lib = kernel()
    require(x.dim() == 3, "x", "(tokens, heads, head_dim)", x)
    tokens, heads, dim = x.shape
    if {x.dtype, cos.dtype, sin.dtype} != {torch.float32} or x.stride(2) != 1 or x.stride(1) != dim \
            or cos.shape != (tokens, dim) or sin.shape != cos.shape or dim % 2 \
            or {x.device.type, cos.device.type, sin.device.type} != {"cpu"}:
        raise ValueError(f"rotary takes fp32 CPU x (tokens, heads, head_dim) with contiguous heads and cos/sin "
                         f"(tokens, head_dim), got x {x.dtype} {tuple(x.shape)} strides {x.stride()}, cos "
                         f"{cos.dtype} {tuple(cos.shape)}, sin {sin.dtype} {tuple(sin.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    lib.rotary(x.data_ptr(), x.stride(0), tokens, heads, dim, cos.data_ptr(), sin.data_ptr(), dim)


def decode_attention_blocker(device: torch.device, dtype: torch.dtype, name: str, autocast: str = "none") -> Optional[str]:
    """Why the slot cache's decode tokens keep SDPA (generation.cpu_kernels=`name`, the weights' `dtype`,
    generation.autocast=`autocast`), or None: the kernels read and write fp32 only."""
    if name == "torch" or device.type != "cpu":
        return "generation.cpu_kernels=torch" if name == "torch" else f"the cache is on {device.type}"
    if dtype != torch.float32 or autocast != "none":
        return f"the cache is not fp32 (weights {dtype}, generation.autocast={autocast})"
    return load_kernel()[1] or None


def check_slot_buffers(keys: torch.Tensor, values: torch.Tensor) -> None:
    """keys/values: fp32 CPU (slots, kv_heads, columns, head_dim) buffers of one layout."""
    require_fp32("keys", keys, (None,) * 4)
    require(values.shape == keys.shape and values.stride() == keys.stride() and values.dtype == keys.dtype
            and values.device == keys.device, "values", f"laid out as keys ({tuple(keys.shape)} strides "
            f"{keys.stride()})", values)
    require(keys.stride(-1) == 1, "keys", "head_dim-contiguous", keys)


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     scale: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """query (n, heads, head_dim) (any strides); keys/values (slots, kv_heads, columns, head_dim) slot
    buffers; slot i's query attends to its columns 0..lengths[i]-1 -> (n, heads, head_dim), into `out`
    when given (contiguous). SDPA where the kernel cannot (not fp32, lengths not int64, strided rows)."""
    require(query.dim() == 3, "query", "(n, heads, head_dim)", query)
    n, heads, dim = query.shape
    lib = load_kernel()[0]
    if lib is None or {query.dtype, keys.dtype, values.dtype} != {torch.float32} \
            or (out is not None and out.dtype != torch.float32) or lengths.dtype != torch.long \
            or query.stride(-1) != 1 or keys.stride(-1) != 1 or keys.stride() != values.stride():
        mask = torch.arange(keys.shape[2]) < lengths.unsqueeze(-1)  # (n, columns)
        result = F.scaled_dot_product_attention(query.unsqueeze(2), keys[:n], values[:n],
                                                attn_mask=mask[:, None, None], scale=scale,
                                                enable_gqa=heads != keys.shape[1]).squeeze(2)
        return result if out is None else out.copy_(result)
    require_fp32("query", query)
    check_slot_buffers(keys, values)
    slots, kv_heads, columns, _ = keys.shape
    require(keys.shape[3] == dim and heads % kv_heads == 0, "keys", f"(slots, a divisor of {heads} heads, columns, "
            f"{dim})", keys)
    lengths = require_indexes("lengths", lengths, n)
    if out is None:
        out = torch.empty((n, heads, dim), dtype=torch.float32)
    require_fp32("out", out, (n, heads, dim), contiguous=True)
    require(not any(overlaps(out, t) for t in (query, keys, values)), "out", "apart from query, keys and values", out)
    threads = torch.get_num_threads()
    scratch = torch.empty(threads * lib.attention_scratch(heads, kv_heads, dim, columns), dtype=torch.float32)
    checked("decode_attention", lambda info: lib.slot_attention(
        query.data_ptr(), query.stride(0), query.stride(1), keys.data_ptr(), values.data_ptr(), keys.stride(0),
        keys.stride(1), keys.stride(2), None, lengths.data_ptr(), slots, columns, out.data_ptr(), n, heads, kv_heads,
        dim, scale, scratch.data_ptr(), threads, info))
    return out


def write_kv(key: torch.Tensor, value: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
             cols: torch.Tensor) -> bool:
    """key/value (kv_heads, tokens, head_dim) -> keys/values[slots[t], :, cols[t]]; False (nothing written)
    where the kernel cannot (not fp32, int64 indexes or matching strides: the caller indexes instead)."""
    lib = load_kernel()[0]
    if lib is None or {key.dtype, value.dtype, keys.dtype, values.dtype} != {torch.float32} \
            or key.stride() != value.stride() \
            or key.stride(-1) != 1 or keys.stride(-1) != 1 or keys.stride() != values.stride() \
            or slots.dtype != torch.long or cols.dtype != torch.long:
        return False
    check_slot_buffers(keys, values)
    require(key.dim() == 3, "key", "(kv_heads, tokens, head_dim)", key)
    kv_heads, tokens, dim = key.shape
    require_fp32("key", key, (keys.shape[1], None, keys.shape[3]))
    require(value.shape == key.shape and value.device == key.device, "value", f"shaped as key {tuple(key.shape)}",
            value)
    slots, cols = require_indexes("slots", slots, tokens), require_indexes("cols", cols, tokens)
    checked("write_kv", lambda info: lib.write_kv(
        key.data_ptr(), value.data_ptr(), key.stride(1), key.stride(0), tokens, kv_heads, dim, keys.data_ptr(),
        values.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2), slots.data_ptr(), cols.data_ptr(),
        keys.shape[0], keys.shape[2], info))
    return True


def packed_embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.embedding(ids, W) with `weight` as `pack` left it (a tied lm_head's weight, packed for its GEMM)."""
    lib = kernel()
    require_fp32("the packed weight", weight, (None, None), contiguous=True)
    vocab, width = weight.shape
    flat = require_indexes("ids", ids.reshape(-1), ids.numel())
    out = torch.empty((*ids.shape, width), dtype=torch.float32)
    checked("packed_embedding", lambda info: lib.packed_embedding(flat.data_ptr(), flat.numel(), weight.data_ptr(),
                                                                  vocab, width, out.data_ptr(), info))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama-style RMSNorm (`weight * (x * rsqrt(mean(x^2) + eps))`) in one pass."""
    lib = kernel()
    require_fp32("x", x)
    require(x.dim() > 0 and x.shape[-1] > 0, "x", "(..., hidden) with hidden > 0", x)
    require_fp32("the norm's weight", weight, (x.shape[-1],), contiguous=True)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty_like(rows)
    lib.rms_norm(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0], rows.shape[1], eps)
    return out.view(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2I) [gate | up] -> (..., I) silu(gate) * up."""
    lib = kernel()
    require_fp32("gate_up", gate_up)
    require(gate_up.dim() > 0 and gate_up.shape[-1] % 2 == 0, "gate_up", "(..., 2I)", gate_up)
    half = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * half).contiguous()
    out = torch.empty((rows.shape[0], half), dtype=torch.float32)
    lib.silu_mul(rows.data_ptr(), out.data_ptr(), rows.shape[0], half)
    return out.view(*gate_up.shape[:-1], half)


def gate_up(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(..., 2I): [x @ gate^T | x @ up^T] in one buffer (two packed GEMMs, each writing its half of the rows)."""
    n = gate.shape[0]
    out = torch.empty((*x.shape[:-1], 2 * n), dtype=torch.float32)
    rows = out.view(-1, 2 * n)
    packed_linear(x, gate, None, out=rows[:, :n])
    packed_linear(x, up, None, out=rows[:, n:])
    return out


# ---------------------------------------------------------------------------------------------------
# Modules swapped into a model: each holds the same parameters, under the same names, as the module it
# replaces (`replaced`, kept to swap back; a tuple so it is not registered as a child).

def swap(model: torch.nn.Module, replacements: dict[int, torch.nn.Module]) -> None:
    """Put replacements[id(module)] wherever that module sits in the model's module tree."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if id(child) in replacements:
                setattr(module, name, replacements[id(child)])


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Do two modules hold the very same parameters and buffers under the same names?"""
    def state(m):
        return {(name, id(t)) for name, t in [*m.named_parameters(remove_duplicate=False),
                                              *m.named_buffers(remove_duplicate=False)]}
    return state(a) == state(b)


def hooked(module: torch.nn.Module) -> bool:
    """Hooks run around this module's forward (accelerate's placement, or anyone's): it keeps its own."""
    return hasattr(module, "_hf_hook") or bool(module._forward_hooks or module._forward_pre_hooks)


class PackedLinear(torch.nn.Linear):
    """An nn.Linear over `pack`'s layout of its own weight (the replaced linear's Parameter, packed in place)."""

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)
        self.replaced = (linear,)
        self.train(linear.training)
        with torch.no_grad():
            self.weight.copy_(pack(self.weight.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.bias)

    def assign_weight(self, weight: torch.Tensor) -> None:
        """A new weight in nn.Linear's layout, packed into this one's in place (LoRA adapters swapped in)."""
        with torch.no_grad():
            self.weight.copy_(pack(weight))

    def unpacked(self) -> torch.nn.Linear:
        with torch.no_grad():
            self.weight.copy_(unpack(self.weight.detach()))
        return self.replaced[0]


class PackedRowsEmbedding(torch.nn.Embedding):
    """The input embedding of a tied head whose (shared) weight is packed: rows gathered from the panels."""

    def __init__(self, embedding: torch.nn.Embedding):
        torch.nn.Module.__init__(self)
        for name in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, name, getattr(embedding, name))
        self.weight, self.replaced = embedding.weight, (embedding,)
        self.train(embedding.training)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return packed_embedding(ids, self.weight)


class FusedRMSNorm(torch.nn.Module):
    """A Llama-style RMSNorm (`weight * (x * rsqrt(mean(x^2) + eps))`) in one kernel pass."""

    def __init__(self, norm: torch.nn.Module, eps: float):
        super().__init__()
        self.weight, self.eps, self.replaced = norm.weight, eps, (norm,)
        self.train(norm.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return self.replaced[0](x)
        return rms_norm(x, self.weight, self.eps)


class FusedGatedMLP(torch.nn.Module):
    """down(silu(x @ gate^T) * (x @ up^T)) over packed gate/up projections: both into one buffer, then
    silu * up in one pass (the same child modules as the MLP it replaces)."""

    def __init__(self, mlp: torch.nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.replaced = (mlp,)
        self.train(mlp.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return self.replaced[0](x)
        return self.down_proj(gated_activation(self, x))


def gated_activation(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) of a fused gated MLP (what its down projection reads)."""
    return silu_mul(gate_up(x, mlp.gate_proj.weight, mlp.up_proj.weight))


def is_silu(act: torch.nn.Module) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def is_packed(module: Optional[torch.nn.Module]) -> bool:
    return isinstance(module, PackedLinear)


def is_fused(module: Optional[torch.nn.Module]) -> bool:
    return isinstance(module, (FusedRMSNorm, FusedGatedMLP))


@torch.no_grad()
def agrees(fused: torch.nn.Module, width: int) -> bool:
    """Does a fused module compute what the module it replaces does, on a random probe? A model whose norm
    or MLP computes something else (e.g. `(1 + weight)`) keeps its own."""
    probe = torch.randn(3, width, generator=torch.Generator().manual_seed(0))
    return torch.allclose(fused(probe), fused.replaced[0](probe), rtol=1e-4, atol=1e-5)


def fusion(module: torch.nn.Module) -> Optional[tuple[torch.nn.Module, int]]:
    """(the fused module that may replace `module`, its probe width), or None where none fits."""
    if is_fused(module) or hooked(module):
        return None
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1 \
            and weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.is_contiguous() \
            and isinstance(eps, float):
        return FusedRMSNorm(module, eps), weight.shape[0]
    parts = ("gate_proj", "up_proj", "down_proj", "act_fn")
    if all(is_packed(getattr(module, name, None)) and getattr(module, name).bias is None
           for name in ("gate_proj", "up_proj")) and isinstance(getattr(module, "down_proj", None), torch.nn.Linear) \
            and is_silu(getattr(module, "act_fn", None)) and {name for name, _ in module.named_children()} == set(parts) \
            and module.gate_proj.weight.shape == module.up_proj.weight.shape:
        return FusedGatedMLP(module), module.gate_proj.weight.shape[1]
    return None


@torch.no_grad()
def fuse_modules(model: torch.nn.Module) -> int:
    """Swap in FusedRMSNorm for Llama-style RMSNorms and FusedGatedMLP for gated SiLU MLPs whose gate and up
    projections are packed, each checked against the module it replaces first; (fused modules)."""
    for module in list(model.modules()):
        candidate = fusion(module)
        if candidate is not None and same_state(module, candidate[0]) and agrees(*candidate):
            swap(model, {id(module): candidate[0]})
    return sum(is_fused(m) for m in model.modules())


def unfuse_modules(model: torch.nn.Module) -> None:
    swap(model, {id(m): m.replaced[0] for m in model.modules() if is_fused(m)})


def tied_embeddings(model: torch.nn.Module, shared: Counter) -> dict[int, torch.nn.Embedding]:
    """weight address -> the plain nn.Embedding sharing it with one linear layer (a tied lm_head): packing
    that linear packs the embedding's table too, which then gathers its rows from the packed layout.
    `shared`: how many parameters each address holds (pack_linears counts them)."""
    linears = Counter(m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {m.weight.data_ptr(): m for m in model.modules()
            if type(m) is torch.nn.Embedding and m.max_norm is None and shared[m.weight.data_ptr()] == 2
            and linears[m.weight.data_ptr()] == 1 and not hooked(m)}


def module_blocker(module: torch.nn.Module, shared: Counter, tied: Optional[dict] = None) -> Optional[str]:
    """Why this module keeps torch's linear, or None. `tied`: tied_embeddings(model, shared)."""
    if type(module) is not torch.nn.Linear:
        return "not a plain nn.Linear"
    weight, bias = module.weight, module.bias
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not weight.is_contiguous():
        return "not a contiguous fp32 CPU weight"
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return "not an fp32 bias"
    if shared[weight.data_ptr()] > 1 and weight.data_ptr() not in (tied or {}):
        return "its weight is shared (tied) with something other than one embedding"
    if hooked(module):
        return "hooks run around its forward (accelerate places its weight, or another hook)"
    return None


@torch.no_grad()
def pack_linears(model: torch.nn.Module) -> tuple[int, int]:
    """Swap a PackedLinear in for every eligible linear layer (idempotent); (packed, linear layers)."""
    shared = Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    tied = tied_embeddings(model, shared)
    replacements = {}
    for module in {id(m): m for m in model.modules() if isinstance(m, torch.nn.Linear)}.values():
        if module_blocker(module, shared, tied) is None:
            replacements[id(module)] = PackedLinear(module)
            embedding = tied.get(module.weight.data_ptr())
            if embedding is not None:
                replacements[id(embedding)] = PackedRowsEmbedding(embedding)
    swap(model, replacements)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(is_packed(m) for m in linears), len(linears)


@torch.no_grad()
def unpack_linears(model: torch.nn.Module) -> None:
    """Undo `pack_linears`: the original modules over the original layout."""
    # a PackedRowsEmbedding's table is unpacked by the linear sharing it
    swap(model, {id(m): m.replaced[0] for m in model.modules() if isinstance(m, PackedRowsEmbedding)})
    swap(model, {id(m): m.unpacked() for m in model.modules() if is_packed(m)})


# ---------------------------------------------------------------------------------------------------
# generation.cpu_kernels

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
