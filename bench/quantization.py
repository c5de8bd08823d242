"""Tokens/s and parameter bytes with each quantizer, as ratios to unquantized weights, in one run.

    .venv/bin/python bench/quantization.py [--layers 4 --hidden 512 --prompts 16 --new-tokens 32]

Saves a random-init Llama of the given size and runs the same 1-rank job (replicate) once per
quantizer that runs on this machine's device (CPU: all of them; on a GPU int8_dynamic is CPU only
and is skipped). Prints tokens/s, parameter bytes (from stats.json) and both as ratios to none.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from engine import model_parser, tiny_config  # bench/ is on sys.path when this script runs
from jobs import run_job, write_prompts

from distgen.models.quantizers import QUANTIZERS
from distgen.models.tiny import save_tiny

MIB = 1024 * 1024


def main() -> None:
    parser = model_parser(__doc__, layers=4, hidden=512, prompts=16, batch_size=8, threads=False)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [n for n in QUANTIZERS.names() if device in QUANTIZERS.get(n).devices]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = save_tiny(work / "model", tiny_config(args))
        write_prompts(work / "prompts.jsonl", args.prompts, args.new_tokens)
        common = [f"model={model}", f"dataset={work / 'prompts.jsonl'}", f"device={device}",
                  f"generation.max_new_tokens={args.new_tokens}", "generation.eos_token_ids=[]",
                  f"generation.batch_size={args.batch_size}"]
        results = [(name, run_job(name, 1, [*common, f"model.quantization={name}"], work)) for name in names]
    base_tps = results[0][1]["summary"]["tokens_per_second"]
    base_bytes = sum(results[0][1]["ranks"][0]["param_bytes"].values())
    print(f"model: {args.layers} layers, hidden {args.hidden}; {args.prompts} prompts, budgets up to "
          f"{args.new_tokens} tokens; 1 rank on {device}")
    print(f"{'quantization':<14} {'tok/s':>8} {'vs none':>8} {'param MiB':>10} {'vs none':>8}")
    for name, stats in results:
        tps, size = stats["summary"]["tokens_per_second"], sum(stats["ranks"][0]["param_bytes"].values())
        print(f"{name:<14} {tps:>8.1f} {tps / base_tps:>7.2f}x {size / MIB:>10.2f} {size / base_bytes:>7.2f}x")


if __name__ == "__main__":
    main()
