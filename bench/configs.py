"""distgen's own settings side by side: one job, run through distgen's CLI once per configuration of a suite.

    .venv/bin/python bench/configs.py engine        # schedulers x KV caches, CPU kernels, compile, batch 1
    .venv/bin/python bench/configs.py caches        # every KV cache that runs here, every quantized backend
    .venv/bin/python bench/configs.py quantization  # every weight quantizer that runs here
    .venv/bin/python bench/configs.py layouts       # 2 ranks: replicate, fsdp, zero3, device_map, sync cadences
    .venv/bin/python bench/configs.py assisted-draft assisted-lookup   # speculative decoding
    .venv/bin/python bench/configs.py prefix       # 512 prompts sharing a 1k-token prefix: prefix_sharing off/auto
    .venv/bin/python bench/configs.py engine --only "continuous, static" "continuous, static, torch kernels"
    .venv/bin/python bench/configs.py engine --model qwen2.5-0.5b --prompts 16 --only "continuous, static" \
        "continuous, static, torch kernels"      # Qwen2.5-0.5B's shape, random-init (~2 GiB saved once)

Each suite (SUITES) names a model (bench/common.py MODELS), a job (bench/common.py make_prompts: prompts
with varied lengths and budgets, greedy, no EOS) and its configurations (distgen overrides and a rank
count). Every configuration runs under the same core binding and threads (--cores/--threads, as in
bench/peers.py; a 2-rank configuration splits the threads), --repeats times, the order alternating; each
run records its process tree's CPU seconds and the load from elsewhere, and a loaded run (more than 0.5
cores busy elsewhere) is left out of the medians and the headline ratios. The table gives each
configuration's medians as ratios to the suite's first, and how many completions equal the first's token
for token (full-precision configurations must agree; quantized ones may not). Writes
bench/results/configs-SUITE-MODEL.{md,json,png}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import (MODELS, RESULTS, BenchPrompt, Binding, compile_seconds, distgen_launch,  # noqa: E402
                          generate_seconds, load_average, machine, make_prompts, run_distgen, save_model, shared_prefix,
                          write_prompts)
from bench.report import (Equality, Run, check_equality, headline, markdown_table, median_figures,  # noqa: E402
                          usage_table, write_chart)

# The table's columns (bench/report.py COLUMNS).
METRICS = ("gen_tok_s", "startup_s", "end_to_end_s", "peak_mib", "growth_mib", "param_mib", "compile_s", "acceptance")
# A shared-prefix suite's: the prompt tokens run and the seconds of the steps that ran them.
PREFIX_METRICS = ("gen_tok_s", "prefill_s", "prefill_tok", "end_to_end_s", "peak_mib")


@dataclass(frozen=True)
class Config:
    name: str
    overrides: tuple[str, ...] = ()
    ranks: int = 1


@dataclass(frozen=True)
class Suite:
    name: str
    about: str
    model: str  # MODELS key
    prompts: int
    batch_size: int
    budgets: tuple[int, int]
    # The configurations, given the saved model's folder (a suite may keep more models beside it).
    configs: Callable[[Path], list[Config]]
    repetitive: bool = False
    # Saves the suite's model into the folder given; default: bench/common.py save_model.
    build: Optional[Callable[[str, Path], Path]] = None
    exact: bool = True  # every configuration must produce the first's tokens
    # Every prompt starts with one text of this many tokens (a system prompt); the prompts' own text follows.
    shared_prefix: int = 0
    metrics: tuple[str, ...] = METRICS


def engine_configs(model: Path) -> list[Config]:
    static = ("generation.cache=static", "generation.compile=off")
    return [
        Config("continuous, dynamic", ("generation.scheduler=continuous", "generation.cache=dynamic",
                                       "generation.compile=off")),
        Config("static, dynamic", ("generation.scheduler=static", "generation.cache=dynamic",
                                   "generation.compile=off")),
        Config("continuous, static", ("generation.scheduler=continuous", *static)),
        Config("continuous, static, torch kernels", ("generation.scheduler=continuous", *static,
                                                     "generation.cpu_kernels=torch")),
        Config("static, static", ("generation.scheduler=static", *static)),
        Config("chunked, static", ("generation.scheduler=chunked", *static, "generation.prefill_chunk_tokens=256")),
        Config("continuous, static, compiled", ("generation.scheduler=continuous", "generation.cache=static",
                                                "generation.compile=on")),
        Config("continuous, static, batch 1", ("generation.scheduler=continuous", *static,
                                               "generation.batch_size=1")),
    ]


def cache_configs(model: Path) -> list[Config]:
    """Every KV cache of distgen's table that runs on CPU (the quantized one once per backend installed and
    per bit width it offers first)."""
    from distgen.engine.kv import CACHES
    from distgen.engine.kv.quantized import QUANT_BACKENDS, missing_package
    configs = [Config(name, (f"generation.cache={name}", "generation.compile=off"))
               for name, entry in CACHES.entries.items()
               if "cpu" in entry.impl.devices and name not in ("quantized", "sliding_window")]
    for backend in QUANT_BACKENDS.names():
        if not missing_package(QUANT_BACKENDS.get(backend)):
            configs += [Config(f"quantized {backend} {bits}-bit", (
                "generation.cache=quantized", f"generation.cache_quant_backend={backend}",
                f"generation.cache_quant_bits={bits}", "generation.compile=off"))
                for bits in QUANT_BACKENDS.get(backend).bits[:2]]
    return configs


def quantization_configs(model: Path) -> list[Config]:
    from distgen.models.quantizers import QUANTIZERS
    return [Config(name, (f"model.quantization={name}",)) for name in QUANTIZERS.names()
            if "cpu" in QUANTIZERS.get(name).devices]


def layout_configs(model: Path) -> list[Config]:
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    zero3 = ("layout=zero3", "layout.param_persistence_threshold=0")
    configs = [Config("replicate", ("layout=replicate",), 2), Config("fsdp", ("layout=fsdp",), 2),
               Config("zero3, per-step gathers", zero3, 2),
               Config("zero3, gather_for_generation", (*zero3, "layout.gather_for_generation=true"), 2),
               Config("device_map, in memory", ("layout=device_map",), 2),
               # Memory for about a third of the weights: the rest is read from disk every forward.
               Config("device_map, disk offload", ("layout=device_map", f"+layout.max_memory.cpu={weights // 3}"), 2)]
    # How often the lockstep layouts all-reduce whether any rank still has work.
    for name, overrides in (("fsdp", ("layout=fsdp",)), ("zero3", zero3)):
        configs += [Config(f"{name}, sync_every={k}", (*overrides, f"generation.sync_every={k}"), 2) for k in (4, 16)]
    return configs


# Assisted generation. A random-init model's later layers change its argmax completely (a draft made of
# its first layers would agree on almost no token), so the main model's later layers are scaled down to
# refine: what they add to the residual stream times REFINE_SCALE (0.02: about 75% of draft tokens
# accepted), standing in for a trained model whose first layers already agree often.
DRAFT_LAYERS, REFINE_SCALE = 1, 0.02


def build_draft_pair(name: str, folder: Path) -> Path:
    """MODELS[name] with its later layers scaled to refine, saved in `folder`; its first DRAFT_LAYERS layers
    (with its embeddings, norm and head) saved beside it as the draft (`folder`-draft)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    draft_folder = draft_of(folder)
    if (folder / "config.json").is_file() and (draft_folder / "config.json").is_file():
        return folder
    base = save_model(name, folder.with_name(folder.name + "-base"))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers[DRAFT_LAYERS:]:
            layer.self_attn.o_proj.weight.mul_(REFINE_SCALE)
            layer.mlp.down_proj.weight.mul_(REFINE_SCALE)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model.model.layers = model.model.layers[:DRAFT_LAYERS]
    model.config.num_hidden_layers = DRAFT_LAYERS
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:DRAFT_LAYERS]
    model.save_pretrained(draft_folder)
    tokenizer.save_pretrained(draft_folder)
    return folder


