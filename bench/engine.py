"""The engine's schedulers x KV caches, and compile on/off, side by side in one run (one process, one rank).

    python bench/engine.py [--layers 8 --hidden 512 --prompts 128 --batch-size 16 --threads 1]
    python bench/engine.py --shape qwen2.5-0.5b --prompts 16 --only 3,4,3,4

Builds a random-init Llama (or, with `--shape qwen2.5-0.5b`, a random-init model of Qwen2.5-0.5B's
shape: 24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864, a tied 151936-token head, fp32), makes prompts of 8..255 tokens with budgets 16..128 (greedy, no EOS),
and runs the same job with each configuration; prints generated tokens/s and the ratio to the
first row, by wall clock and by this process's CPU seconds (steadier on a shared machine: with one
thread, CPU seconds are what the wall clock would read on a quiet one). `--hf` adds HF `generate` on
static batches of the same prompts (sorted by length; each batch runs to its longest budget, only the
budgeted tokens count). A compiled configuration first runs a short warm-up job whose time is reported
separately as compile time (kernels persist under .cache/inductor, so a second run is warm). Rows use
generation.cpu_kernels=auto (distgen's CPU kernels where they run) unless they say "torch kernels".
Every configuration must produce the same tokens; the script says so or stops.
"""
from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch

from distgen.config import GenerationConfig, TinyModelConfig
import distgen.backends.cpu  # noqa: F401,E402  registers the CPU backend with the engine
from distgen.engine import build_engine
from distgen.parallel.loop import run_loop
from distgen.inputs.records import Prompt
from distgen.models.tiny import build_tiny_model, build_tokenizer

REPO = Path(__file__).resolve().parent.parent
CONFIGS = [  # (label, generation settings)
    ("continuous, dynamic", dict(scheduler="continuous", cache="dynamic", compile="off")),
    ("static, dynamic", dict(scheduler="static", cache="dynamic", compile="off")),
    ("continuous, static", dict(scheduler="continuous", cache="static", compile="off")),
    ("continuous, static, torch kernels", dict(scheduler="continuous", cache="static", compile="off",
                                               cpu_kernels="torch")),
    ("static, static", dict(scheduler="static", cache="static", compile="off")),
    ("chunked, static", dict(scheduler="chunked", cache="static", compile="off", prefill_chunk_tokens=256)),
    ("continuous, static, compiled", dict(scheduler="continuous", cache="static", compile="on")),
    ("chunked, static, compiled", dict(scheduler="chunked", cache="static", compile="on", prefill_chunk_tokens=256)),
]


def make_job(count: int, vocab: int, seed: int = 0) -> list[tuple[Prompt, list[int]]]:
    rng = random.Random(seed)
    job = []
    for i in range(count):
        length, budget = rng.randint(8, 255), rng.randint(16, 128)
        job.append((Prompt(i, str(i), "", budget), [rng.randrange(3, vocab) for _ in range(length)]))
    # largest budget first, then longest prompt, as the worker orders a rank's prompts (distgen.parallel.plan.decode_order)
    return sorted(job, key=lambda item: (-item[0].max_new_tokens, -len(item[1])))


def run(model, job, settings: dict, batch_size: int) -> tuple[float, float, int, dict]:
    """(wall seconds, CPU seconds, generated tokens, token ids by prompt index)."""
    cfg = GenerationConfig(max_new_tokens=128, batch_size=batch_size, eos_token_ids=[],
                           compile_cache_dir=str(REPO / ".cache" / "inductor"), **settings)
    engine = build_engine(model, job, cfg, pad_id=2, eos_ids=[], device=torch.device("cpu"))
    completions = []
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        run_loop(engine, lockstep=False, idle_step=lambda: None, device=torch.device("cpu"),
                 on_finished=completions.extend)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    engine.close()
    return seconds, cpu, sum(len(c.token_ids) for c in completions), {c.prompt.index: c.token_ids for c in completions}


def run_hf_generate(model, job, batch_size: int, pad_id: int) -> tuple[float, float, int, dict]:
    """model.generate on static batches of the (length-sorted) job, left-padded, greedy, no EOS."""
    start, cpu = time.perf_counter(), time.process_time()
    outputs = {}
    with torch.inference_mode():
        for first in range(0, len(job), batch_size):
            batch = job[first:first + batch_size]
            width = max(len(ids) for _, ids in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, (_, ids) in enumerate(batch):
                input_ids[row, width - len(ids):], mask[row, width - len(ids):] = torch.tensor(ids), 1
            out = model.generate(input_ids, attention_mask=mask, do_sample=False, pad_token_id=pad_id,
                                 eos_token_id=None, max_new_tokens=max(p.max_new_tokens for p, _ in batch))
            for row, (prompt, _) in enumerate(batch):
                outputs[prompt.index] = out[row, width:width + prompt.max_new_tokens].tolist()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, cpu, sum(len(t) for t in outputs.values()), outputs


def model_parser(doc: str, layers: int, hidden: int, prompts: int, batch_size: int,
                 threads: bool = True) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: the random Llama's size, the job and (`threads`: for one
    in-process rank) the thread count."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--prompts", type=int, default=prompts)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    if threads:
        parser.add_argument("--threads", type=int, default=1)
    return parser


