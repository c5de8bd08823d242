"""The four layouts side by side, in one run: tokens/s and per-rank memory as ratios to replicate.

    .venv/bin/python bench/layouts.py [--layers 4 --hidden 256 --prompts 16 --new-tokens 16]

Saves a random-init Llama of the given size and runs the same job (prompts with varied budgets)
on 2 ranks as: replicate, fsdp, zero3 with per-step gathers, zero3 with gather_for_generation,
device_map in memory and device_map with most of the model offloaded to disk. Then the lockstep
layouts again at several `generation.sync_every` cadences (how often ranks all-reduce whether any
still has work), which is what the default cadence was picked from.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from engine import model_parser, tiny_config
from jobs import run_job, write_prompts

from distgen.models.tiny import save_tiny

MIB = 1024 * 1024


def per_rank(stats: dict, key: str) -> list[float]:
    return [rank[key] for rank in stats["ranks"]]


def row(name: str, stats: dict, base: dict) -> str:
    tps, base_tps = stats["summary"]["tokens_per_second"], base["summary"]["tokens_per_second"]
    params = per_rank(stats, "param_mib")
    disk = per_rank(stats, "disk_param_mib")
    rss = per_rank(stats, "peak_rss_mib")
    cuda = per_rank(stats, "cuda_peak_allocated_mib")
    base_params, base_rss = max(per_rank(base, "param_mib")), max(per_rank(base, "peak_rss_mib"))
    base_cuda = max(per_rank(base, "cuda_peak_allocated_mib"))
    cuda_ratio = f"{max(cuda) / base_cuda:.2f}x" if base_cuda else "-"
    return (f"{name:<28} {tps:>7.1f} {tps / base_tps:>6.2f}x {max(params):>9.1f} {max(params) / base_params:>6.2f}x "
            f"{max(disk):>7.1f} {max(rss):>8.0f} {max(rss) / base_rss:>6.2f}x {max(cuda):>8.0f} {cuda_ratio:>6}")


def main() -> None:
    parser = model_parser(__doc__, layers=4, hidden=256, prompts=16, batch_size=4, threads=False)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--sync-every", default="1,4,16", help="cadences for the lockstep layouts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = save_tiny(work / "model", tiny_config(args))
        weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        write_prompts(work / "prompts.jsonl", args.prompts, args.new_tokens)
        common = [f"model={model}", f"dataset={work / 'prompts.jsonl'}", f"generation.max_new_tokens={args.new_tokens}",
                  "generation.eos_token_ids=[]", f"generation.batch_size={args.batch_size}"]
        zero3 = ["layout=zero3", "layout.param_persistence_threshold=0"]
        jobs = [("replicate", ["layout=replicate"]),
                ("fsdp", ["layout=fsdp"]),
                ("zero3, per-step gathers", zero3),
                ("zero3, gather_for_generation", [*zero3, "layout.gather_for_generation=true"]),
                ("device_map, in memory", ["layout=device_map"]),
                # Memory for about a third of the weights: the rest is read from disk every forward.
                ("device_map, disk offload", ["layout=device_map", f"+layout.max_memory.cpu={weights // 3}"])]
        cadences = [int(k) for k in args.sync_every.split(",")]
        sync_jobs = [(f"{name} sync_every={k}", [*overrides, f"generation.sync_every={k}"])
                     for name, overrides in (("fsdp", ["layout=fsdp"]), ("zero3", zero3)) for k in cadences]
        results = []
        for name, overrides in jobs + sync_jobs:
            slug = name.replace(" ", "_").replace(",", "").replace("=", "")
            results.append((name, run_job(slug, 2, [*common, *overrides], work)))
            print(f"done: {name}", flush=True)
    base = results[0][1]
    print(f"\nmodel: {args.layers} layers, hidden {args.hidden} ({weights / MIB:.1f} MiB of weights); 2 ranks; "
          f"{args.prompts} prompts, budgets up to {args.new_tokens} tokens")
    print("memory: the largest rank's figure, MiB; params = parameter bytes resident after placement")
    print(f"{'job':<28} {'tok/s':>7} {'ratio':>7} {'params':>9} {'ratio':>7} {'disk':>7} {'peakRSS':>8} {'ratio':>7} "
          f"{'peakCUDA':>8} {'ratio':>6}")
    for name, stats in results:
        print(row(name, stats, base))


if __name__ == "__main__":
    main()
