"""What adapters chosen per record cost (model.lora={name: folder}, distgen/models/lora.py), on one process:

1. one swap (`AdapterBank.activate`): the targeted layers' base weights copied back plus each adapter's B @ A,
   packed into the CPU kernels' layout where they run; the median of `--swaps` alternating swaps;
2. a whole job, its prompts split over `--adapters` adapters (records choosing one, grouped per rank, so each
   adapter is swapped in once and the batch drains at each swap) against the same prompts all run with one
   adapter merged at load (model.lora=<folder>): generate seconds and generated tokens per second of each, from
   stats.json, `--repeats` alternating pairs.

    .venv/bin/python bench/lora.py --model large --prompts 64 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Binding, distgen_launch, machine, make_prompts, run_distgen, save_model  # noqa: E402

import distgen.backends.cpu  # noqa: E402,F401  registers the CPU kernels (apply_backends)

from distgen.models.lora import load_adapter_bank  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def save_adapter(model_dir: Path, out: Path, seed: int, rank: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").is_file():
        return out
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out)
    return out


def swap_seconds(model_dir: Path, adapters: dict[str, str], swaps: int) -> dict:
    """Median seconds of one swap, on the model packed for the CPU kernels as the engine runs it."""
    from transformers import AutoModelForCausalLM

    from distgen.config import GenerationConfig
    from distgen.engine.kernels import apply_backends

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bank = load_adapter_bank(model, adapters)
    said = apply_backends(GenerationConfig(), model, torch.device("cpu"), False, False, None)
    names = list(adapters)
    times = []
    for k in range(swaps):
        start = time.perf_counter()
        bank.activate(names[k % len(names)])
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "layers": len(bank.layers), "kernels": [k.reason for k in said],
            "base_copy_mib": bank.base_bytes() / 2**20}


def write_dataset(path: Path, prompts, names: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prompt": p.text, "max_new_tokens": p.budget,
                                        **({"lora": names[i % len(names)]} if names else {})}) + "\n"
                            for i, p in enumerate(prompts)))
    return path


def job(model_dir: Path, dataset: Path, lora: str, out: Path, batch: int, binding: Binding) -> dict:
    """One job through distgen's CLI, as every bench runs it (bench/common.py run_distgen), under `binding`."""
    overrides = [f"model={model_dir}", f"dataset={dataset}", f"model.lora={lora}", f"generation.batch_size={batch}",
                 "output.report=false"]
    run = run_distgen(distgen_launch(overrides, out, binding), out)
    rank = run.stats["ranks"][0]
    return {"generate_s": rank["generate_seconds"], "tokens": rank["generated_tokens"],
            "tok_per_s": rank["generated_tokens"] / rank["generate_seconds"], "switches": rank["adapter_switches"],
            "cpu_s": run.measured.usage.cpu_s, "load_from_elsewhere": run.measured.usage.other_load}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="large")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", default="0", help="taskset's core list for every job (none: no binding)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/distgen-bench-lora"))
    args = parser.parse_args()
    binding = Binding.make(None, args.cores)
    torch.set_num_threads(1)
    model_dir = save_model(args.model, args.work / args.model)
    names = [f"a{k}" for k in range(args.adapters)]
    adapters = {n: str(save_adapter(model_dir, args.work / f"{args.model}-{n}-r{args.rank}", k, args.rank))
                for k, n in enumerate(names)}
    result = {"machine": str(machine()), "binding": binding.describe(), "model": args.model, "rank": args.rank, "targets": TARGETS,
              "swap": swap_seconds(model_dir, adapters, args.swaps)}
    prompts = make_prompts(args.prompts)
    chosen = write_dataset(args.work / "chosen.jsonl", prompts, names)
    plain = write_dataset(args.work / "plain.jsonl", prompts, [])
    runs = {"per_record": [], "merged": []}
    by_name = "{" + ",".join(f"{n}:{f}" for n, f in adapters.items()) + "}"
    for _ in range(args.repeats):
        runs["per_record"].append(job(model_dir, chosen, by_name, args.work / "out-chosen", args.batch, binding))
        runs["merged"].append(job(model_dir, plain, adapters[names[0]], args.work / "out-merged", args.batch, binding))
    result["jobs"] = runs
    result["median_tok_per_s"] = {k: statistics.median(r["tok_per_s"] for r in v) for k, v in runs.items()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
