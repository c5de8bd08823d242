"""distgen against what users would pick instead, side by side in one run:

    bash bench/setup_peers.sh                  # once: .cache/bench-venvs/{hf,vllm}
    .venv/bin/python bench/peers.py            # full run: 2 models x 2 datasets, 3 repeats
    .venv/bin/python bench/peers.py --quick    # small model, mixed dataset, 1 repeat

The same job (same saved model, same prompts as token ids, same per-prompt budgets, greedy, fp32)
runs through every system in SYSTEMS: distgen through its CLI (1 rank; 2 ranks replicate; 2
ranks fsdp; with DISTGEN_BEST), HF `model.generate` on static batches (dataset order, and sorted
by length), HF continuous batching (the manager behind `generate_batch`) and vLLM's offline
`LLM.generate`. The peers run bench/peer_runner.py in their own venvs, so their pins never meet
distgen's. Every process gets the same thread count (--threads).

Per system and job it reports the medians over --repeats of generated tokens/s, prompt tokens/s,
time to first output, startup and end to end (all from the process launch; end to end is when
every completion is available: for distgen its merged outputs.jsonl), and peak memory (RSS summed
over the process tree, sampled), each also as a ratio to distgen 1 rank; and `vs floor`: the time of
bare batch-1 forwards for exactly the needed tokens (bench/peer_runner.py `floor`) over the
system's generation time (above 1 means batching beat per-sequence forwards). Every system's greedy
tokens are checked against the floor run's (which is the batch-1 reference); a difference that
starts at a near tie is allowed, any other makes the table say the comparison is unfair.

Writes bench/results/peers.md (tables + the machine and its load), peers.json (every run's
figures) and peers.png (generated tok/s ratios).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.peers_report import (check_equality, choose_eos_ids, floor_seconds, markdown_table,  # noqa: E402
                                median_run, replace_block, run_figures, write_chart)

# bench/setup_peers.sh builds them here; DISTGEN_BENCH_VENVS points both at one shared folder instead.
VENVS = Path(os.environ.get("DISTGEN_BENCH_VENVS") or REPO / ".cache" / "bench-venvs")
RESULTS = REPO / "bench" / "results"
RUNNER = REPO / "bench" / "peer_runner.py"
BASE = "distgen"

# distgen's best engine settings for this benchmark, appended to every distgen command (the batch
# size is --batch-size, shared with the peers). bench/engine.py measured continuous batching over
# static slots best on CPU; compile=auto compiles a job this size only on CUDA (a CPU compile costs
# 40-80 s each run), so a GPU run compiles the decode step and a CPU run runs eager with distgen's CPU
# kernels (generation.cpu_kernels=auto).
DISTGEN_BEST: list[str] = ["generation.scheduler=continuous", "generation.cache=static", "generation.compile=auto"]

# Head size 64: vLLM's CPU attention rejects some head sizes (16 fails, 64 works).
MODELS = {
    "small": {"layers": 2, "hidden_size": 128, "heads": 2, "kv_heads": 1, "intermediate_size": 384},
    "large": {"layers": 8, "hidden_size": 512, "heads": 8, "kv_heads": 4, "intermediate_size": 1536},
}
DATASETS = ("mixed", "eos")
WORDS = ("the model reads a prompt and writes a completion one token at a time until it is done while "
         "every rank keeps its own queue of prompts").split()


@dataclass(frozen=True)
class System:
    name: str
    # "distgen": the distgen CLI in this venv; otherwise a bench/peer_runner.py system in `venv`.
    kind: str
    venv: str = ""
    ranks: int = 1
    layout: str = "replicate"
    # distgen settings that replace DISTGEN_BEST's (same key)
    settings: tuple[str, ...] = ()


SYSTEMS = (
    System("distgen", "distgen"),
    # The compiled decode step (on CPU: frozen weights, inductor's C++ GEMMs); its compile counts as start-up.
    System("distgen compiled", "distgen", settings=("generation.compile=on",)),
    System("distgen 2x replicate", "distgen", ranks=2),
    System("distgen 2x fsdp", "distgen", ranks=2, layout="fsdp"),
    System("hf generate, static", "hf_static", "hf"),
    System("hf generate, static sorted", "hf_static_sorted", "hf"),
    System("hf continuous batching", "hf_cb", "hf"),
    System("vllm", "vllm", "vllm"),
)
FLOOR = System("floor", "floor", "hf")


@dataclass(frozen=True)
class Job:
    """One model and dataset, as every system receives it."""
    name: str
    model: Path
    prompts: list[dict]  # {"text", "ids", "budget"}
    eos_ids: list[int]
    batch_size: int
    threads: int
    work: Path

    def prompt_tokens(self) -> int:
        return sum(len(p["ids"]) for p in self.prompts)


@dataclass
class Run:
    """What one launch of one system left: its tokens and its figures."""
    tokens: list[list[int]]
    figures: dict
    raw: dict


# ---------------------------------------------------------------- datasets and models

def prompt_text(rng: random.Random, length: int) -> str:
    words = []
    while len(" ".join(words)) < length:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:length]


def mixed_prompts(tokenizer, count: int, seed: int, lengths=(8, 256), budgets=(16, 128)) -> list[dict]:
    """Prompts of 8-256 tokens with budgets of 16-128 new tokens (byte-level tokenizer: a character
    is a token), drawn from a seeded generator."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        text = prompt_text(rng, rng.randint(*lengths))
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        prompts.append({"text": text, "ids": ids, "budget": rng.randint(*budgets)})
    return prompts


