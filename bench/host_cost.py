"""The host's bookkeeping per decode step (schedule, launch, land: Python per row), without the forward.

    PYTHONPATH=$PWD .venv/bin/python bench/host_cost.py                  # 256 and 512 rows, CPU
    PYTHONPATH=$PWD .venv/bin/python bench/host_cost.py --rows 512 --stops --repeats 5

The pipelined engine launches step N+1 while step N runs, so on a GPU this work must stay well under the device's
step (~1-2 ms at 256-512 rows on the 1B bench job) or the device waits for Python. An engine over a 1-layer model
(CPU, the varlen slot cache, greedy, no EOS) prefills `rows` prompts of 8 tokens, decodes a few steps, then its
decode runner hands back one real step's outputs every step, so what a step costs is the host's work alone.
`--stops` checks stop strings every step, as a job's worker does. Prints milliseconds per step, wall and CPU
(time.process_time: the machine may be shared), for each of `--repeats` runs of `--steps` steps.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaForCausalLM

from distgen.config import GenerationConfig, TinyModelConfig
from distgen.engine import build_engine
from distgen.engine.core import Engine
from distgen.engine.request import Status
from distgen.engine.stops import StopStrings
from distgen.inputs.records import Prompt
from distgen.models.tiny import build_tokenizer, tiny_llama_config

BUDGET = 1000  # tokens per request (the cache holds rows x BUDGET columns): none finishes while measured


def decoding_engine(rows: int, stops: bool) -> Engine:
    """An engine whose `rows` requests all decode, its decode runner replaying one step's outputs."""
    tokenizer = build_tokenizer()
    shape = TinyModelConfig(layers=1, hidden_size=64, heads=4, kv_heads=2, intermediate_size=128)
    model = LlamaForCausalLM(tiny_llama_config(shape, tokenizer)).eval()
    gen = GenerationConfig(batch_size=rows, max_new_tokens=BUDGET, compile="off", eos_token_ids=[],
                           cpu_kernels="torch", attention="varlen_reference", prefill_chunk_tokens=8192)
    queue = [(Prompt(i, str(i), "", BUDGET), [3 + (i * 7 + j) % 250 for j in range(8)]) for i in range(rows)]
    engine = build_engine(model, queue, gen, tokenizer.pad_token_id, [], torch.device("cpu"),
                          stop_check=StopStrings(tokenizer).hit if stops else None)
    while engine.waiting or any(r.status is not Status.DECODING for r in engine.running):
        engine.step()
    for _ in range(3):
        engine.step()
    out = engine.decoder.run(engine.kv, engine.running)
    engine.decoder.run = lambda kv, requests: out
    return engine


def per_step(engine: Engine, steps: int) -> tuple[float, float]:
    """Wall and CPU milliseconds per step over `steps` steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - wall) / steps * 1e3, (time.process_time() - cpu) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stops", action="store_true", help="check stop strings every step (as a job does)")
    args = parser.parse_args()
    if args.steps * args.repeats > BUDGET - 10:
        parser.error(f"--steps x --repeats must stay under {BUDGET - 10} (each request's budget)")
    torch.set_num_threads(1)
    with torch.no_grad():
        for rows in args.rows:
            engine = decoding_engine(rows, args.stops)
            runs = [per_step(engine, args.steps) for _ in range(args.repeats)]
            print(f"rows {rows}: host ms per decode step, wall {' '.join(f'{w:.3f}' for w, _ in runs)}; "
                  f"cpu {' '.join(f'{c:.3f}' for _, c in runs)}")


if __name__ == "__main__":
    main()