def draft_of(model: Path) -> Path:
    return model.with_name(model.name + "-draft")


def draft_configs(model: Path) -> list[Config]:
    draft = ("generation.cache=static", "model.assistant=draft", f"model.assistant_path={draft_of(model)}")
    return [Config("plain", ("generation.cache=static",)),
            Config(f"draft ({DRAFT_LAYERS} layer), constant 5", draft),
            Config(f"draft ({DRAFT_LAYERS} layer), heuristic", (*draft, "generation.assistant_schedule=heuristic"))]


def lookup_configs(model: Path) -> list[Config]:
    lookup = ("generation.cache=static", "model.assistant=prompt_lookup")
    return [Config("plain", ("generation.cache=static",)), Config("prompt lookup, constant 5", lookup),
            Config("prompt lookup, heuristic", (*lookup, "generation.assistant_schedule=heuristic"))]


def prefix_configs(model: Path) -> list[Config]:
    return [Config("prefix sharing off", ("generation.prefix_sharing=off",)),
            Config("prefix sharing auto", ("generation.prefix_sharing=auto",))]


SUITES = {suite.name: suite for suite in (
    Suite("engine", "one rank's engine: scheduler x KV cache, distgen's CPU kernels or torch's, the compiled "
          "decode step (its compile counted as start-up), batch 1", "large", 64, 16, (16, 128), engine_configs),
    Suite("caches", "every KV cache that runs on CPU and every quantized cache backend installed; their memory "
          "in the RSS growth during generation (coarse: the old in-process byte count of the cache is gone)",
          "medium", 32, 8, (16, 128), cache_configs, exact=False),
    Suite("quantization", "every weight quantizer that runs on CPU: tok/s and parameter memory",
          "large", 16, 8, (8, 32), quantization_configs, exact=False),
    Suite("layouts", "2 ranks: the four layouts (zero3 two ways, device_map in memory and offloaded to disk), "
          "then the lockstep layouts at other sync_every cadences", "medium", 16, 4, (4, 16), layout_configs),
    Suite("assisted-draft", f"plain decoding against a draft of the model's first {DRAFT_LAYERS} layer (its later "
          f"layers scaled by {REFINE_SCALE} to refine)", "large", 16, 8, (32, 96), draft_configs,
          build=build_draft_pair),
    Suite("assisted-lookup", "plain decoding against prompt lookup, on prompts that repeat a short phrase",
          "large", 16, 8, (32, 96), lookup_configs, repetitive=True),
    Suite("prefix", "prompts sharing a 1024-token prefix (a system prompt) and a question of 16-64 tokens each: "
          "the prefix prefilled once per rank and copied into each slot (prefix_sharing=auto) against every prompt "
          "prefilling it (off)", "small", 512, 8, (16, 32), prefix_configs, shared_prefix=1024,
          metrics=PREFIX_METRICS),
)}


