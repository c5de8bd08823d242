"""GPU benchmark: distgen's best configuration against HF `generate` with static batches, side by side.

    python3 bench/gpu.py [--out-md $OUT/bench.md --out-json $OUT/bench.json] [--time-limit 300]
    python3 bench/gpu.py --preset smoke --device cpu      # the plumbing only, in seconds, on any machine

A random-init Llama of about 1B parameters (22 layers, hidden 2048, GQA 32/4 heads), built from a
config (no download, the byte-level tokenizer of distgen.models.tiny), 512 prompts of 16-512 tokens with
budgets of 32-256 new tokens, bf16, greedy, EOS off (every prompt runs to its budget):

1. distgen, one rank, continuous batching, eager (its defaults at --batch-size rows);
2. HF `generate`, static batches of --batch-size prompts sorted by length (each batch runs to its
   largest budget; only the tokens prompts asked for count);
3. distgen's other settings (VARIANTS, in order, while the time limit allows): `generation.batch_size=auto`
   (as many rows as the memory budget holds), `generation.prefill_chunk_tokens=4096` (the default 512
   is sized for CPUs), `generation.mixed_steps=false` (what mixing decode rows into prefill forwards
   is worth), the static slot cache with the decode step compiled into CUDA graphs (`reduce-overhead`)
   at --batch-size rows, and batch_size=auto with CUDA graphs. The fastest is named best.

Each prints generated tokens/s (tokens the prompts asked for, over generation time, load excluded;
a compile is inside it and also reported on its own, with the tok/s without it), the ratio to HF,
peak CUDA memory, the rows distgen ran, and how many completions equal HF's token for token.
`scripts/gpu_check.sh` runs this; copy its bench.md into bench/results/ with the machine named.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distgen.config import TinyModelConfig  # noqa: E402
from distgen.common.errors import ConfigError  # noqa: E402
from distgen.catalog.load import load_config  # noqa: E402
from distgen.outputs.stats import cuda_peaks_mib, reset_peaks  # noqa: E402
from distgen.models.tiny import build_tiny_model, build_tokenizer  # noqa: E402

PRESETS = {  # model shape, prompts, prompt lengths and budgets (tokens), rows per batch
    "1b": dict(layers=22, hidden=2048, heads=32, kv_heads=4, intermediate=5632, prompts=512,
               min_prompt=16, max_prompt=512, min_budget=32, max_budget=256, batch_size=128),
    "smoke": dict(layers=1, hidden=64, heads=4, kv_heads=2, intermediate=128, prompts=6,
                  min_prompt=4, max_prompt=24, min_budget=2, max_budget=6, batch_size=4),
}
CUDA_GRAPHS = ("generation.compile=on", "generation.compile_mode=reduce-overhead", "generation.cache=static")


@dataclass(frozen=True)
class Variant:
    """A distgen configuration the bench runs after the eager baseline and HF."""
    name: str
    overrides: tuple[str, ...]
    cuda_only: bool = False  # CUDA graphs: nothing to measure on a CPU (the smoke preset)


VARIANTS = (  # cheapest first: a compile takes a minute or more of the time limit
    Variant("distgen, batch auto, eager", ("generation.batch_size=auto",)),
    # prompt tokens per prefill forward: 512 by default (sized for CPUs); a GPU takes thousands at once
    Variant("distgen, prefill budget 4096", ("generation.prefill_chunk_tokens=4096",)),
    # what mixed steps (the default: decoding rows ride along each prefill forward) are worth on a GPU
    Variant("distgen, no mixed steps", ("generation.mixed_steps=false",)),
    Variant("distgen, static slots, CUDA graphs", CUDA_GRAPHS, cuda_only=True),
    Variant("distgen, batch auto, CUDA graphs", ("generation.batch_size=auto", *CUDA_GRAPHS), cuda_only=True),
)
# A variant starts only with this many seconds left (a 1B model's load, compile and run).
MIN_VARIANT_SECONDS = 45
WORDS = "the model reads a prompt and writes a completion one token at a time until it is done".split()


@dataclass
class Result:
    name: str
    status: str = "ok"  # ok | failed: ... | timed out ... | not run: ...
    tokens_per_second: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    peak_allocated_mib: float = 0.0
    peak_reserved_mib: float = 0.0
    compile_seconds: float = 0.0
    rows: int = 0  # distgen: the batch size it ran (batch_size=auto: what it picked)
    equal_to_hf: str = ""
    overrides: list[str] = field(default_factory=list)
    completions: list[list[int]] = field(default_factory=list, repr=False)


def make_prompts(count: int, min_len: int, max_len: int, min_budget: int, max_budget: int) -> list[dict]:
    """Deterministic mixed lengths (one token per byte) and budgets, spread evenly over their ranges."""
    text = " ".join(WORDS * (max_len // 3 + 1))
    return [{"id": i, "prompt": text[(i * 13) % 40:][: min_len + (i * 37) % (max_len - min_len + 1)].strip() or "a",
             "max_new_tokens": min_budget + (i * 53) % (max_budget - min_budget + 1)} for i in range(count)]


def model_config(args) -> TinyModelConfig:
    return TinyModelConfig(layers=args.layers, hidden_size=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                           intermediate_size=args.intermediate, init_std=0.02, seed=0)


def model_overrides(cfg: TinyModelConfig) -> list[str]:
    return ["model=tiny", *(f"model.tiny.{key}={value}" for key, value in asdict(cfg).items())]


def composes(override: str) -> bool:
    try:
        load_config(["model=tiny", "dataset=prompts.jsonl", override])
    except ConfigError:
        return False
    return True


def run_distgen(name: str, args, work: Path, prompts_file: Path, extra: list[str], timeout: float) -> Result:
    out = work / "".join(c if c.isalnum() else "_" for c in name)
    overrides = [*model_overrides(model_config(args)), f"dataset={prompts_file}", f"output.dir={out}",
                 f"device={args.device}", f"model.dtype={args.dtype}", "generation.eos_token_ids=[]",
                 f"generation.max_new_tokens={args.max_budget}", f"generation.batch_size={args.batch_size}",
                 "output.print_table=false", "output.resume=false", "output.progress_every_s=0", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    log = work / f"{out.name}.log"
    try:
        with open(log, "w") as sink:
            done = subprocess.run([sys.executable, "-m", "distgen.run", *overrides], cwd=REPO, env=env,
                                  stdout=sink, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result(name, f"timed out after {timeout:.0f}s", overrides=extra)
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        print(f"--- {name} failed (exit {done.returncode}):\n{tail}", flush=True)
        return Result(name, f"failed: exit {done.returncode}: {error_line(tail)}", overrides=extra)
    stats = json.loads((out / "stats.json").read_text())
    [rank] = stats["ranks"]
    records = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    for line in log.read_text().splitlines():  # what the engine chose (cache, compile, kernels) and why
        if "engine:" in line:
            print(f"  {name}: {line.strip()[:400]}", flush=True)
    return Result(name, "ok", stats["summary"]["tokens_per_second"], stats["summary"]["generated_tokens"],
                  stats["summary"]["generate_seconds"], rank["cuda_peak_allocated_mib"], rank["cuda_peak_reserved_mib"],
                  rank.get("compile_seconds", 0.0), rank.get("batch_size", 0), overrides=extra,
                  completions=[r["completion_token_ids"] for r in records])


def error_line(log_tail: str) -> str:
    """The last line that names an error, else the last line: what the markdown table shows."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()] or [""]
    return next((line for line in reversed(lines) if "rror" in line), lines[-1])[:240]


