"""GPU benchmark: distgen against HF `generate` AND against the card's own limits, measured in the same run.

    python3 bench/gpu.py --results-dir bench/results [--time-limit 300]     # gpu-<card>-<date>.md/.json
    python3 bench/gpu.py --microbench-only --out-json $OUT/microbench.json  # the decode-step microbench alone
    python3 bench/gpu.py --preset smoke --device cpu                        # the plumbing only, on any machine

1. The card's limits: device-to-device copy bandwidth (bytes read + written) and the bf16 GEMM rate
   (8192^3, random data), each the median of timed repeats.
2. The job: a random-init Llama of about 1B parameters (22 layers, hidden 2048, GQA 32/4 heads, saved once
   in bf16 and loaded by every run), 512 prompts of 16-512 tokens with budgets of 32-256 new tokens, bf16,
   greedy, EOS off. Its speed of light (`job_cost`, `sol_seconds`): the decode steps stream the weights once
   per step (ceil(decode tokens / rows) steps) and every row's keys and values, the prefill forwards' matrix
   products at the GEMM rate; each row of the table gets `sol_fraction` = that time over its generation time.
3. Systems: distgen with its defaults (on CUDA: batch_size=auto, an 8192-token prefill budget, FlashAttention
   varlen, pipelined steps, CUDA-graph decode), HF `generate` with static batches of --batch-size prompts sorted
   by length, then VARIANTS while the time limit allows (distgen at HF's rows, graphs off, today's SDPA
   attention path, the CPU-sized prefill budget).
4. The decode-step microbench (`microbench`, also alone with --microbench-only): 128/256/512 rows decoding
   in one engine, per configuration (defaults; graphs off; torch_sdpa): ms per step, the host's share (time not
   spent waiting for the device), the GPU's busy time and kernels per step from torch.profiler.

tok/s counts the tokens the prompts asked for over generation time (load excluded; HF timed after a warm-up).
The prompts, the distgen runs and the HF baseline are bench/common.py's, as for every bench: `make_prompts`
(lengths and budgets spread evenly), `run_distgen` (`python -m distgen.launch`, one rank, no core binding) and
`hf_generate_static`.
`scripts/gpu_check.sh` runs this; the files it writes go to bench/results/ (gpu-<card>-<date>.md/.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import distgen.backends.cpu  # noqa: E402,F401  registers the CPU backend with the engine
from distgen.config import GenerationConfig, TinyModelConfig  # noqa: E402
from distgen.common.errors import ConfigError  # noqa: E402
from distgen.catalog.load import load_config  # noqa: E402
from distgen.outputs.stats import cuda_peaks_mib  # noqa: E402
from distgen.models.tiny import build_tokenizer, tiny_llama_config  # noqa: E402
from bench.common import (Binding, BenchPrompt, RunFailed, distgen_launch, hf_generate_static,  # noqa: E402
                          make_prompts, run_distgen, write_prompts)

PRESETS = {  # model shape, prompts, prompt lengths and budgets (tokens), rows per batch (HF's, and a variant's)
    "1b": dict(layers=22, hidden=2048, heads=32, kv_heads=4, intermediate=5632, prompts=512,
               min_prompt=16, max_prompt=512, min_budget=32, max_budget=256, batch_size=128),
    "smoke": dict(layers=1, hidden=64, heads=4, kv_heads=2, intermediate=128, prompts=6,
                  min_prompt=4, max_prompt=24, min_budget=2, max_budget=6, batch_size=4),
}
# The microbench's rows per decode step, and each preset's prompt length there.
MICRO_ROWS = {"1b": (128, 256, 512), "smoke": (4, 8)}
MICRO_PROMPT = {"1b": 128, "smoke": 8}


@dataclass(frozen=True)
class Variant:
    """A distgen configuration the bench runs after its defaults and HF."""
    name: str
    overrides: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # DISTGEN_CUDA_GRAPHS
    cuda_only: bool = False  # nothing to measure on a CPU (the smoke preset)


VARIANTS = (  # most telling first: later ones are left out when the time limit runs short
    # the rows HF runs, so the two compare at equal batch
    Variant("distgen, HF's rows", ("generation.batch_size={batch_size}",)),
    # what the CUDA graphs are worth (the same padded decode step, eager)
    Variant("distgen, graphs off", env=(("DISTGEN_CUDA_GRAPHS", "0"),), cuda_only=True),
    # today's attention path (masked SDPA, compacted rows, no pipelining, no graphs), at HF's rows
    Variant("distgen, torch_sdpa at HF's rows",
            ("generation.batch_size={batch_size}", "generation.attention=torch_sdpa"), cuda_only=True),
    # the CPU-sized prefill budget
    Variant("distgen, prefill budget 512", ("generation.prefill_chunk_tokens=512",), cuda_only=True),
)
# A variant starts only with this many seconds left (a 1B model's load and run).
MIN_VARIANT_SECONDS = 40


# --- the limits: what the card does, what the job costs ---

@dataclass(frozen=True)
class Limits:
    """The card's measured ceilings."""
    copy_bytes_per_s: float   # device-to-device copy, bytes read + written per second
    gemm_flops_per_s: float   # bf16 (CPU: fp32) matrix product
    how: str = ""