def save_model(size: str, folder: Path) -> Path:
    from distgen.config import TinyModelConfig
    from distgen.models.tiny import save_tiny
    if not (folder / "config.json").is_file():
        save_tiny(folder, TinyModelConfig(**MODELS[size], init_std=0.2, seed=0))
    return folder


def write_distgen_dataset(job: Job) -> Path:
    path = job.work / f"{job.name}.prompts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": p["text"], "max_new_tokens": p["budget"]}) + "\n"
                            for i, p in enumerate(job.prompts)))
    return path


# ---------------------------------------------------------------- launching and watching

def thread_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), BENCH_THREADS=str(threads),
               PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="1")
    # vLLM CPU binds its OpenMP threads to cores; give it as many as everyone else gets.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    return env


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total / 1024


def watch(command: list[str], env: dict, log: Path, timeout_s: float,
          poll: Optional[Callable[[float], None]] = None) -> tuple[float, float]:
    """Run `command` to its end; returns (launch stamp, peak tree RSS in MiB). `poll(now)` is called
    every 20 ms while it runs."""
    launch = time.time()
    with log.open("w") as out:
        # Its own session, so that a timeout (or this benchmark stopping) ends the whole tree: vLLM's
        # engine core and workers outlive a killed parent otherwise.
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        peak, last_sample = 0.0, 0.0
        try:
            while proc.poll() is None:
                now = time.time()
                if poll:
                    poll(now)
                if now - last_sample >= 0.1:
                    peak, last_sample = max(peak, tree_rss_mib(proc.pid)), now
                if now - launch > timeout_s:
                    raise RuntimeError(f"{command[:4]} ran past {timeout_s:.0f}s; log: {log}")
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"{' '.join(command[:6])}... exited {proc.returncode}; log {log}:\n{tail}")
    return launch, peak


class DistgenWatch:
    """distgen stamps seen from outside: the coordinator prints `distgen: engine: ...` just before
    its loop starts (ready), and a rank's output shard (output.dir/outputs/part-*) gets its first
    line when its first completion finishes (first output)."""

    def __init__(self, out_dir: Path, log: Path):
        self.outputs, self.log = out_dir / "outputs", log
        self.ready: Optional[float] = None
        self.first_output: Optional[float] = None

    def __call__(self, now: float) -> None:
        if self.ready is None and self.log.is_file() and b"distgen: engine:" in self.log.read_bytes():
            self.ready = now
        if self.first_output is None and self.outputs.is_dir():
            if any(p.stat().st_size > 0 for p in self.outputs.glob("part-*")):
                self.first_output = now