# ---------------------------------------------------------------- running a suite

def job_overrides(model: Path, dataset: Path, suite: Suite) -> list[str]:
    """What every configuration of the suite shares (a configuration's own overrides come after: the
    last of a key wins)."""
    return [f"model={model}", f"dataset={dataset}", f"generation.batch_size={suite.batch_size}",
            f"generation.max_new_tokens={suite.budgets[1]}", "generation.eos_token_ids=[]"]


def run_config(config: Config, common: list[str], out: Path, binding: Binding, timeout_s: float) -> tuple[Run, list]:
    done = run_distgen(distgen_launch([*common, *config.overrides], out, binding, config.ranks), out, timeout_s)
    ranks = done.stats["ranks"]
    tokens = done.tokens
    gen_s = generate_seconds(done.stats)
    launch = done.measured.launch
    proposed = sum(rank.get("draft_proposed", 0) for rank in ranks)
    figures = {"gen_s": gen_s, "gen_tok_s": sum(map(len, tokens)) / gen_s if gen_s > 0 else 0.0,
               "startup_s": done.ready - launch, "end_to_end_s": done.done - launch,
               "peak_mib": done.measured.usage.peak_rss_mib, "param_mib": max(rank["param_mib"] for rank in ranks),
               # what a rank's resident memory grew by once its model was placed: the KV cache and activations
               "growth_mib": max(rank["peak_rss_mib"] - rank["load_peak_rss_mib"] for rank in ranks),
               "compile_s": compile_seconds(done.stats),
               "prefill_s": max(rank.get("prefill_step_seconds", 0.0) for rank in ranks),
               "prefill_tok": sum(rank.get("prefill_tokens", 0) for rank in ranks)}
    if proposed:
        figures["acceptance"] = sum(rank.get("draft_accepted", 0) for rank in ranks) / proposed
    return Run(config.name, 0, figures, done.measured.usage.record()), tokens