def timed(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of `run` over `repeats` after two warm-ups (CUDA events on a GPU)."""
    for _ in range(2):
        run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_card(device: torch.device, small: bool = False) -> Limits:
    """Copy bandwidth over a buffer well past the L2 (2 GiB on CUDA), and the bf16 GEMM rate at 8192^3."""
    elements = (1 << 20 if small else 1 << 30) if device.type == "cuda" else (1 << 20 if small else 1 << 24)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    src = torch.randn(elements, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), device, 10)
    bandwidth = 2 * src.numel() * src.element_size() / copy_s
    del src, dst
    n = (1024 if small else 8192) if device.type == "cuda" else (256 if small else 1024)
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    gemm_s = timed(lambda: torch.mm(a, b), device, 10)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Limits(bandwidth, 2 * n ** 3 / gemm_s, f"copy of {elements * 2 / 2**20:.0f} MiB x 2 (read + write), "
                  f"{str(dtype).replace('torch.', '')} GEMM {n}^3; medians of 10")


@dataclass(frozen=True)
class ModelCost:
    """What one token costs a forward, from the model's shapes."""
    weight_bytes: int          # every parameter but the input embedding: streamed once per forward
    matmul_params: int         # the linear layers' weights (lm_head included): 2 FLOPs each per token
    kv_bytes_per_token: int    # keys and values of one token, every layer
    attention_flops_per_key: int  # one query token against one cached key: 4 x layers x heads x head_dim


def model_cost(model: torch.nn.Module) -> ModelCost:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    itemsize = next(model.parameters()).element_size()
    embed = model.get_input_embeddings().weight
    weights = sum(p.numel() for p in model.parameters()) - embed.numel()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    return ModelCost(weights * itemsize, linear, 2 * layers * kv_heads * head_dim * itemsize,
                     4 * layers * heads * head_dim)


@dataclass(frozen=True)
class JobCost:
    prefill_bytes: float
    prefill_flops: float
    decode_bytes: float
    decode_flops: float

    @property
    def bytes(self) -> float:
        return self.prefill_bytes + self.decode_bytes

    @property
    def flops(self) -> float:
        return self.prefill_flops + self.decode_flops


def job_cost(cost: ModelCost, prompt_lengths: list[int], budgets: list[int], rows: int,
             prefill_tokens: int) -> JobCost:
    """The fewest bytes and the FLOPs the job needs with `rows` rows decoding together: each prefill forward
    (at most `prefill_tokens` tokens) and each decode step (ceil(decode tokens / rows) of them) streams the
    weights once; every decode token reads its sequence's keys and values once; every token is written once.
    A prompt's first token comes from its prefill, its k-th decode token (k = 1..budget-1) reads p + k keys."""
    prompt_tokens = sum(prompt_lengths)
    decode_tokens = sum(b - 1 for b in budgets)
    keys_read = sum((b - 1) * p + (b - 1) * b // 2 for p, b in zip(prompt_lengths, budgets))
    prompt_keys = sum(p * (p + 1) // 2 for p in prompt_lengths)
    prefill_forwards = math.ceil(prompt_tokens / max(1, prefill_tokens))
    steps = math.ceil(decode_tokens / max(1, rows))
    return JobCost(
        prefill_bytes=prefill_forwards * cost.weight_bytes + prompt_tokens * cost.kv_bytes_per_token,
        prefill_flops=2 * cost.matmul_params * prompt_tokens + cost.attention_flops_per_key * prompt_keys,
        decode_bytes=steps * cost.weight_bytes + (keys_read + decode_tokens) * cost.kv_bytes_per_token,
        decode_flops=2 * cost.matmul_params * decode_tokens + cost.attention_flops_per_key * keys_read)


def sol_seconds(job: JobCost, limits: Limits) -> float:
    """The job's speed-of-light time: each phase at whichever of its bytes or FLOPs takes longer."""
    phase = lambda bytes_, flops: max(bytes_ / limits.copy_bytes_per_s, flops / limits.gemm_flops_per_s)  # noqa
    return phase(job.prefill_bytes, job.prefill_flops) + phase(job.decode_bytes, job.decode_flops)


# --- the job's systems ---

@dataclass
class Result:
    name: str
    status: str = "ok"  # ok | failed: ... | timed out ... | not run: ...
    tokens_per_second: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    peak_allocated_mib: float = 0.0
    peak_reserved_mib: float = 0.0
    compile_seconds: float = 0.0  # distgen: its CUDA-graph captures (or a torch.compile), inside generate_seconds
    rows: int = 0  # distgen: the batch size it ran (batch_size=auto: what it picked)
    sol_seconds: float = 0.0  # the job's speed-of-light time at these rows
    sol_fraction: float = 0.0  # sol_seconds / generate_seconds
    graph_replays: int = 0
    syncs_per_step: float = 0.0
    engine: str = ""  # distgen's engine line
    equal_to_hf: str = ""
    overrides: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    completions: list[list[int]] = field(default_factory=list, repr=False)


def job_prompts(args) -> list[BenchPrompt]:
    """The job's prompts: bench/common.py's generator (seed 0), prompt lengths (characters, one token each) and
    budgets spread evenly over the preset's ranges (`even`: the job's shape, as measured since 2026-11-30)."""
    return make_prompts(args.prompts, lengths=(args.min_prompt, args.max_prompt),
                        budgets=(args.min_budget, args.max_budget), even=True)


def model_config(args) -> TinyModelConfig:
    return TinyModelConfig(layers=args.layers, hidden_size=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                           intermediate_size=args.intermediate, init_std=0.02, seed=0)


def build_model(args, tokenizer, device: torch.device) -> torch.nn.Module:
    """The benchmark model, random-init directly on the device (seconds, where a CPU init of 1B takes long)."""
    from transformers import LlamaForCausalLM
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(tiny_llama_config(model_config(args), tokenizer))
    return model.to(dtype).eval()


def save_model(model: torch.nn.Module, tokenizer, out: Path) -> Path:
    """Saved once (safetensors), so every run loads the same weights quickly."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def composes(override: str) -> bool:
    try:
        load_config(["model=tiny", "dataset=prompts.jsonl", override])
    except ConfigError:
        return False
    return True


def measure_distgen(name: str, args, work: Path, prompts_file: Path, model_dir: Path, extra: list[str],
                    timeout: float, env: Optional[dict] = None) -> Result:
    """distgen as every bench runs it (bench/common.py `run_distgen`: `python -m distgen.launch`, one rank, no
    core binding, the threads this process has, as HF's in-process baseline), with the job's settings, `extra`
    overrides and `env` on top (a variant's)."""
    out = work / "".join(c if c.isalnum() else "_" for c in name)
    overrides = [f"model={model_dir}", f"dataset={prompts_file}", f"device={args.device}", f"model.dtype={args.dtype}",
                 "generation.eos_token_ids=[]", f"generation.max_new_tokens={args.max_budget}", *extra]
    launch = distgen_launch(overrides, out, Binding.make(torch.get_num_threads(), "none"))
    launch = replace(launch, env={**launch.env, **(env or {})})
    try:
        job = run_distgen(launch, out, timeout)
    except RunFailed as failed:
        if failed.timed_out:
            return Result(name, f"timed out after {timeout:.0f}s", overrides=extra, env=env or {})
        tail = failed.log.read_text(errors="replace")[-3000:]
        print(f"--- {name} failed (exit {failed.returncode}):\n{tail}", flush=True)
        return Result(name, f"failed: exit {failed.returncode}: {error_line(tail)}", overrides=extra, env=env or {})
    stats = job.stats
    [rank] = stats["ranks"]
    engine = next((line.strip() for line in launch.log.read_text().splitlines() if "engine:" in line), "")
    print(f"  {name}: {engine[:600]}", flush=True)
    return Result(name, "ok", stats["summary"]["tokens_per_second"], stats["summary"]["generated_tokens"],
                  stats["summary"]["generate_seconds"], rank["cuda_peak_allocated_mib"], rank["cuda_peak_reserved_mib"],
                  rank.get("cuda_graph_capture_seconds", 0.0) or rank.get("compile_seconds", 0.0),
                  rank.get("batch_size", 0), graph_replays=rank.get("cuda_graph_replays", 0),
                  syncs_per_step=rank.get("blocking_syncs_per_step", 0.0), engine=engine, overrides=extra,
                  env=env or {}, completions=job.tokens)


def error_line(log_tail: str) -> str:
    """The last line that names an error, else the last line: what the markdown table shows."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()] or [""]
    return next((line for line in reversed(lines) if "rror" in line), lines[-1])[:240]


def run_hf_static(args, prompts: list[BenchPrompt], tokenizer, model: torch.nn.Module,
                  device: torch.device) -> Result:
    """HF `generate`, the baseline every bench shares (bench/common.py `hf_generate_static`): static batches of
    --batch-size prompts sorted by length, EOS off (every row runs to its budget), timed after a warm-up."""
    run = hf_generate_static(model, [tokenizer(p.text)["input_ids"] for p in prompts], [p.budget for p in prompts],
                             args.batch_size, tokenizer.pad_token_id, eos_ids=(), warm_up=True)
    allocated, reserved = cuda_peaks_mib(device)
    generated = sum(p.budget for p in prompts)
    return Result("HF generate, static batches", "ok", round(generated / run.seconds, 2), generated,
                  round(run.seconds, 3), round(allocated, 1), round(reserved, 1), rows=args.batch_size,
                  completions=run.tokens)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agreement(result: Result, reference: Result) -> str:
    if not (result.completions and reference.completions) or result is reference:
        return ""
    same = sum(a == b for a, b in zip(result.completions, reference.completions))
    return f"{same}/{len(reference.completions)}"


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def card_slug(device: torch.device) -> str:
    """h100, h200, ... (cpu): what results files are named after."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_properties(device).name.lower()
    found = re.search(r"\b([a-z]\d{2,4})\b", name.replace("nvidia", ""))
    return found.group(1) if found else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def best_distgen(results: list[Result]) -> Optional[Result]:
    done = [r for r in results if r.name.startswith("distgen") and r.status == "ok"]
    return max(done, key=lambda r: r.tokens_per_second, default=None)


# --- the decode-step microbench ---

@dataclass
class MicroResult:
    config: str
    rows: int
    status: str = "ok"
    ms_per_step: float = 0.0     # wall time per decode step, steady state
    host_ms_per_step: float = 0.0  # of which the host was not waiting for the device
    gpu_ms_per_step: float = 0.0   # device busy time (kernel time, torch.profiler)
    kernels_per_step: float = 0.0  # device kernels per step
    launches_per_step: float = 0.0  # host launch calls per step (a graph replay is one)
    sol_ms_per_step: float = 0.0   # the step's speed of light: weights + the rows' keys/values at copy bandwidth
    engine: str = ""


MICRO_CONFIGS = {  # name -> what it sets: environment variables, generation.* settings
    "defaults": ({}, {}),
    "graphs off": ({"DISTGEN_CUDA_GRAPHS": "0"}, {}),
    "torch_sdpa": ({}, {"attention": "torch_sdpa"}),  # today's attention path: masks, compaction, no graphs
}


def micro_plan(rows: tuple[int, ...], cuda: bool) -> list[tuple[str, int]]:
    """(config, rows) in the order they run, most telling first (the time limit may cut the tail): the defaults
    at every row count, today's torch_sdpa path at the smallest, graphs off, then the rest."""
    if not cuda:
        return [("defaults", n) for n in rows]
    first = [("defaults", n) for n in rows] + [("torch_sdpa", rows[0])] + [("graphs off", n) for n in rows[:2]]
    rest = [(config, n) for config in MICRO_CONFIGS for n in rows if (config, n) not in first]
    return first + rest


def profile_steps(engine, steps: int, device: torch.device) -> tuple[float, float, float]:
    """(GPU busy ms, kernels, host launch calls) per step over `steps` engine steps, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync(device)
    busy_us, kernels, launches = 0.0, 0, 0
    for event in prof.events():
        if getattr(event, "device_type", None) is not None and str(event.device_type).endswith("CUDA"):
            kernels += 1
            busy_us += event.time_range.elapsed_us()
        elif re.match(r"^(cuda|cu)(LaunchKernel|LaunchKernelExC|GraphLaunch)", event.name):
            launches += 1
    return busy_us / 1e3 / steps, kernels / steps, launches / steps


def micro_one(model, tokenizer, rows: int, config: str, sets: tuple[dict, dict], prompt_tokens: int, steps: int,
              device: torch.device, limits: Optional[Limits]) -> MicroResult:
    """`rows` prompts of `prompt_tokens` tokens prefilled into one engine, then its decode steps timed; `sets`: the
    configuration's environment variables and generation.* settings (MICRO_CONFIGS)."""
    from distgen.engine import build_engine
    from distgen.engine.host import READS
    from distgen.engine.request import Status
    from distgen.inputs.records import Prompt
    env, settings = sets
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        warm = 6
        # cpu_kernels=torch: distgen's CPU kernels would repack the model's weights in place (the smoke preset)
        gen = GenerationConfig(batch_size=rows, max_new_tokens=warm + 2 * steps + 32, compile="off",
                               eos_token_ids=[], cpu_kernels="torch", **settings)
        ids = [[3 + (i * 7 + j) % 250 for j in range(prompt_tokens)] for i in range(rows)]
        queue = [(Prompt(i, str(i), "", gen.max_new_tokens), ids[i]) for i in range(rows)]
        engine = build_engine(model, queue, gen, tokenizer.pad_token_id, [], device)
        with torch.no_grad():
            while engine.waiting or any(r.status is not Status.DECODING for r in engine.running):
                engine.step()  # prefill every prompt (mixed steps admit them in budget-sized forwards)
            for _ in range(warm):  # graphs captured, allocator warm
                engine.step()
            sync(device)
            waited = READS.waited_seconds
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            sync(device)
            wall = (time.perf_counter() - start) / steps
            host = wall - (READS.waited_seconds - waited) / steps
            busy, kernels, launches = profile_steps(engine, steps, device)
        cost = model_cost(model)
        context = prompt_tokens + warm + steps  # about where the timed steps read
        sol = (cost.weight_bytes + rows * context * cost.kv_bytes_per_token) / limits.copy_bytes_per_s \
            if limits else 0.0
        result = MicroResult(config, rows, "ok", wall * 1e3, host * 1e3, busy, kernels, launches, sol * 1e3,
                             engine.choice)
        engine.close()
        return result
    except Exception as error:  # a configuration that fails is reported; the others still run
        return MicroResult(config, rows, f"failed: {type(error).__name__}: {str(error)[:200]}")
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def microbench(model, tokenizer, args, device: torch.device, limits: Optional[Limits],
               deadline: float) -> list[MicroResult]:
    results = []
    for config, rows in micro_plan(MICRO_ROWS[args.preset], device.type == "cuda"):
        if time.monotonic() > deadline:
            results.append(MicroResult(config, rows, "not run: time limit"))
            continue
        results.append(micro_one(model, tokenizer, rows, config, MICRO_CONFIGS[config], MICRO_PROMPT[args.preset],
                                 args.micro_steps, device, limits))
        r = results[-1]
        print(f"microbench {config} x {rows} rows: {r.status}, {r.ms_per_step:.2f} ms/step (host "
              f"{r.host_ms_per_step:.2f}, GPU {r.gpu_ms_per_step:.2f}, {r.kernels_per_step:.0f} kernels, "
              f"{r.launches_per_step:.0f} launches; speed of light {r.sol_ms_per_step:.2f})", flush=True)
    return results


# --- report ---

# Issue 20's targets for the 1B job (limits measured on the same card in the same run).
TARGET_TOKENS_PER_SECOND = 25_000
TARGET_SOL_FRACTION = 0.35
TARGET_STEP_MS_AT_256_ROWS = 3.0


def targets(results: list[Result], micro: list[MicroResult]) -> list[str]:
    """One line per target of issue 20, read off distgen's defaults and the microbench: the figure, met or not."""
    said = lambda met: "met" if met else "NOT met"  # noqa: E731
    lines = []
    defaults = next((r for r in results if r.name == "distgen, defaults"), None)
    if defaults is not None and defaults.status == "ok":
        lines += [f"- generated tok/s: {defaults.tokens_per_second:,.0f} (target >= {TARGET_TOKENS_PER_SECOND:,}: "
                  f"{said(defaults.tokens_per_second >= TARGET_TOKENS_PER_SECOND)})",
                  f"- speed-of-light fraction: {defaults.sol_fraction:.3f} at {defaults.rows} rows (target >= "
                  f"{TARGET_SOL_FRACTION}: {said(defaults.sol_fraction >= TARGET_SOL_FRACTION)})",
                  f"- CUDA graph replays: {defaults.graph_replays} ({said(defaults.graph_replays > 0)}); blocking "
                  f"host reads per step: {defaults.syncs_per_step:.3f} (target: one per step, the "
                  f"last landing aside: {said(0 < defaults.syncs_per_step <= 1.01)}); capture s: "
                  f"{defaults.compile_seconds:.1f}"]
    elif defaults is not None:
        lines.append(f"- distgen, defaults: {defaults.status}")
    step = next((m for m in micro if m.config == "defaults" and m.rows == 256 and m.status == "ok"), None)
    if step is not None:
        lines.append(f"- decode step at 256 rows: {step.ms_per_step:.2f} ms (target <= {TARGET_STEP_MS_AT_256_ROWS}: "
                     f"{said(step.ms_per_step <= TARGET_STEP_MS_AT_256_ROWS)})")
    return ["", "## Issue 20's targets (distgen, defaults)", "", *lines] if lines else []


def micro_markdown(micro: list[MicroResult]) -> list[str]:
    if not micro:
        return []
    lines = ["", "## Decode step microbench", "",
             "| config | rows | ms/step | host ms | GPU busy ms | kernels/step | launches/step | SOL ms | status |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for m in micro:
        lines.append(f"| {m.config} | {m.rows} | {m.ms_per_step:.2f} | {m.host_ms_per_step:.2f} | "
                     f"{m.gpu_ms_per_step:.2f} | {m.kernels_per_step:.0f} | {m.launches_per_step:.0f} | "
                     f"{m.sol_ms_per_step:.2f} | {m.status} |")
    lines += ["", "ms/step: wall time per steady-state decode step (every row decoding); host ms: the part the host "
              "was not waiting for the device; GPU busy: kernel time per step (torch.profiler); launches: host "
              "launch calls (a CUDA graph replay is one); SOL: the weights plus the rows' keys and values at the "
              "measured copy bandwidth."]
    return lines


def markdown(results: list[Result], args, params: int, prompts: list[BenchPrompt], device: torch.device,
             limits: Optional[Limits], cost: Optional[JobCost], micro: list[MicroResult]) -> str:
    import transformers
    hf = next((r for r in results if r.name.startswith("HF") and r.status == "ok"), None)
    best = best_distgen(results)
    lengths = [len(build_tokenizer()(p.text)["input_ids"]) for p in prompts]
    lines = [
        f"# distgen GPU benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine_name(device)}; torch {torch.__version__}, transformers {transformers.__version__}",
        f"- model: random-init Llama, {params / 1e6:,.0f}M parameters ({args.layers} layers, hidden {args.hidden}, "
        f"{args.heads}/{args.kv_heads} heads), {args.dtype}, greedy, EOS off",
        f"- job: {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, budgets "
        f"{args.min_budget}-{args.max_budget} ({sum(p.budget for p in prompts)} tokens asked for); HF "
        f"runs {args.batch_size} rows per batch",
    ]
    if limits and cost:
        lines.append(f"- limits measured here: copy {limits.copy_bytes_per_s / 1e12:.2f} TB/s, GEMM "
                     f"{limits.gemm_flops_per_s / 1e12:.0f} TFLOP/s ({limits.how}); the job at {args.batch_size} "
                     f"rows: {cost.bytes / 1e9:.0f} GB, {cost.flops / 1e12:.0f} TFLOP, speed of light "
                     f"{sol_seconds(cost, limits):.2f} s")
    lines += [f"- best: {best.name} ({' '.join(best.overrides + [f'{k}={v}' for k, v in best.env.items()]) or 'defaults'})"
              if best else "- best: none ran", "",
              "| system | rows | tok/s | vs HF | SOL fraction | gen s | SOL s | capture s | graph replays | syncs/step | "
              "peak alloc MiB | equal to HF | status |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        ratio = f"{r.tokens_per_second / hf.tokens_per_second:.2f}x" if hf and r.status == "ok" else ""
        lines.append(f"| {r.name} | {r.rows or ''} | {r.tokens_per_second:.0f} | {ratio} | {r.sol_fraction:.3f} | "
                     f"{r.generate_seconds:.1f} | {r.sol_seconds:.2f} | {r.compile_seconds:.1f} | {r.graph_replays} | "
                     f"{r.syncs_per_step:.2f} | {r.peak_allocated_mib:.0f} | {r.equal_to_hf} | {r.status} |")
    lines += ["", "tok/s: tokens the prompts asked for over generation time (load excluded; HF timed after a "
              "warm-up, distgen's first step and graph captures included). SOL fraction: the job's speed-of-light "
              "time at that row's rows (weights streamed once per forward, keys/values once per token, prefill "
              "matrix products at the GEMM rate; measured limits above) over its generation time. 'equal to HF': "
              "completions identical token for token (bf16 batches of other shapes round differently)."]
    lines += targets(results, micro)
    lines += micro_markdown(micro)
    engines = [f"- {r.name}: {r.engine}" for r in results if r.engine]
    if engines:
        lines += ["", "## Engine lines", "", *engines]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    for key, value in PRESETS["1b"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"1b preset: {value}")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default="bf16")
    parser.add_argument("--time-limit", type=float, default=420, help="seconds for everything; later systems "
                        "are left out when it runs short")
    parser.add_argument("--micro-steps", type=int, default=20, help="decode steps the microbench times")
    parser.add_argument("--microbench-only", action="store_true", help="only the decode-step microbench")
    parser.add_argument("--no-microbench", action="store_true")
    parser.add_argument("--microbench-json", type=Path, help="a --microbench-only run's JSON to include")
    parser.add_argument("--results-dir", type=Path, help="write gpu-<card>-<date>.md/.json here")
    parser.add_argument("--out-md", type=Path)
    parser.add_argument("--out-json", type=Path)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.time_limit
    left = lambda: deadline - time.monotonic()  # noqa: E731
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device visible; nothing measured (--device cpu runs the plumbing)")
        return 3
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    tokenizer = build_tokenizer()
    prompts = job_prompts(args)
    limits = measure_card(device, small=args.preset == "smoke")
    print(f"limits: copy {limits.copy_bytes_per_s / 1e12:.3f} TB/s, GEMM {limits.gemm_flops_per_s / 1e12:.1f} "
          f"TFLOP/s ({limits.how})", flush=True)
    model = build_model(args, tokenizer, device)
    cost = model_cost(model)
    params = sum(p.numel() for p in model.parameters())
    micro: list[MicroResult] = []
    if args.microbench_json and args.microbench_json.exists():
        micro = [MicroResult(**m) for m in json.loads(args.microbench_json.read_text())["microbench"]]
    elif not args.no_microbench:
        micro = microbench(model, tokenizer, args, device, limits, deadline - (0 if args.microbench_only else
                                                                            0.6 * args.time_limit))
    if args.microbench_only:
        write_outputs(args, device, {"microbench": [asdict(m) for m in micro], "limits": asdict(limits),
                                     "machine": machine_name(device)}, "\n".join(micro_markdown(micro)) + "\n")
        return 0 if all(m.status == "ok" or m.status.startswith("not run") for m in micro) else 1
    lengths = [len(tokenizer(p.text)["input_ids"]) for p in prompts]
    budgets = [p.budget for p in prompts]
    prefill_tokens = 8192 if device.type == "cuda" else 512
    results: list[Result] = []
    job = job_cost(cost, lengths, budgets, args.batch_size, prefill_tokens)

    def add(result: Result) -> None:
        """One more system measured: its SOL fraction and agreement with HF, and every file written again (a run
        killed later still leaves the table so far)."""
        results.append(result)
        print(f"{result.name}: {result.status}, {result.tokens_per_second} tok/s", flush=True)
        hf = next((r for r in results if r.name.startswith("HF")), None)
        for done in results:
            done.equal_to_hf = agreement(done, hf) if hf else ""
            if done.status == "ok" and done.rows:
                done.sol_seconds = round(sol_seconds(job_cost(cost, lengths, budgets, done.rows, prefill_tokens),
                                                     limits), 4)
                done.sol_fraction = round(done.sol_seconds / done.generate_seconds, 4) \
                    if done.generate_seconds > 0 else 0.0
        write_outputs(args, device, {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": machine_name(device), "parameters": params, "limits": asdict(limits),
            "model_cost": asdict(cost), "job_cost": asdict(job) | {"rows": args.batch_size},
            "results": [asdict(r) | {"completions": None} for r in results],
            "microbench": [asdict(m) for m in micro]}, markdown(results, args, params, prompts, device, limits, job,
                                                               micro))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts_file = write_prompts(work / "prompts.jsonl", prompts)
        model_dir = save_model(model, tokenizer, work / "model")
        add(measure_distgen("distgen, defaults", args, work, prompts_file, model_dir, [], left() * 0.4))
        try:
            add(run_hf_static(args, prompts, tokenizer, model, device))
        except Exception as err:  # a failing baseline is reported, the others still run
            add(Result("HF generate, static batches", f"failed: {type(err).__name__}: {err}"[:300]))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for variant in VARIANTS:
            add(run_variant(variant, args, work, prompts_file, model_dir, device, left()))
    print(markdown(results, args, params, prompts, device, limits, job, micro))
    return 0 if all(r.status == "ok" or r.status.startswith("not run") for r in results) else 1


def write_outputs(args, device: torch.device, record: dict, text: str) -> None:
    """--out-md/--out-json, and gpu-<card>-<date>.md/.json in --results-dir."""
    paths = [(args.out_md, text), (args.out_json, json.dumps(record, indent=2) + "\n")]
    if args.results_dir:
        stem = f"gpu-{card_slug(device)}-{datetime.date.today():%Y-%m-%d}"
        paths += [(args.results_dir / f"{stem}.md", text),
                  (args.results_dir / f"{stem}.json", json.dumps(record, indent=2) + "\n")]
    for path, content in paths:
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)


def run_variant(variant: Variant, args, work: Path, prompts_file: Path, model_dir: Path, device: torch.device,
                left: float) -> Result:
    overrides = [o.format(batch_size=args.batch_size) for o in variant.overrides]
    env = dict(variant.env)
    if variant.cuda_only and device.type != "cuda":
        return Result(variant.name, "not run: a CUDA matter", overrides=overrides, env=env)
    if not all(composes(o) for o in overrides):
        return Result(variant.name, "not run: a setting this branch lacks", overrides=overrides, env=env)
    if left < MIN_VARIANT_SECONDS:
        return Result(variant.name, f"not run: time limit ({left:.0f}s left)", overrides=overrides, env=env)
    return measure_distgen(variant.name, args, work, prompts_file, model_dir, overrides, left - 5, env)


if __name__ == "__main__":
    sys.exit(main())
