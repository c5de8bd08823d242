"""Assisted (speculative) generation vs plain decoding, side by side in one run (one process, one rank).

    python bench/assisted.py [--layers 8 --draft-layers 1 --hidden 512 --prompts 16 --batch-size 8 --threads 1]

Builds a random-init Llama and two jobs (greedy, no EOS, budgets 32..96):
  - "mixed": prompts of random tokens; assisted by a draft made of the main model's own first
    `--draft-layers` decoder layers (plus its embeddings, norm and head), constant and heuristic.
    A random-init model's later layers change its argmax completely (such a draft agrees on almost no
    token), so the main model's later layers are scaled to refine: their attention and MLP outputs
    times `--refine-scale` (0.02: about 75% of draft tokens accepted), standing in for a trained
    model whose first layers already agree often;
  - "repetitive": prompts that repeat a short random phrase; assisted by prompt lookup (no draft model).
Each job first runs plain (continuous batching, slot cache), then each assisted configuration; prints
generated tokens/s, the ratio to the plain run of the same job and the draft acceptance rate. Every
configuration must produce the plain run's tokens; the script says so or stops.
"""
from __future__ import annotations

import copy
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/engine.py's model arguments
from engine import model_from_args, model_parser  # noqa: E402

from distgen.config import GenerationConfig  # noqa: E402
import distgen.backends.cpu  # noqa: F401,E402  registers the CPU backend with the engine
from distgen.engine import build_engine  # noqa: E402
from distgen.engine.assist import AssistantSpec  # noqa: E402
from distgen.parallel.loop import run_loop  # noqa: E402
from distgen.inputs.records import Prompt  # noqa: E402


def make_job(count: int, vocab: int, repetitive: bool, seed: int = 0) -> list[tuple[Prompt, list[int]]]:
    rng = random.Random(seed)
    job = []
    for i in range(count):
        budget = rng.randint(32, 96)
        if repetitive:
            phrase = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 12))]
            ids = phrase * rng.randint(4, 10)
        else:
            ids = [rng.randrange(3, vocab) for _ in range(rng.randint(16, 128))]
        job.append((Prompt(i, str(i), "", budget), ids))
    return sorted(job, key=lambda item: -len(item[1]))  # longest first, as the worker orders a rank's prompts


def first_layers(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """The main model cut after its first `layers` decoder layers: a draft that shares its weights' start."""
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:layers]
    draft.config.num_hidden_layers = layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:layers]
    return draft


def weaken_later_layers(model: torch.nn.Module, first: int, scale: float) -> None:
    """Scale what decoder layers `first`.. add to the residual stream (o_proj, down_proj) by `scale`."""
    with torch.no_grad():
        for layer in model.model.layers[first:]:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)


def run(model, job, batch_size: int, assistant=None, **settings) -> tuple[float, int, dict, float]:
    cfg = GenerationConfig(max_new_tokens=96, batch_size=batch_size, eos_token_ids=[], compile="off",
                           cache="static", **settings)
    engine = build_engine(model, job, cfg, pad_id=2, eos_ids=[], device=torch.device("cpu"), assistant=assistant)
    completions = []
    start = time.perf_counter()
    with torch.no_grad():
        run_loop(engine, lockstep=False, idle_step=lambda: None, device=torch.device("cpu"),
                 on_finished=completions.extend)
    seconds = time.perf_counter() - start
    acceptance = engine.assistant.counters.acceptance if engine.assistant else float("nan")
    engine.close()
    return seconds, sum(len(c.token_ids) for c in completions), {c.prompt.index: c.token_ids for c in completions}, \
        acceptance


def main() -> None:
    parser = model_parser(__doc__, layers=8, hidden=512, prompts=16, batch_size=8)
    parser.add_argument("--draft-layers", type=int, default=1)
    parser.add_argument("--refine-scale", type=float, default=0.02)
    args = parser.parse_args()
    tokenizer, model = model_from_args(args)
    weaken_later_layers(model, args.draft_layers, args.refine_scale)
    draft = AssistantSpec("draft", first_layers(model, args.draft_layers))
    lookup = AssistantSpec("prompt_lookup")
    plans = [  # (job, label, assistant, generation settings)
        ("mixed", "plain", None, {}),
        ("mixed", f"draft ({args.draft_layers} layers), constant 5", draft, {}),
        ("mixed", f"draft ({args.draft_layers} layers), heuristic", draft, {"assistant_schedule": "heuristic"}),
        ("repetitive", "plain", None, {}),
        ("repetitive", "prompt lookup, constant 5", lookup, {}),
        ("repetitive", "prompt lookup, heuristic", lookup, {"assistant_schedule": "heuristic"}),
    ]
    jobs = {name: make_job(args.prompts, len(tokenizer), name == "repetitive") for name in ("mixed", "repetitive")}
    print(f"model: {args.layers} layers (after layer {args.draft_layers} scaled by {args.refine_scale}), hidden "
          f"{args.hidden}; {args.prompts} prompts per job, budgets 32-96, batch "
          f"{args.batch_size}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    rows, plain = [], {}
    for job_name, label, assistant, settings in plans:
        seconds, tokens, outputs, acceptance = run(model, jobs[job_name], args.batch_size, assistant, **settings)
        if assistant is None:
            plain[job_name] = (tokens / seconds, outputs)
        elif outputs != plain[job_name][1]:
            raise SystemExit(f"{job_name} / {label}: tokens differ from the plain run")
        rows.append((job_name, label, tokens / seconds, tokens / seconds / plain[job_name][0], acceptance, seconds))
        print(f"  {job_name} / {label}: {tokens / seconds:.1f} tok/s", flush=True)
    print("every assisted configuration produced its plain run's tokens")
    print(f"{'job':<11} {'configuration':<32} {'tok/s':>8} {'ratio':>7} {'accepted':>9} {'seconds':>8}")
    for job_name, label, tps, ratio, acceptance, seconds in rows:
        accepted = "-" if acceptance != acceptance else f"{100 * acceptance:.0f}%"
        print(f"{job_name:<11} {label:<32} {tps:>8.1f} {ratio:>6.2f}x {accepted:>9} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
