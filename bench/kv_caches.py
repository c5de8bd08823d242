"""Every KV cache this device runs (the cache table) and every quantized backend installed, on one job, side
by side in one run (one process, one rank): tokens/s and peak KV-cache bytes as ratios to the dynamic cache,
and how many tokens agree with it (a quantized cache changes some; full-precision caches must agree).

    .venv/bin/python bench/kv_caches.py [--layers 4 --hidden 256 --prompts 32 --batch-size 8]
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/engine.py's job
from engine import make_job, model_from_args, model_parser  # noqa: E402

from distgen.config import GenerationConfig  # noqa: E402
import distgen.backends.cpu  # noqa: F401,E402  registers the CPU backend with the engine
from distgen.engine import build_engine  # noqa: E402
from distgen.engine.kv import CACHES  # noqa: E402
from distgen.engine.kv.quantized import QUANT_BACKENDS, missing_package  # noqa: E402
from distgen.outputs.stats import tensor_bytes  # noqa: E402

CPU = torch.device("cpu")
STATE_FIELDS = ("keys", "values", "key_scales", "value_scales", "_quantized_keys", "_quantized_values")


def state_bytes(kv) -> int:
    """Bytes the cache holds now: every layer's tensors (quantized ones as stored, scales included)."""
    total = 0
    for layer in getattr(kv, "cache", None).layers if getattr(kv, "cache", None) is not None else []:
        for name in STATE_FIELDS:
            value = getattr(layer, name, None)
            for tensor in value if isinstance(value, tuple) else [value]:
                if isinstance(tensor, torch.Tensor):
                    total += tensor_bytes(tensor)
                elif isinstance(tensor, dict):  # hqq's meta: scales and zeros
                    total += sum(tensor_bytes(t) for t in tensor.values() if isinstance(t, torch.Tensor))
    return total


def configurations() -> list[tuple[str, dict]]:
    rows = [(name, dict(cache=name)) for name, entry in CACHES.entries.items()
            if CPU.type in entry.impl.devices and name not in ("quantized", "sliding_window")]
    for backend in QUANT_BACKENDS.names():
        if not missing_package(QUANT_BACKENDS.get(backend)):
            for bits in QUANT_BACKENDS.get(backend).bits[:2]:
                rows.append((f"quantized {backend} {bits}-bit",
                             dict(cache="quantized", cache_quant_backend=backend, cache_quant_bits=bits)))
    return rows


def run(model, job, settings: dict, batch_size: int, measure: bool) -> tuple[float, int, int, dict]:
    cfg = GenerationConfig(max_new_tokens=128, batch_size=batch_size, eos_token_ids=[], compile="off", **settings)
    engine = build_engine(model, job, cfg, pad_id=2, eos_ids=[], device=CPU)
    completions, peak = [], 0
    start = time.perf_counter()
    with torch.no_grad():
        while engine.has_work:
            completions += engine.step()
            if measure:
                peak = max(peak, state_bytes(engine.kv))
    seconds = time.perf_counter() - start
    engine.close()
    return seconds, sum(len(c.token_ids) for c in completions), peak, {c.prompt.index: c.token_ids for c in completions}


def agreement(outputs: dict, reference: dict) -> float:
    same = sum(a == b for index in reference for a, b in zip(outputs[index], reference[index]))
    return same / sum(len(tokens) for tokens in reference.values())


def main() -> None:
    args = model_parser(__doc__, layers=4, hidden=256, prompts=32, batch_size=8).parse_args()
    tokenizer, model = model_from_args(args)
    job = make_job(args.prompts, len(tokenizer))
    print(f"model: {args.layers} layers, hidden {args.hidden}; {args.prompts} prompts of 8-255 tokens, budgets "
          f"16-128, batch {args.batch_size}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    rows, reference = [], None
    for label, settings in configurations():
        seconds, tokens, _, outputs = run(model, job, settings, args.batch_size, measure=False)
        peak = run(model, job, settings, args.batch_size, measure=True)[2]
        reference = reference or outputs
        rows.append((label, tokens / seconds, peak, agreement(outputs, reference)))
        print(f"  {label}: {tokens / seconds:.1f} tok/s, peak KV {peak / 2**20:.2f} MiB", flush=True)
    base_tps, base_peak = rows[0][1], rows[0][2]
    print(f"{'cache':<26} {'tok/s':>8} {'ratio':>7} {'peak KV MiB':>12} {'ratio':>7} {'tokens agree':>13}")
    for label, tps, peak, agree in rows:
        print(f"{label:<26} {tps:>8.1f} {tps / base_tps:>6.2f}x {peak / 2**20:>12.2f} {peak / base_peak:>6.2f}x "
              f"{agree:>12.1%}")


if __name__ == "__main__":
    main()