def distgen_command(system: System, job: Job, out_dir: Path, python: str) -> list[str]:
    launcher = ["launcher=torchrun", f"launcher.nproc_per_node={system.ranks}"] if system.ranks > 1 else []
    return [python, "-m", "distgen.launch", *launcher, f"model={job.model}", f"dataset={write_distgen_dataset(job)}",
            f"layout={system.layout}", "model.dtype=fp32", f"generation.batch_size={job.batch_size}",
            f"generation.max_new_tokens={max(p['budget'] for p in job.prompts)}",
            f"generation.eos_token_ids=[{','.join(map(str, job.eos_ids))}]", f"output.dir={out_dir}",
            "output.print_table=false", "output.resume=false", "output.progress_every_s=0",
            *distgen_settings(system)]


def distgen_settings(system: System) -> list[str]:
    """DISTGEN_BEST with the system's own settings in place of the same keys."""
    own = {setting.split("=", 1)[0]: setting for setting in system.settings}
    best = [own.pop(setting.split("=", 1)[0], setting) for setting in DISTGEN_BEST]
    return best + list(own.values())


def run_distgen(system: System, job: Job, tag: str, floor_s: float, timeout_s: float) -> Run:
    out_dir, log = job.work / tag, job.work / f"{tag}.log"
    shutil.rmtree(out_dir, ignore_errors=True)  # an earlier run's shards would read as this run's first output
    watcher = DistgenWatch(out_dir, log)
    launch, peak = watch(distgen_command(system, job, out_dir, sys.executable), thread_env(job.threads),
                         log, timeout_s, watcher)
    # Every completion is available once the merged outputs.jsonl is written (stats and report follow).
    done = (out_dir / "outputs.jsonl").stat().st_mtime
    # split("\n"), not splitlines(): a completion may hold \x85 or \u2028, which splitlines() also splits on.
    records = [json.loads(line) for line in (out_dir / "outputs.jsonl").read_text().split("\n") if line]
    stats = json.loads((out_dir / "stats.json").read_text())
    # A compiled decode step's compile is start-up, not generation (as vLLM's compile warm-up is).
    compile_s = max(rank.get("compile_seconds", 0.0) for rank in stats["ranks"])
    gen_s = max(rank["generate_seconds"] - rank.get("compile_seconds", 0.0) for rank in stats["ranks"])
    # Without the engine line (a very short run), fall back to the merge less the generation.
    ready = (watcher.ready or done - gen_s - compile_s) + compile_s
    tokens = [r["completion_token_ids"] for r in records]
    counted = [r["prompt_tokens"] for r in records]
    if counted != [len(p["ids"]) for p in job.prompts]:
        raise RuntimeError(f"{system.name}: distgen tokenized the prompts differently from the benchmark")
    figures = run_figures(sum(map(len, tokens)), job.prompt_tokens(), gen_s, launch, ready,
                          watcher.first_output or done, done, peak, floor_s)
    return Run(tokens, figures, {"stats": stats["summary"]})


def venv_python(venv: str, pythons: dict[str, str]) -> str:
    if venv in pythons:
        return pythons[venv]
    python = VENVS / venv / "bin" / "python"
    if not python.is_file():
        raise FileNotFoundError(f"no venv for '{venv}' at {python.parent.parent}: run bash bench/setup_peers.sh {venv}")
    return str(python)


def run_peer(system: System, job: Job, tag: str, floor_s: float, timeout_s: float, pythons: dict[str, str]) -> Run:
    job_file, result_file = job.work / f"{tag}.job.json", job.work / f"{tag}.result.json"
    job_file.write_text(json.dumps({
        "system": system.kind, "model": str(job.model), "eos_ids": job.eos_ids, "batch_size": job.batch_size,
        "threads": job.threads, "prompts": [{"ids": p["ids"], "budget": p["budget"]} for p in job.prompts]}))
    result_file.unlink(missing_ok=True)
    command = [venv_python(system.venv, pythons), str(RUNNER), str(job_file), str(result_file)]
    launch, peak = watch(command, thread_env(job.threads), job.work / f"{tag}.log", timeout_s)
    result = json.loads(result_file.read_text())
    gen_s = result["done"] - result["ready"]
    if system.kind == "floor":  # its generation time is its forwards alone (no sampling, no bookkeeping)
        gen_s = floor_s = floor_seconds(result)
    figures = run_figures(sum(map(len, result["tokens"])), job.prompt_tokens(), gen_s, launch, result["ready"],
                          result["first_output"], result["done"], peak, floor_s)
    return Run(result["tokens"], figures, {k: v for k, v in result.items() if k != "tokens"})