def tiny_config(args: argparse.Namespace) -> TinyModelConfig:
    """The random-init Llama `args` describe: 8 heads, 4 KV heads, an MLP 3x the hidden size."""
    return TinyModelConfig(layers=args.layers, hidden_size=args.hidden, heads=8, kv_heads=4,
                           intermediate_size=args.hidden * 3, init_std=0.02)


def model_from_args(args: argparse.Namespace):
    """Set the thread count and build the tokenizer and the random-init Llama `args` describe."""
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    return tokenizer, build_tiny_model(tiny_config(args), tokenizer)


def qwen_shaped(seed: int = 0):
    """A random-init model of Qwen2.5-0.5B's shape (fp32, ~2 GiB; no download: only the shape is Qwen's)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=4096, use_sliding_window=False, initializer_range=0.02,
                         rope_theta=1000000.0)
    return Qwen2ForCausalLM(config).eval()


def main() -> None:
    parser = model_parser(__doc__, layers=8, hidden=512, prompts=128, batch_size=16)
    parser.add_argument("--shape", choices=("llama", "qwen2.5-0.5b"), default="llama",
                        help="llama: the random Llama of --layers/--hidden; qwen2.5-0.5b: that model's shape")
    parser.add_argument("--only", default="", help="comma-separated row numbers to run (1-based), e.g. 1,3,6")
    parser.add_argument("--hf", action="store_true", help="also run HF generate on sorted static batches")
    args = parser.parse_args()
    tokenizer, model = model_from_args(args)
    if args.shape == "qwen2.5-0.5b":
        model = qwen_shaped()
        described = "Qwen2.5-0.5B's shape (24 layers, hidden 896, tied 151936-token head)"
    else:
        described = f"{args.layers} layers, hidden {args.hidden}"
    job = make_job(args.prompts, model.config.vocab_size)
    chosen = [CONFIGS[int(k) - 1] for k in args.only.split(",")] if args.only else CONFIGS
    print(f"model: {described}; {args.prompts} prompts of 8-255 tokens, budgets "
          f"16-128, batch {args.batch_size}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    rows, reference = [], None
    for label, settings in chosen:
        compile_s = 0.0
        if settings["compile"] == "on":  # warm-up job of the same shapes: the compile happens here
            start = time.perf_counter()
            longest_life = max(job, key=lambda item: len(item[1]) + item[0].max_new_tokens)
            run(model, [longest_life], settings, args.batch_size)  # same slot columns as the job
            compile_s = time.perf_counter() - start
        seconds, cpu, tokens, outputs = run(model, job, settings, args.batch_size)
        if reference is None:
            reference = outputs
        elif outputs != reference:
            raise SystemExit(f"{label}: tokens differ from {chosen[0][0]}")
        rows.append((label, tokens / seconds, tokens / cpu, seconds, compile_s))
        print(f"  {label}: {tokens / seconds:.1f} tok/s, {tokens / cpu:.1f} tok/CPU-s", flush=True)
    print(f"all {len(rows)} configurations produced identical tokens")
    if args.hf:
        seconds, cpu, tokens, outputs = run_hf_generate(model, job, args.batch_size, pad_id=2)
        same = sum(outputs[k] == v for k, v in reference.items())
        rows.append(("hf generate, sorted static", tokens / seconds, tokens / cpu, seconds, 0.0))
        print(f"  hf generate: {tokens / seconds:.1f} tok/s; same tokens as distgen on {same}/{len(reference)} "
              "prompts (left padding in a batch may flip a near-tie)", flush=True)
    base, base_cpu = rows[0][1], rows[0][2]
    print(f"{'configuration':<32} {'tok/s':>8} {'ratio':>7} {'tok/CPU-s':>10} {'ratio':>7} {'seconds':>8} "
          f"{'compile s':>10}")
    for label, tps, tpc, seconds, compile_s in rows:
        print(f"{label:<32} {tps:>8.1f} {tps / base:>6.2f}x {tpc:>10.1f} {tpc / base_cpu:>6.2f}x {seconds:>8.1f} "
              f"{compile_s:>10.1f}")


if __name__ == "__main__":
    main()