def suite_prompts(suite: Suite, args) -> list[BenchPrompt]:
    """The suite's prompts; with a shared prefix, each is that prefix and then a short text of its own."""
    if not suite.shared_prefix:
        return make_prompts(args.prompts or suite.prompts, args.seed, budgets=suite.budgets,
                            repetitive=suite.repetitive)
    prefix = shared_prefix(suite.shared_prefix, args.seed)
    return [BenchPrompt(prefix + p.text, p.budget) for p in make_prompts(
        args.prompts or suite.prompts, args.seed, lengths=(16, 64), budgets=suite.budgets)]


def build_model(suite: Suite, work: Path) -> Path:
    return (suite.build or save_model)(suite.model, work / f"model-{suite.name}-{suite.model}")


def run_suite(suite: Suite, model: Path, configs: Sequence[Config], args, binding: Binding) -> dict:
    """Every configuration `args.repeats` times, the order alternating; each configuration's first tokens
    are compared with the first configuration's."""
    work = args.work / suite.name
    prompts = suite_prompts(suite, args)
    common = job_overrides(model, write_prompts(work / "prompts.jsonl", prompts), suite)
    runs: list[Run] = []
    first_tokens: dict[str, list] = {}
    failures: dict[str, str] = {}
    for r in range(args.repeats):
        for config in (configs if r % 2 == 0 else list(reversed(configs))):
            if config.name in failures:
                continue
            slug = "".join(c if c.isalnum() else "_" for c in config.name)
            try:
                run, tokens = run_config(config, common, work / f"{slug}-{r}", binding, args.timeout)
            except (RuntimeError, ValueError) as err:
                failures[config.name] = str(err).splitlines()[0]
                print(f"[{suite.name}] {config.name}: FAILED: {err}", flush=True)
                continue
            runs.append(replace(run, repeat=r))
            first_tokens.setdefault(config.name, tokens)
            print(f"[{suite.name}] #{r} {config.name}: {run.figures['gen_tok_s']:.1f} gen tok/s, "
                  f"{run.usage['cpu_s']:.1f} CPU s, load from elsewhere {run.usage['other_load']:.2f}"
                  + (" LOADED" if run.loaded else ""), flush=True)
    reference = first_tokens.get(configs[0].name)
    if reference is None:
        raise SystemExit(f"bench/configs.py: {suite.name}: the base configuration {configs[0].name!r} did not run: "
                         f"{failures.get(configs[0].name)}")
    no_ties = [[] for _ in reference]  # no logit margins here: any difference counts
    equality: dict[str, Equality] = {name: check_equality(reference, no_ties, tokens)
                                     for name, tokens in first_tokens.items()}
    rows = [{"system": c.name, "equality": equality[c.name], "runs": [run for run in runs if run.system == c.name]}
            for c in configs if c.name in equality]
    return {"description": f"model {suite.model} ({MODELS[suite.model].describe()}); {len(prompts)} prompts, "
                           f"budgets {suite.budgets[0]}-{suite.budgets[1]}{', repetitive' if suite.repetitive else ''}"
                           f"{f', a shared prefix of {suite.shared_prefix} tokens' if suite.shared_prefix else ''}"
                           f", batch size {suite.batch_size}, greedy, no EOS",
            "rows": rows, "runs": runs, "failures": failures, "base": configs[0].name}