def run_system(system: System, job: Job, tag: str, floor_s: float, timeout_s: float, pythons: dict[str, str]) -> Run:
    if system.kind == "distgen":
        return run_distgen(system, job, tag, floor_s, timeout_s)
    return run_peer(system, job, tag, floor_s, timeout_s, pythons)


# ---------------------------------------------------------------- one job, all systems

def bench_job(job: Job, systems: Sequence[System], repeats: int, timeout_s: float, pythons: dict[str, str],
              log: Callable[[str], None] = print, floors_done: Sequence[Run] = ()) -> dict:
    """Floor first (it is also the reference; `floors_done` are floor runs made already), then every
    system `repeats` times, interleaved so that a noisy minute spreads over all of them."""
    floors = [*floors_done, *(run_system(FLOOR, job, f"{job.name}-floor-{r}", 0.0, timeout_s, pythons)
                              for r in range(len(floors_done), repeats))]
    reference, margins = floors[0].tokens, floors[0].raw["margins"]
    floor_s = sorted(floor_seconds(f.raw) for f in floors)[len(floors) // 2]
    log(f"[{job.name}] floor {floor_s:.2f}s for {sum(map(len, reference))} generated tokens")
    runs: dict[str, list[Run]] = {s.name: [] for s in systems}
    failures: dict[str, str] = {}
    for r in range(repeats):
        for system in systems:
            if system.name in failures:
                continue
            tag = f"{job.name}-{system.name.replace(' ', '_').replace(',', '')}-{r}"
            try:
                run = run_system(system, job, tag, floor_s, timeout_s, pythons)
            except (RuntimeError, FileNotFoundError) as err:
                failures[system.name] = str(err).splitlines()[0]
                log(f"[{job.name}] {system.name}: FAILED: {err}")
                continue
            runs[system.name].append(run)
            log(f"[{job.name}] {system.name} #{r}: {run.figures['gen_tok_s']:.1f} gen tok/s, "
                f"startup {run.figures['startup_s']:.1f}s")
    rows = []
    for system in systems:
        if not runs[system.name]:
            continue
        equality = check_equality(reference, margins, runs[system.name][0].tokens)
        rows.append({"system": system.name, "equality": equality,
                     "figures": median_run([run.figures for run in runs[system.name]])})
    floor_figures = median_run([f.figures for f in floors])
    rows.append({"system": "floor (bare batch-1 forwards)", "equality": None,
                 "figures": {**floor_figures, "gen_s": floor_s}})
    return {"rows": rows, "failures": failures, "floor_s": floor_s, "reference": reference,
            "runs": {name: [run.figures for run in rs] for name, rs in runs.items()}}


# ---------------------------------------------------------------- the machine and the report

def machine_line(threads: int) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_gib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))) / 2 ** 20
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB; {threads} thread(s) per "
            f"process; load average {load}")


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


def describe_job(job: Job) -> str:
    lengths = sorted(len(p["ids"]) for p in job.prompts)
    budgets = sorted(p["budget"] for p in job.prompts)
    return (f"{len(job.prompts)} prompts of {lengths[0]}-{lengths[-1]} tokens, budgets {budgets[0]}-{budgets[-1]}, "
            f"batch size {job.batch_size}, EOS ids {job.eos_ids or 'none'}")


