"""distgen against what users would pick instead, side by side in one run, on equal terms:

    bash bench/setup_peers.sh                      # once: .cache/bench-venvs/{hf,vllm}
    .venv/bin/python bench/peers.py --models large --datasets mixed --systems distgen vllm --repeats 3

The same job (same saved model, same prompts as token ids, same per-prompt budgets, greedy, fp32) runs
through every system in SYSTEMS: distgen through its CLI (1 rank; compiled; 2 ranks replicate; 2 ranks
fsdp; with DISTGEN_BEST), HF `model.generate` on static batches sorted by length (the HF baseline), HF
continuous batching (the manager behind `generate_batch`) and vLLM's offline `LLM.generate`. The peers
run bench/peer_runner.py in their own venvs, so their pins never meet distgen's.

Fair by construction: every system's process tree starts under the same `taskset -c CORES` (--cores;
default the first --threads cores; `none` binds nobody) with the same OpenMP/torch thread count (a
system of several ranks splits it), and vLLM binds its OpenMP threads to the same cores
(VLLM_CPU_OMP_THREADS_BIND; `nobind` without binding). The repeats alternate the systems' order
(A B, B A, A B, ...), so a slow minute falls on both. Every run records its process tree's CPU seconds,
the cores it was allowed, the load average before and after, and the load from elsewhere (the cores the
rest of the machine kept busy meanwhile); a run with more than 0.5 is marked LOADED and left out of the
medians and the headline ratios (a system whose every run was loaded shows its loaded medians, marked).

Per system and job the table gives the medians over clean runs of generated tokens/s, prompt tokens/s,
time to first output, startup and end to end (all from the process launch; end to end is when every
completion is available: for distgen its merged outputs.jsonl) and peak memory (RSS summed over the
process tree), each also as a ratio to distgen 1 rank; and `vs floor`: the time of bare batch-1 forwards
for exactly the needed tokens (bench/peer_runner.py `floor`) over the system's generation time. Every
system's greedy tokens are checked against the floor run's (the batch-1 reference); a difference that
starts at a near tie is allowed, any other makes the table say the comparison is unfair.

Writes bench/results/NAME.md (tables, every run with its usage, the machine and binding), NAME.json
(every run's figures and usage) and NAME.png (every run's generated tok/s, loaded runs marked);
NAME is --name (default peers).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import (MODELS, RESULTS, Binding, BenchPrompt, Launch, bench_env, distgen_launch,  # noqa: E402
                          generate_seconds, compile_seconds, load_average, machine, make_prompts, run_distgen,
                          run_measured, save_model, write_prompts)
from bench.report import (Equality, Run, check_equality, choose_eos_ids, floor_seconds, headline,  # noqa: E402
                          markdown_table, median_figures, run_figures, usage_table, write_chart)

VENVS = Path(os.environ.get("DISTGEN_BENCH_VENVS") or REPO / ".cache" / "bench-venvs")
RUNNER = REPO / "bench" / "peer_runner.py"
BASE = "distgen"

# distgen's best engine settings for this benchmark, appended to every distgen command (the batch size is
# --batch-size, shared with the peers): continuous batching over static slots; compile=auto compiles a
# job this size only on CUDA (a CPU compile costs 40-80 s each run), so a CPU run runs eager with
# distgen's CPU kernels (generation.cpu_kernels=auto).
DISTGEN_BEST: list[str] = ["generation.scheduler=continuous", "generation.cache=static", "generation.compile=auto"]
DATASETS = ("mixed", "eos")


@dataclass(frozen=True)
class System:
    name: str
    # "distgen": the distgen CLI in this venv; otherwise a bench/peer_runner.py system in `venv`.
    kind: str
    venv: str = ""
    ranks: int = 1
    layout: str = "replicate"
    settings: tuple[str, ...] = ()  # distgen settings that replace DISTGEN_BEST's (same key)


SYSTEMS = (
    System("distgen", "distgen"),
    # The compiled decode step (on CPU: frozen weights, inductor's C++ GEMMs); its compile counts as start-up.
    System("distgen compiled", "distgen", settings=("generation.compile=on",)),
    System("distgen 2x replicate", "distgen", ranks=2),
    System("distgen 2x fsdp", "distgen", ranks=2, layout="fsdp"),
    System("hf generate", "hf_generate", "hf"),
    System("hf continuous batching", "hf_cb", "hf"),
    System("vllm", "vllm", "vllm"),
)
FLOOR = System("floor", "floor", "hf")


@dataclass(frozen=True)
class Job:
    """One model and dataset, as every system receives it."""
    name: str
    model: Path
    prompts: list[BenchPrompt]
    ids: list[list[int]]  # each prompt's token ids (the benchmark models' tokenizer, BOS first)
    eos_ids: list[int]
    batch_size: int
    work: Path

    def prompt_tokens(self) -> int:
        return sum(map(len, self.ids))

    def describe(self) -> str:
        lengths, budgets = sorted(map(len, self.ids)), sorted(p.budget for p in self.prompts)
        return (f"{len(self.prompts)} prompts of {lengths[0]}-{lengths[-1]} tokens, budgets "
                f"{budgets[0]}-{budgets[-1]}, batch size {self.batch_size}, EOS ids {self.eos_ids or 'none'}")


@dataclass(frozen=True)
class Outcome:
    """What one launch of one system left: its tokens, its run (figures and usage) and its raw extras."""
    tokens: list[list[int]]
    run: Run
    raw: dict


# ---------------------------------------------------------------- what each system is started as

def distgen_settings(system: System) -> list[str]:
    """DISTGEN_BEST with the system's own settings in place of the same keys."""
    own = {setting.split("=", 1)[0]: setting for setting in system.settings}
    best = [own.pop(setting.split("=", 1)[0], setting) for setting in DISTGEN_BEST]
    return best + list(own.values())