def left_padded(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def run_hf_static(args, prompts: list[dict], tokenizer, device: torch.device) -> Result:
    """HF `generate`, static batches sorted by prompt length; timed after a warm-up, model load excluded."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    model = build_tiny_model(model_config(args), tokenizer).to(dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # EOS off, as for distgen: every row runs to max_new_tokens
    token_ids = [tokenizer(p["prompt"])["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(token_ids[i]), reverse=True)
    batches = [order[k:k + args.batch_size] for k in range(0, len(order), args.batch_size)]
    completions: dict[int, list[int]] = {}

    def generate(batch: list[int]) -> torch.Tensor:
        ids, mask = left_padded([token_ids[i] for i in batch], tokenizer.pad_token_id, device)
        budget = max(prompts[i]["max_new_tokens"] for i in batch)
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=budget, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]

    with torch.no_grad():
        generate(batches[-1][:2])  # warm-up: kernels, cuBLAS handles
        sync(device)
        reset_peaks(device)
        start = time.perf_counter()
        for batch in batches:
            new = generate(batch).tolist()
            for i, row in zip(batch, new):
                completions[i] = row[: prompts[i]["max_new_tokens"]]
        sync(device)
        seconds = time.perf_counter() - start
    allocated, reserved = cuda_peaks_mib(device)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    generated = sum(p["max_new_tokens"] for p in prompts)
    return Result("HF generate, static batches", "ok", round(generated / seconds, 2), generated, round(seconds, 3),
                  round(allocated, 1), round(reserved, 1), rows=args.batch_size,
                  completions=[completions[i] for i in range(len(prompts))])


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


def without_compile(result: Result) -> float:
    """tok/s over the generation time less the compile (what a longer job approaches)."""
    seconds = result.generate_seconds - result.compile_seconds
    return result.generated_tokens / seconds if seconds > 0 else 0.0


def best_distgen(results: list[Result]) -> Optional[Result]:
    done = [r for r in results if r.name.startswith("distgen") and r.status == "ok"]
    return max(done, key=lambda r: r.tokens_per_second, default=None)


def markdown(results: list[Result], args, params: int, prompts: list[dict], device: torch.device) -> str:
    import transformers
    hf = next((r for r in results if r.name.startswith("HF") and r.status == "ok"), None)
    best = best_distgen(results)
    lengths = [len(build_tokenizer()(p["prompt"])["input_ids"]) for p in prompts]
    lines = [
        f"# distgen GPU benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine_name(device)}; torch {torch.__version__}, transformers {transformers.__version__}",
        f"- model: random-init Llama, {params / 1e6:,.0f}M parameters ({args.layers} layers, hidden {args.hidden}, "
        f"{args.heads}/{args.kv_heads} heads), {args.dtype}, greedy, EOS off",
        f"- job: {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, budgets "
        f"{args.min_budget}-{args.max_budget} ({sum(p['max_new_tokens'] for p in prompts)} tokens asked for), "
        f"{args.batch_size} rows per batch",
        f"- best: {best.name} ({' '.join(best.overrides) or 'defaults'})" if best else "- best: none ran",
        "",
        "| system | rows | tok/s | vs HF | gen s | compile s | tok/s less compile | peak alloc MiB | "
        "peak reserved MiB | equal to HF | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        ratio = f"{r.tokens_per_second / hf.tokens_per_second:.2f}x" if hf and r.status == "ok" else ""
        lines.append(f"| {r.name} | {r.rows or ''} | {r.tokens_per_second:.0f} | {ratio} | {r.generate_seconds:.1f} | "
                     f"{r.compile_seconds:.1f} | {without_compile(r):.0f} | {r.peak_allocated_mib:.0f} | "
                     f"{r.peak_reserved_mib:.0f} | {r.equal_to_hf} | {r.status} |")
    lines += ["", "tok/s: tokens the prompts asked for over generation time (load excluded; HF timed after a "
              "warm-up, distgen's first step and any compile included; 'compile s' is the first compiled step). "
              "rows: the batch size (distgen's batch_size=auto: what it picked). 'equal to HF': completions "
              "identical token for token (bf16 batches of other shapes round differently, so not all need be)."]
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
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device visible; nothing measured (--device cpu runs the plumbing)")
        return 3
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    tokenizer = build_tokenizer()
    prompts = make_prompts(args.prompts, args.min_prompt, args.max_prompt, args.min_budget, args.max_budget)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts_file = work / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps(p) + "\n" for p in prompts))
        left = lambda: deadline - time.monotonic()  # noqa: E731
        results.append(run_distgen("distgen, continuous, eager", args, work, prompts_file, [], left() * 0.4))
        print(f"{results[-1].name}: {results[-1].status}, {results[-1].tokens_per_second} tok/s", flush=True)
        try:
            results.append(run_hf_static(args, prompts, tokenizer, device))
        except Exception as err:  # a failing baseline is reported, the others still run
            results.append(Result("HF generate, static batches", f"failed: {type(err).__name__}: {err}"[:300]))
        print(f"{results[-1].name}: {results[-1].status}, {results[-1].tokens_per_second} tok/s", flush=True)
        for variant in VARIANTS:
            results.append(run_variant(variant, args, work, prompts_file, device, left()))
            print(f"{results[-1].name}: {results[-1].status}, {results[-1].tokens_per_second} tok/s", flush=True)
    hf = results[1]
    for result in results:
        result.equal_to_hf = agreement(result, hf)
    params = param_count(args, tokenizer)
    table = markdown(results, args, params, prompts, device)
    if args.out_md:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(table)
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps({"args": vars(args) | {"out_md": str(args.out_md),
                                                                   "out_json": str(args.out_json)},
                                             "machine": machine_name(device), "parameters": params,
                                             "results": [asdict(r) | {"completions": None} for r in results]},
                                            indent=2) + "\n")
    print(table)
    return 0 if all(r.status == "ok" or r.status.startswith("not run") for r in results) else 1


def run_variant(variant: Variant, args, work: Path, prompts_file: Path, device: torch.device,
                left: float) -> Result:
    overrides = list(variant.overrides)
    if variant.cuda_only and device.type != "cuda":
        return Result(variant.name, "not run: CUDA graphs need a CUDA device", overrides=overrides)
    if not all(composes(o) for o in overrides):
        return Result(variant.name, "not run: a setting this branch lacks", overrides=overrides)
    if left < MIN_VARIANT_SECONDS:
        return Result(variant.name, f"not run: time limit ({left:.0f}s left)", overrides=overrides)
    return run_distgen(variant.name, args, work, prompts_file, overrides, left - 5)


def param_count(args, tokenizer) -> int:
    """Parameters of the benchmark model, counted on the meta device (no memory, no init)."""
    from distgen.models.tiny import tiny_llama_config
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(tiny_llama_config(model_config(args), tokenizer)).parameters())


if __name__ == "__main__":
    sys.exit(main())