def write_report(suite: Suite, result: dict, out: Path, header: list[str]) -> dict[str, Path]:
    base = result["base"]
    names = [row["system"] for row in result["rows"] if row["system"] != base]
    lines = [*header, "", f"### {suite.name}: {suite.about}", "", result["description"], "",
             markdown_table(result["rows"], base, suite.metrics, unfair_note=suite.exact), "",
             *[f"- {headline(result['runs'], name, base)}" for name in names],
             *[f"- {name} did not run: {reason}" for name, reason in result["failures"].items()],
             "", "Every run, in the order it ran:", "", usage_table(result["runs"]), ""]
    paths = {kind: out / f"configs-{suite.name}-{suite.model}.{kind}" for kind in ("md", "json", "png")}
    out.mkdir(parents=True, exist_ok=True)
    paths["md"].write_text("\n".join(lines))
    paths["json"].write_text(json.dumps({
        "header": header, "suite": suite.name, "description": result["description"], "failures": result["failures"],
        "headlines": [headline(result["runs"], name, base) for name in names],
        "medians": {row["system"]: median_figures(row["runs"]) for row in result["rows"]},
        "same_tokens": {row["system"]: row["equality"].summary() for row in result["rows"]},
        "runs": [run.record() for run in result["runs"]]}, indent=1))
    write_chart({suite.name: result["runs"]}, base, paths["png"])
    return paths


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="+", choices=list(SUITES), metavar="SUITE", help=", ".join(SUITES))
    parser.add_argument("--only", nargs="+", default=[], metavar="CONFIG",
                        help="run only these configurations (by name; the first given is the base)")
    parser.add_argument("--model", choices=list(MODELS), default=None, help="the model (default: the suite's)")
    parser.add_argument("--prompts", type=int, default=0, help="prompts per job (default: the suite's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of every configuration's process tree (default: one per core of --cores, "
                             "else the suite's most ranks)")
    parser.add_argument("--cores", default=None, help="taskset core list every configuration runs on "
                        "(default: the first --threads cores); 'none': no binding")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration, the order alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-configs")
    parser.add_argument("--note", default="", help="a line for the report's header (e.g. the commit measured)")
    return parser.parse_args(argv)


def chosen(suite: Suite, model: Path, only: Sequence[str]) -> list[Config]:
    configs = suite.configs(model)
    if not only:
        return configs
    by_name = {config.name: config for config in configs}
    unknown = [name for name in only if name not in by_name]
    if unknown:
        raise SystemExit(f"--only {unknown}: suite {suite.name} has {', '.join(by_name)}")
    return [by_name[name] for name in only]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    command = shlex.join(argv if argv is not None else sys.argv[1:])
    results = {}
    for name in args.suites:
        suite = SUITES[name] if args.model is None else replace(SUITES[name], model=args.model)
        model = build_model(suite, args.work)
        configs = chosen(suite, model, args.only)
        try:
            binding = Binding.make(args.threads or (None if args.cores else max(c.ranks for c in configs)), args.cores)
            for config in configs:
                binding.per_rank(config.ranks)
        except ValueError as err:
            raise SystemExit(f"bench/configs.py: {err}")
        started = datetime.datetime.now(datetime.timezone.utc)
        header = [f"Run {started:%Y-%m-%d %H:%M} UTC: `bench/configs.py {command}`", "",
                  f"- machine: {machine().describe()}",
                  f"- binding: {binding.describe()}; every configuration the same",
                  f"- load average at start: {load_average()}",
                  f"- {args.repeats} repeat(s), the order alternating; medians over clean runs (a run with more "
                  f"than 0.5 cores busy elsewhere is LOADED and left out)"]
        if args.note:
            header.append(f"- note: {args.note}")
        results[name] = run_suite(suite, model, configs, args, binding)
        header.append(f"- load average at end: {load_average()}")
        paths = write_report(suite, results[name], args.out, header)
        print(paths["md"].read_text(), flush=True)
    return results


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