def distgen_overrides(system: System, job: Job) -> list[str]:
    return [f"model={job.model}", f"dataset={job.work / f'{job.name}.prompts.jsonl'}", f"layout={system.layout}",
            "model.dtype=fp32", f"generation.batch_size={job.batch_size}",
            f"generation.max_new_tokens={max(p.budget for p in job.prompts)}",
            f"generation.eos_token_ids=[{','.join(map(str, job.eos_ids))}]", *distgen_settings(system)]


def venv_python(venv: str, pythons: dict[str, str]) -> str:
    if venv in pythons:
        return pythons[venv]
    python = VENVS / venv / "bin" / "python"
    if not python.is_file():
        raise FileNotFoundError(f"no venv for '{venv}' at {python.parent.parent}: run bash bench/setup_peers.sh {venv}")
    return str(python)


def job_file(job: Job, tag: str) -> Path:
    return job.work / f"{tag}.job.json"


def result_file(job: Job, tag: str) -> Path:
    return job.work / f"{tag}.result.json"


def plan(system: System, job: Job, tag: str, binding: Binding, pythons: dict[str, str]) -> Launch:
    """The command line and environment `system` starts with: every system gets the binding's taskset and
    threads (distgen's ranks split them); nothing else differs."""
    if system.kind == "distgen":
        return distgen_launch(distgen_overrides(system, job), job.work / tag, binding, system.ranks)
    command = [venv_python(system.venv, pythons), str(RUNNER), str(job_file(job, tag)), str(result_file(job, tag))]
    return Launch(binding.command(command), bench_env(binding), job.work / f"{tag}.log")


# ---------------------------------------------------------------- running them

def run_distgen_system(system: System, job: Job, tag: str, launch: Launch, floor_s: float, timeout_s: float) -> Outcome:
    done = run_distgen(launch, job.work / tag, timeout_s)
    counted = [r["prompt_tokens"] for r in done.records]
    if counted != [len(ids) for ids in job.ids]:
        raise RuntimeError(f"{system.name}: distgen tokenized the prompts differently from the benchmark")
    tokens, launched = done.tokens, done.measured.launch
    figures = run_figures(sum(map(len, tokens)), job.prompt_tokens(), generate_seconds(done.stats), launched,
                          done.ready, done.first_output, done.done, done.measured.usage.peak_rss_mib, floor_s)
    return Outcome(tokens, Run(system.name, 0, figures, done.measured.usage.record()),
                   {"stats": done.stats["summary"], "compile_s": compile_seconds(done.stats)})


