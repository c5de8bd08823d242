"""What scripts/gpu_check.sh asks the machine, printed as markdown; stdlib only until torch is asked for.

    python3 scripts/gpu_env.py facts          # the GPU, drivers, torch's CUDA/NCCL/bf16/attention backends
    python3 scripts/gpu_env.py wheels DIR     # the wheels in DIR this Python lacks (absent, or an older version)
    python3 scripts/gpu_env.py imports        # every package distgen needs: version, or why it does not import
    python3 scripts/gpu_env.py attention      # torch's varlen FlashAttention API here, which SDPA kernel each of
                                              # the slot cache's attention calls gets, and what distgen picks
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as metadata
import platform
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

# Import name -> distribution name, for everything a GPU run of distgen imports.
NEEDED = {"torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers", "accelerate": "accelerate",
          "safetensors": "safetensors", "hydra": "hydra-core", "omegaconf": "omegaconf", "pytest": "pytest",
          "deepspeed": "deepspeed", "flash_attn": "flash-attn", "optimum.quanto": "optimum-quanto",
          "bitsandbytes": "bitsandbytes", "distgen.run": None}
# Optional: their absence is a fact to report, not a failure (the tests that need one skip, naming it).
OPTIONAL = {"deepspeed", "flash_attn", "optimum.quanto", "bitsandbytes"}


def row(key: str, value: object) -> str:
    return f"| {key} | {str(value).replace('|', '/')} |"


def version_of(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def torch_facts() -> Iterator[tuple[str, object]]:
    import torch
    yield "torch", f"{torch.__version__} (CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
    yield "CUDA visible", torch.cuda.is_available()
    if not torch.cuda.is_available():
        return
    props = torch.cuda.get_device_properties(0)
    yield "GPUs", f"{torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.1f} GiB, " \
                  f"capability {props.major}.{props.minor}, {props.multi_processor_count} SMs"
    yield "bf16 supported", torch.cuda.is_bf16_supported()
    yield "NCCL", ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else "absent"
    yield "SDPA backends enabled", ", ".join(name for name, on in (
        ("flash", torch.backends.cuda.flash_sdp_enabled()), ("mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
        ("cudnn", torch.backends.cuda.cudnn_sdp_enabled()), ("math", torch.backends.cuda.math_sdp_enabled())) if on)
    free, total = torch.cuda.mem_get_info()
    yield "GPU memory free", f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB"


def facts() -> int:
    print("| fact | value |\n| --- | --- |")
    print(row("python", f"{platform.python_version()} at {sys.executable}"))
    print(row("host", f"{platform.node()}, {platform.machine()}, kernel {platform.release()}"))
    for dist in ("transformers", "accelerate", "tokenizers", "hydra-core", "deepspeed", "flash-attn", "pytest",
                 "pytest-timeout", "triton"):
        print(row(dist, version_of(dist) or "absent"))
    try:
        for key, value in torch_facts():
            print(row(key, value))
    except Exception as err:  # a broken torch is the fact to report
        print(row("torch", f"error: {type(err).__name__}: {err}"))
        return 1
    return 0


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return name, version


def version_key(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"[.+-]", version))


def wheels(folder: str) -> int:
    """Print the wheels to install: those whose package is absent here or installed in an older version."""
    for path in sorted(Path(folder).glob("*.whl")):
        name, version = wheel_name_version(path)
        have = version_of(name) or version_of(name.replace("_", "-"))
        if have is None or version_key(have) < version_key(version):
            print(path)
        else:
            print(f"keep {name} {have} (carried {version})", file=sys.stderr)
    return 0


def try_import(module: str, dist: str | None) -> tuple[bool, str]:
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # some (deepspeed) log to stdout: keep the table clean
            importlib.import_module(module)
    except Exception as err:
        return False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    took = f"imports in {time.perf_counter() - start:.1f}s"
    return True, f"{version_of(dist) if dist else 'ok'} ({took})"


def imports() -> int:
    print("| package | result |\n| --- | --- |")
    failed = 0
    for module, dist in NEEDED.items():
        ok, what = try_import(module, dist)
        failed += not ok and module not in OPTIONAL
        print(row(module, what if ok else ("absent (optional): " if module in OPTIONAL else "FAILED: ") + what))
    return 1 if failed else 0


def sdpa_choice(query, key, value, mask=None, causal=False, gqa=False) -> str:
    """The SDPA backend torch picks for this call (torch._fused_sdp_choice), by name."""
    import torch
    from torch.nn.attention import SDPBackend
    choice = torch._fused_sdp_choice(query, key, value, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    try:
        return SDPBackend(choice).name
    except ValueError:
        return str(choice)


def attention_facts() -> Iterator[tuple[str, object]]:
    """The 1B bench model's shapes (32/4 heads, head_dim 64), bf16, 128 rows over 512 columns."""
    import inspect

    import torch
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    args = [a.name for a in op.default._schema.arguments] if op is not None else []
    yield "aten::_flash_attention_forward", (", ".join(a for a in args if a in ("seqused_k", "block_table",
                                            "num_splits", "alibi_slopes")) or "none of seqused_k/block_table") \
        if op is not None else "absent"
    try:
        from torch.nn.attention.varlen import varlen_attn
        yield "torch.nn.attention.varlen.varlen_attn", str(inspect.signature(varlen_attn))[:300]
    except ImportError as error:
        yield "torch.nn.attention.varlen.varlen_attn", f"absent ({error})"
    for package in ("flash_attn", "flashinfer"):
        yield package, "installed" if importlib.util.find_spec(package) else "absent"
    if not torch.cuda.is_available():
        return
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    rows, heads, kv_heads, dim, width = 128, 32, 4, 64, 512
    q = torch.randn(rows, heads, 1, dim, device=cuda, dtype=bf16)
    k = torch.randn(rows, kv_heads, width, dim, device=cuda, dtype=bf16)
    mask = torch.zeros(rows, 1, 1, width, device=cuda, dtype=bf16)
    yield "SDPA for distgen's old decode call (mask + enable_gqa)", sdpa_choice(q, k, k, mask, gqa=True)
    yield "SDPA for a decode with GQA folded into the query axis (mask)", \
        sdpa_choice(q.view(rows, kv_heads, heads // kv_heads, dim), k, k, mask)
    prompt = torch.randn(1, heads, 256, dim, device=cuda, dtype=bf16)
    prompt_kv = torch.randn(1, kv_heads, 256, dim, device=cuda, dtype=bf16)
    yield "SDPA for a whole prompt (causal, enable_gqa)", sdpa_choice(prompt, prompt_kv, prompt_kv, causal=True, gqa=True)
    chunk_mask = torch.ones(64, 256, device=cuda, dtype=torch.bool).tril(192)
    yield "SDPA for a continuation chunk (bool mask, enable_gqa)", \
        sdpa_choice(prompt[:, :, :64], prompt_kv, prompt_kv, chunk_mask, gqa=True)
    from distgen.engine.kv.attention import AttentionContext, plan_attention
    for dtype in (bf16, torch.float32):
        impl, why = plan_attention(AttentionContext(cuda, dtype, dtype, dim, heads, kv_heads))
        yield f"distgen's slot attention in {str(dtype).replace('torch.', '')}", f"{impl.name}: {why}"
    yield from varlen_decode_facts(cuda)


def varlen_decode_facts(cuda) -> Iterator[tuple[str, object]]:
    """distgen's cuda_varlen decode (attention.flash_forward: rows addressed by slot id through cum_seq_k and
    seqused_k, GQA 32/4, head_dim 64, bf16) against an fp32 SDPA over each row's own columns; then the same call
    captured in a CUDA graph and replayed with other slots and lengths (a padding row reading nothing among them)."""
    from types import SimpleNamespace

    import torch
    from distgen.engine.kv.attention import flash_forward
    from distgen.engine.kv.varlen import AttentionPlan
    rows, heads, kv_heads, dim, slots, columns = 128, 32, 4, 64, 160, 513
    generator = torch.Generator(device=cuda).manual_seed(0)
    keys, values = (torch.randn((slots, columns, kv_heads, dim), device=cuda, dtype=torch.bfloat16,
                                generator=generator).transpose(1, 2) for _ in range(2))  # token-major storage
    layer = SimpleNamespace(keys=keys, values=values)
    query = torch.randn((1, heads, rows, dim), device=cuda, dtype=torch.bfloat16, generator=generator)
    int32 = dict(dtype=torch.int32, device=cuda)

    def metadata(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        picked = torch.randperm(slots, device=cuda, generator=generator.manual_seed(seed))[:rows]
        used = torch.randint(1, columns, (rows,), device=cuda, generator=generator)
        ends = picked.new_full((1,), slots * columns)
        return torch.cat([picked * columns, ends]).to(torch.int32), used.to(torch.int32)

    cu_k, used = metadata(1)
    plan = AttentionPlan([layer], torch.zeros(0), torch.zeros(0), decode=rows, width=columns,
                         cu_q=torch.arange(rows + 1, **int32), cu_k=cu_k, seqused_k=used, max_q=1, max_k=columns)

    def error(out: torch.Tensor) -> float:  # relative to fp32 SDPA over each row's slot, its first seqused_k columns
        picked, lengths = (plan.cu_k[:rows] // columns).long(), plan.seqused_k.long()
        k, v = (buffer[picked].float() for buffer in (keys, values))  # (rows, kv_heads, columns, dim)
        seen = (torch.arange(columns, device=cuda) < lengths.unsqueeze(-1))[:, None, None]
        want = torch.nn.functional.scaled_dot_product_attention(query[0].transpose(0, 1).unsqueeze(2).float(), k, v,
                                                                attn_mask=seen, scale=0.125, enable_gqa=True)
        want = torch.where(lengths[:, None, None] > 0, want.squeeze(2), 0)
        return ((out[0].float() - want).norm() / want.norm()).item()

    start = time.perf_counter()
    eager = flash_forward(plan, layer, query, 0.125)
    torch.cuda.synchronize()
    yield "cuda_varlen decode, 128 rows over 160 slots x 513 columns, vs fp32 SDPA", \
        f"relative error {error(eager):.2e} (bf16 rounding is ~4e-3) in {time.perf_counter() - start:.2f}s"
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        flash_forward(plan, layer, query, 0.125)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph, stream=stream):
        captured = flash_forward(plan, layer, query, 0.125)
    cu_k, used = metadata(2)
    used[-1] = 0  # a padding row
    plan.cu_k.copy_(cu_k)
    plan.seqused_k.copy_(used)
    graph.replay()
    torch.cuda.synchronize()
    fresh = flash_forward(plan, layer, query, 0.125)
    yield "cuda_varlen decode captured in a CUDA graph, replayed with new slots and lengths", \
        f"relative error {error(captured):.2e}; equal to an eager call: {torch.equal(captured, fresh)}; padding " \
        f"row zero: {not captured[0, -1].any().item()}"


def attention() -> int:
    print("| attention fact | value |\n| --- | --- |")
    try:
        for key, value in attention_facts():
            print(row(key, value))
    except Exception as err:  # what failed is the fact to report
        print(row("error", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
        return 1
    return 0


COMMANDS: dict[str, Callable[..., int]] = {"facts": facts, "wheels": wheels, "imports": imports,
                                           "attention": attention}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    sys.exit(COMMANDS[sys.argv[1]](*sys.argv[2:]))