def write_report(results: dict, out: Path, header: list[str]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    parts = [*header, ""]
    for title, result in results.items():
        parts += [f"### {title}", "", result["description"], "", markdown_table(result["rows"], BASE), ""]
        for name, reason in result["failures"].items():
            parts.append(f"- {name} did not run: {reason}")
        parts.append("")
    paths = {"md": out / "peers.md", "json": out / "peers.json", "png": out / "peers.png"}
    paths["md"].write_text("\n".join(parts))
    paths["json"].write_text(json.dumps({"header": header, "jobs": {
        title: {"description": r["description"], "floor_s": r["floor_s"], "failures": r["failures"],
                "runs": r["runs"], "equality": {row["system"]: row["equality"].summary()
                                                for row in r["rows"] if row["equality"]}}
        for title, r in results.items()}}, indent=1))
    write_chart({title: r["rows"] for title, r in results.items()}, BASE, paths["png"])
    return paths


# ---------------------------------------------------------------- entry point

def build_jobs(size: str, datasets: Sequence[str], args, work: Path, pythons: dict[str, str],
               log: Callable[[str], None]) -> list[tuple[Job, list[Run]]]:
    """Each job with the floor runs made for it already (the EOS probe is the mixed job's first)."""
    from transformers import AutoTokenizer
    model = save_model(size, work / f"model-{size}")
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = mixed_prompts(tokenizer, args.prompts, args.seed, budgets=(args.min_new, args.max_new))
    mixed = Job(f"{size}-mixed", model, prompts, [], args.batch_size, args.threads, work)
    if "eos" not in datasets:
        return [(mixed, [])]
    # The EOS set comes from a reference run without EOS (a token each sequence really produces):
    # the mixed job's floor.
    probe = run_system(FLOOR, mixed, f"{mixed.name}-floor-0", 0.0, args.timeout, pythons)
    eos_ids = choose_eos_ids(probe.tokens, [tokenizer.eos_token_id], seed=args.seed)
    jobs = [(mixed, [probe])] if "mixed" in datasets else []
    jobs.append((Job(f"{size}-eos", model, prompts, eos_ids, args.batch_size, args.threads, work), []))
    log(f"[{size}-eos] EOS ids {eos_ids}")
    return jobs


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--systems", nargs="+", default=[s.name for s in SYSTEMS], choices=[s.name for s in SYSTEMS],
                        metavar="SYSTEM", help="any of: " + "; ".join(s.name for s in SYSTEMS))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--min-new", type=int, default=16)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="threads per process, for every system")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-peers")
    parser.add_argument("--note", default="", help="a line for the report's header (e.g. what else loaded the machine)")
    parser.add_argument("--readme", action="store_true", help="also put the header and every table into README.md")
    parser.add_argument("--quick", action="store_true", help="small model, mixed dataset, 1 repeat, 32 prompts")
    parser.add_argument("--python", action="append", default=[], metavar="VENV=PYTHON",
                        help="use this interpreter for a peer venv (hf or vllm) instead of $DISTGEN_BENCH_VENVS/VENV "
                             "(default .cache/bench-venvs/VENV)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.datasets, args.repeats, args.prompts = ["small"], ["mixed"], 1, 32
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    pythons = dict(item.split("=", 1) for item in args.python)
    systems = [s for s in SYSTEMS if s.name in args.systems]
    args.work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    header = [f"Run {started:%Y-%m-%d %H:%M} UTC: `bench/peers.py {command}`",
              "", f"- machine at start: {machine_line(args.threads)}"]
    venvs = {s.venv for s in [*systems, FLOOR] if s.venv}
    header += [f"- {name}: {text}" for name, text in versions(venvs, pythons).items()]
    header.append(f"- distgen settings: {' '.join(DISTGEN_BEST)} (`distgen compiled`: generation.compile=on, its "
                  f"compile counted as start-up); {args.repeats} repeat(s), medians")
    if args.note:
        header.append(f"- note: {args.note}")
    results = {}
    for size in args.models:
        for job, floors in build_jobs(size, args.datasets, args, args.work, pythons, print):
            result = bench_job(job, systems, args.repeats, args.timeout, pythons, floors_done=floors)
            result["description"] = (f"model {size} ({', '.join(f'{k} {v}' for k, v in MODELS[size].items())}); "
                                     + describe_job(job))
            results[job.name] = result
            print(markdown_table(result["rows"], BASE), flush=True)
            # What is done so far is on disk at once: a long run cut short still leaves its tables.
            write_report(results, args.out, [*header, f"- in progress: {len(results)} job(s) done so far"])
    header.append(f"- machine at end: {machine_line(args.threads)}")
    paths = write_report(results, args.out, header)
    if args.readme and results:
        tables = [f"**{title}**: {r['description']}\n\n{markdown_table(r['rows'], BASE)}" for title, r in results.items()]
        block = "\n\n".join(["\n".join(header), *tables])
        readme = REPO / "README.md"
        readme.write_text(replace_block(readme.read_text(), block))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return results


if __name__ == "__main__":
    # A plain SIGTERM (e.g. from `timeout`) unwinds, so the running system's process tree is ended too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