def run_peer(system: System, job: Job, tag: str, launch: Launch, floor_s: float, timeout_s: float) -> Outcome:
    job_file(job, tag).write_text(json.dumps({
        "system": system.kind, "model": str(job.model), "eos_ids": job.eos_ids, "batch_size": job.batch_size,
        "prompts": [{"ids": ids, "budget": p.budget} for ids, p in zip(job.ids, job.prompts)]}))
    result_file(job, tag).unlink(missing_ok=True)
    measured = run_measured(launch, timeout_s)
    result = json.loads(result_file(job, tag).read_text())
    gen_s = result["done"] - result["ready"]
    if system.kind == "floor":  # its generation time is its forwards alone (no sampling, no bookkeeping)
        gen_s = floor_s = floor_seconds(result)
    figures = run_figures(sum(map(len, result["tokens"])), job.prompt_tokens(), gen_s, measured.launch,
                          result["ready"], result["first_output"], result["done"], measured.usage.peak_rss_mib, floor_s)
    return Outcome(result["tokens"], Run(system.name, 0, figures, measured.usage.record()),
                   {k: v for k, v in result.items() if k != "tokens"})


def run_system(system: System, job: Job, tag: str, binding: Binding, floor_s: float, timeout_s: float,
               pythons: dict[str, str]) -> Outcome:
    launch = plan(system, job, tag, binding, pythons)
    runner = run_distgen_system if system.kind == "distgen" else run_peer
    return runner(system, job, tag, launch, floor_s, timeout_s)


def alternating(systems: Sequence[System], repeat: int) -> list[System]:
    """The systems in order on even repeats, reversed on odd ones: A B, B A, A B, ..."""
    return list(systems) if repeat % 2 == 0 else list(reversed(systems))


