"""Generation throughput and memory side by side, in one run, on this machine's devices.

    .venv/bin/python bench/throughput.py [--layers 4 --hidden 256 --prompts 32 --new-tokens 32]

Saves a random-init Llama of the given size and runs the same job (prompts with varied
budgets) as: 1 rank with continuous batching, 1 rank with static batches, 1 rank at batch
size 1, 2 replicate ranks and 2 FSDP ranks; prints each job's tokens/s and its ratio to the
first. Peak memory per rank comes from each job's stats.json.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from engine import model_parser, tiny_config
from jobs import run_job, write_prompts

from distgen.models.tiny import save_tiny


def main() -> None:
    parser = model_parser(__doc__, layers=4, hidden=256, prompts=32, batch_size=8, threads=False)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = save_tiny(work / "model", tiny_config(args))
        write_prompts(work / "prompts.jsonl", args.prompts, args.new_tokens)
        common = [f"model={model}", f"dataset={work / 'prompts.jsonl'}",
                  f"generation.max_new_tokens={args.new_tokens}", "generation.eos_token_ids=[]"]
        batched = [*common, f"generation.batch_size={args.batch_size}"]
        jobs = [("1 rank, continuous", 1, [*batched, "layout=replicate"]),
                ("1 rank, static batch", 1, [*batched, "generation.scheduler=static", "layout=replicate"]),
                ("1 rank, batch 1", 1, [*common, "generation.batch_size=1", "layout=replicate"]),
                ("2 ranks replicate", 2, [*batched, "layout=replicate"]),
                ("2 ranks fsdp", 2, [*batched, "layout=fsdp"])]
        results = [(name, run_job(name.replace(" ", "_").replace(",", ""), n, o, work)) for name, n, o in jobs]
    base = results[0][1]["summary"]["tokens_per_second"]
    print(f"model: {args.layers} layers, hidden {args.hidden}; {args.prompts} prompts, budgets up to {args.new_tokens} tokens")
    print("memory columns: one figure per rank, MiB; 'load' is peak RSS once the model is placed")
    print(f"{'job':<22} {'tok/s':>8} {'vs 1 rank':>9} {'load RSS':>12} {'peak RSS':>12} {'peak CUDA':>12}")
    for name, stats in results:
        tps = stats["summary"]["tokens_per_second"]
        per_rank = {key: " / ".join(f"{r[key]:.0f}" for r in stats["ranks"])
                    for key in ("load_peak_rss_mib", "peak_rss_mib", "cuda_peak_allocated_mib")}
        print(f"{name:<22} {tps:>8.1f} {tps / base:>8.2f}x {per_rank['load_peak_rss_mib']:>12} "
              f"{per_rank['peak_rss_mib']:>12} {per_rank['cuda_peak_allocated_mib']:>12}")


if __name__ == "__main__":
    main()