def bench_job(job: Job, systems: Sequence[System], repeats: int, binding: Binding, timeout_s: float,
              pythons: dict[str, str], floors_done: Sequence[Outcome] = (), floor_repeats: int = 1,
              log: Callable[[str], None] = print) -> dict:
    """Floor first (it is also the reference; `floors_done` are floor runs made already), then every system
    `repeats` times, the order alternating."""
    floors = [*floors_done, *(run_system(FLOOR, job, f"{job.name}-floor-{r}", binding, 0.0, timeout_s, pythons)
                              for r in range(len(floors_done), floor_repeats))]
    reference, margins = floors[0].tokens, floors[0].raw["margins"]
    floor_s = sorted(floor_seconds(f.raw) for f in floors)[len(floors) // 2]
    log(f"[{job.name}] floor {floor_s:.2f}s for {sum(map(len, reference))} generated tokens")
    runs: list[Run] = []
    equality: dict[str, Equality] = {}
    failures: dict[str, str] = {}
    for r in range(repeats):
        for system in alternating(systems, r):
            if system.name in failures:
                continue
            tag = f"{job.name}-{system.name.replace(' ', '_')}-{r}"
            try:
                outcome = run_system(system, job, tag, binding, floor_s, timeout_s, pythons)
            except (RuntimeError, FileNotFoundError, ValueError) as err:
                failures[system.name] = str(err).splitlines()[0]
                log(f"[{job.name}] {system.name}: FAILED: {err}")
                continue
            run = replace(outcome.run, repeat=r)
            runs.append(run)
            equality.setdefault(system.name, check_equality(reference, margins, outcome.tokens))
            log(f"[{job.name}] #{r} {system.name}: {run.figures['gen_tok_s']:.1f} gen tok/s, "
                f"{run.usage['cpu_s']:.1f} CPU s, load from elsewhere {run.usage['other_load']:.2f}"
                + (" LOADED" if run.loaded else ""))
    floor_runs = [replace(f.run, repeat=r) for r, f in enumerate(floors)]
    rows = [{"system": s.name, "equality": equality[s.name], "runs": [run for run in runs if run.system == s.name]}
            for s in systems if s.name in equality]
    rows.append({"system": "floor (bare batch-1 forwards)", "equality": None, "runs": floor_runs})
    return {"rows": rows, "runs": runs, "floor_runs": floor_runs, "failures": failures, "floor_s": floor_s,
            "reference": reference, "equality": equality}


# ---------------------------------------------------------------- the report

def versions(venvs: set[str], pythons: dict[str, str]) -> dict[str, str]:
    """torch and the peer's library in each venv used (one that is this interpreter is not asked again)."""
    import torch
    import transformers
    found = {"distgen venv": f"torch {torch.__version__}, transformers {transformers.__version__}"}
    for venv in sorted(venvs):
        try:
            python = venv_python(venv, pythons)
        except FileNotFoundError:
            continue
        if Path(python).absolute() == Path(sys.executable).absolute():
            found[f"{venv} venv"] = "the distgen venv"
            continue
        module = "vllm" if venv == "vllm" else "transformers"
        probe = subprocess.run([python, "-c", f"import torch, {module} as m; print('torch', torch.__version__ + ', "
                                f"{module}', m.__version__)"], capture_output=True, text=True, timeout=300)
        found[f"{venv} venv"] = probe.stdout.strip() or "import failed"
    return found


def headlines(result: dict) -> list[str]:
    """Every system against distgen 1 rank, from clean repeat pairs only."""
    names = [row["system"] for row in result["rows"] if row["equality"] is not None and row["system"] != BASE]
    return [headline(result["runs"], name, BASE) for name in names] if any(
        row["system"] == BASE for row in result["rows"]) else []


def write_report(results: dict, out: Path, name: str, header: list[str]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    parts = [*header, ""]
    for title, result in results.items():
        parts += [f"### {title}", "", result["description"], "", markdown_table(result["rows"], BASE), ""]
        parts += [f"- {line}" for line in headlines(result)]
        parts += [f"- {system} did not run: {reason}" for system, reason in result["failures"].items()]
        parts += ["", "Every run, in the order it ran:", "", usage_table([*result["floor_runs"], *result["runs"]]), ""]
    paths = {"md": out / f"{name}.md", "json": out / f"{name}.json", "png": out / f"{name}.png"}
    paths["md"].write_text("\n".join(parts))
    paths["json"].write_text(json.dumps({"header": header, "jobs": {
        title: {"description": r["description"], "floor_s": r["floor_s"], "failures": r["failures"],
                "headlines": headlines(r), "medians": {row["system"]: median_figures(row["runs"]) for row in r["rows"]},
                "equality": {s: e.summary() for s, e in r["equality"].items()},
                "runs": [run.record() for run in [*r["floor_runs"], *r["runs"]]]}
        for title, r in results.items()}}, indent=1))
    write_chart({title: r["runs"] for title, r in results.items()}, BASE, paths["png"])
    return paths


# ---------------------------------------------------------------- entry point

def build_jobs(size: str, datasets: Sequence[str], args, binding: Binding, pythons: dict[str, str],
               log: Callable[[str], None]) -> list[tuple[Job, list[Outcome]]]:
    """Each job with the floor runs made for it already (the EOS probe is the mixed job's first)."""
    from transformers import AutoTokenizer
    work = args.work
    model = save_model(size, work / f"model-{size}")
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = make_prompts(args.prompts, args.seed, budgets=(args.min_new, args.max_new))
    ids = [tokenizer(p.text, add_special_tokens=True)["input_ids"] for p in prompts]
    mixed = Job(f"{size}-mixed", model, prompts, ids, [], args.batch_size, work)
    jobs = [mixed]
    probes: list[Outcome] = []
    if "eos" in datasets:
        # The EOS set comes from a reference run without EOS (tokens each sequence really produces): the
        # mixed job's floor.
        write_prompts(work / f"{mixed.name}.prompts.jsonl", prompts)
        probes = [run_system(FLOOR, mixed, f"{mixed.name}-floor-0", binding, 0.0, args.timeout, pythons)]
        eos_ids = choose_eos_ids(probes[0].tokens, [tokenizer.eos_token_id], seed=args.seed)
        log(f"[{size}-eos] EOS ids {eos_ids}")
        jobs = ([mixed] if "mixed" in datasets else []) + [Job(f"{size}-eos", model, prompts, ids, eos_ids,
                                                               args.batch_size, work)]
    for job in jobs:
        write_prompts(work / f"{job.name}.prompts.jsonl", prompts)
    return [(job, probes if job is mixed else []) for job in jobs]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["small", "large"], choices=list(MODELS))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--systems", nargs="+", default=[s.name for s in SYSTEMS], choices=[s.name for s in SYSTEMS],
                        metavar="SYSTEM", help="any of: " + "; ".join(s.name for s in SYSTEMS))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--min-new", type=int, default=16)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of every system's process tree (default: one per core of --cores, else 1)")
    parser.add_argument("--cores", default=None, help="taskset core list every system runs on, e.g. 0 or 0-1 "
                        "(default: the first --threads cores); 'none': no binding for any system")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each system, the order alternating")
    parser.add_argument("--floor-repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="peers", help="the results' file name: OUT/NAME.{md,json,png}")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-peers")
    parser.add_argument("--note", default="", help="a line for the report's header (e.g. the commit measured)")
    parser.add_argument("--python", action="append", default=[], metavar="VENV=PYTHON",
                        help="use this interpreter for a peer venv (hf or vllm) instead of $DISTGEN_BENCH_VENVS/VENV "
                             "(default .cache/bench-venvs/VENV)")
    args = parser.parse_args(argv)
    try:
        args.binding = Binding.make(args.threads, args.cores)
        for system in SYSTEMS:
            if system.name in args.systems:
                args.binding.per_rank(system.ranks)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    binding: Binding = args.binding
    pythons = dict(item.split("=", 1) for item in args.python)
    systems = [s for s in SYSTEMS if s.name in args.systems]
    args.work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    command = shlex.join(argv if argv is not None else sys.argv[1:])
    header = [f"Run {started:%Y-%m-%d %H:%M} UTC: `bench/peers.py {command}`", "",
              f"- machine: {machine().describe()}",
              f"- binding: {binding.describe()}; every system the same (vLLM: VLLM_CPU_OMP_THREADS_BIND="
              f"{binding.env({})['VLLM_CPU_OMP_THREADS_BIND']})",
              f"- load average at start: {load_average()}"]
    venvs = {s.venv for s in [*systems, FLOOR] if s.venv}
    header += [f"- {name}: {text}" for name, text in versions(venvs, pythons).items()]
    header.append(f"- distgen settings: {' '.join(DISTGEN_BEST)} (`distgen compiled`: generation.compile=on, its "
                  f"compile counted as start-up); {args.repeats} repeat(s), the order alternating; medians over "
                  f"clean runs (a run with more than 0.5 cores busy elsewhere is LOADED and left out)")
    if args.note:
        header.append(f"- note: {args.note}")
    results = {}
    for size in args.models:
        for job, floors in build_jobs(size, args.datasets, args, binding, pythons, print):
            result = bench_job(job, systems, args.repeats, binding, args.timeout, pythons, floors_done=floors,
                               floor_repeats=max(args.floor_repeats, len(floors)))
            result["description"] = f"model {size} ({MODELS[size].describe()}); {job.describe()}"
            results[job.name] = result
            print(markdown_table(result["rows"], BASE), *headlines(result), sep="\n", flush=True)
            # What is done so far is on disk at once: a long run cut short still leaves its tables.
            write_report(results, args.out, args.name, [*header, f"- in progress: {len(results)} job(s) done so far"])
    header.append(f"- load average at end: {load_average()}")
    paths = write_report(results, args.out, args.name, header)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return results


if __name__ == "__main__":
    # A plain SIGTERM (e.g. from `timeout`) unwinds, so the running system's process tree is ended too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
