"""What every bench script shares (a library: scripts import it, it imports no script):

- the machine, described (CPU model, cores, memory) for every report;
- one prompt generator (`make_prompts`) and distgen's JSONL for it (`write_prompts`);
- the benchmark models (`MODELS`, `save_model`): random-init, saved like a real checkpoint;
- one core binding for every process (`Binding`): the same `taskset -c CORES` (or none) and the same
  threads for every system, vLLM's `VLLM_CPU_OMP_THREADS_BIND` included;
- one way to run a process measured (`run_measured`): wall clock, the whole process tree's CPU seconds
  and peak RSS, the load average before and after, and the load from elsewhere (`Usage.loaded`);
- one way to run distgen (`run_distgen`): its CLI, as a user runs it, under that binding;
- one HF baseline (`hf_generate_static`): `model.generate` on static batches sorted by length, on the model's
  own device and dtype (bench/peer_runner.py's `hf_generate` on CPU, bench/gpu.py's HF row on a GPU). It
  imports torch only when called, so bench/peer_runner.py imports this module in any peer venv.
"""
from __future__ import annotations

import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
# A run during which the rest of the machine kept more than this many cores busy on average (beyond what
# the run's own process tree and this harness used) is marked loaded and kept out of headline figures.
LOADED_ABOVE = 0.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- the machine

@dataclass(frozen=True)
class Machine:
    node: str
    cpu: str
    cores: int
    mem_gib: float

    def describe(self) -> str:
        return f"{self.node}: {self.cpu}, {self.cores} cores, {self.mem_gib:.0f} GiB"


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, as a report's header shows them (at its start and end)."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> Machine:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
               platform.processor() or platform.machine())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    return Machine(platform.node(), cpu, os.cpu_count() or 1, mem_kib / 2 ** 20)


# ---------------------------------------------------------------- prompts

WORDS = ("the model reads a prompt and writes a completion one token at a time until it is done while "
         "every rank keeps its own queue of prompts").split()


@dataclass(frozen=True)
class BenchPrompt:
    """One prompt as text (the benchmark models' byte-level tokenizer makes a character one token) and
    how many new tokens it asks for."""
    text: str
    budget: int


def make_prompts(count: int, seed: int = 0, lengths: tuple[int, int] = (8, 256),
                 budgets: tuple[int, int] = (16, 128), repetitive: bool = False,
                 even: bool = False) -> list[BenchPrompt]:
    """`count` prompts of `lengths` characters with `budgets` new tokens, drawn from a seeded generator.
    `repetitive`: each prompt repeats one short phrase (what prompt lookup feeds on). `even`: lengths and
    budgets spread evenly over their ranges instead of drawn (prompt i: strides of 37 and 53 through each
    range), so the job's shape is the same whatever the seed (bench/gpu.py's job); the words are still drawn."""
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        length = spread(i, 37, lengths) if even else rng.randint(*lengths)
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 4))] if repetitive else []
        text = ""
        while len(text) < length:
            text += " ".join(words if repetitive else [rng.choice(WORDS)]) + " "
        budget = spread(i, 53, budgets) if even else rng.randint(*budgets)
        prompts.append(BenchPrompt(text[:length].strip() or "a", budget))
    return prompts


def spread(i: int, stride: int, bounds: tuple[int, int]) -> int:
    """The i-th of a deterministic walk through `bounds` (inclusive) in steps of `stride`."""
    low, high = bounds
    return low + (i * stride) % (high - low + 1)


def shared_prefix(characters: int, seed: int = 0) -> str:
    """A text of `characters` characters (tokens, with the byte-level tokenizer) made of WORDS: a long system
    prompt or few-shot block that every prompt of a job starts with."""
    rng, text = random.Random(seed + 1), ""
    while len(text) < characters:
        text += rng.choice(WORDS) + " "
    return text[:characters]


def write_prompts(path: Path, prompts: Sequence[BenchPrompt]) -> Path:
    """distgen's prompts file: one JSON line per prompt, its id its position."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "prompt": p.text, "max_new_tokens": p.budget}) + "\n"
                            for i, p in enumerate(prompts)))
    return path


# ---------------------------------------------------------------- models

@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    init_std: float = 0.2
    # qwen2: Qwen2ForCausalLM of that vocabulary with a tied head (Qwen2.5-0.5B's shape); llama: the
    # byte-level tokenizer's vocabulary, untied.
    family: str = "llama"
    vocab: int = 0

    def describe(self) -> str:
        return (f"{self.family}, {self.layers} layers, hidden {self.hidden}, {self.heads}/{self.kv_heads} heads, "
                f"MLP {self.intermediate}" + (f", vocab {self.vocab} (tied head)" if self.vocab else ""))


# Head size 64 for the peers' models: vLLM's CPU attention rejects some head sizes (16 fails, 64 works).
MODELS = {
    "tiny": ModelShape(2, 64, 4, 2, 128),  # model=tiny's shape (distgen.config.TinyModelConfig)
    "small": ModelShape(2, 128, 2, 1, 384),
    "medium": ModelShape(4, 256, 4, 2, 768),
    "large": ModelShape(8, 512, 8, 4, 1536),
    "qwen2.5-0.5b": ModelShape(24, 896, 14, 2, 4864, init_std=0.02, family="qwen2", vocab=151936),
}


def save_model(name: str, folder: Path) -> Path:
    """MODELS[name], random-init (seed 0), saved with its byte-level tokenizer; kept when already there."""
    if (folder / "config.json").is_file():
        return folder
    shape = MODELS[name]
    if shape.family == "llama":
        from distgen.config import TinyModelConfig
        from distgen.models.tiny import save_tiny
        return save_tiny(folder, TinyModelConfig(shape.layers, shape.hidden, shape.heads, shape.kv_heads,
                                                 shape.intermediate, init_std=shape.init_std, seed=0))
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distgen.models.tiny import build_tokenizer
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, tie_word_embeddings=True, max_position_embeddings=4096,
                         use_sliding_window=False, initializer_range=shape.init_std, rope_theta=1000000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- one binding for everyone

def parse_cores(text: str) -> list[int]:
    """taskset's list form: "0", "0-3", "0,2,4-5"."""
    cores: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()) or (last and int(last) < int(first)):
            raise ValueError(f"--cores={text!r}: expected a core list such as 0, 0-1 or 0,2 (or none)")
        cores.extend(range(int(first), int(last or first) + 1))
    return sorted(set(cores))


@dataclass(frozen=True)
class Binding:
    """The cores and threads every system gets. `cores` (taskset's list, e.g. "0-1") binds every process
    tree to those cores and tells vLLM to bind its OpenMP threads to the same ones; None binds nobody
    (vLLM: nobind). `threads` is each process tree's OpenMP/torch thread count; a system of several ranks
    splits it over them."""
    threads: int
    cores: Optional[str]

    @classmethod
    def make(cls, threads: Optional[int], cores: Optional[str]) -> "Binding":
        """From --threads and --cores: cores default to the first `threads` ones; "none" binds nobody.
        Bound, a system runs one thread per core (vLLM binds one OpenMP thread to each core it is given)."""
        if cores is None:
            threads = threads or 1
            cores = f"0-{threads - 1}" if threads > 1 else "0"
        if cores == "none":
            return cls(threads or 1, None)
        count = len(parse_cores(cores))
        if threads not in (None, count):
            raise ValueError(f"--threads={threads} with --cores={cores} ({count} cores): bound, every system "
                             f"runs one thread per core; give --threads {count} or --cores none")
        if max(parse_cores(cores)) >= (os.cpu_count() or 1):
            raise ValueError(f"--cores={cores}: this machine has cores 0-{(os.cpu_count() or 1) - 1}")
        return cls(count, cores)

    def per_rank(self, ranks: int) -> int:
        if ranks < 1 or self.threads % ranks:
            raise ValueError(f"{ranks} ranks cannot share {self.threads} thread(s) evenly: give --threads (or "
                             f"--cores) a multiple of {ranks}")
        return self.threads // ranks

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["taskset", "-c", self.cores, *argv] if self.cores else list(argv)

    def env(self, base: Optional[dict] = None, ranks: int = 1) -> dict:
        threads = str(self.per_rank(ranks))
        return {**(os.environ if base is None else base), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                "BENCH_THREADS": threads, "VLLM_CPU_OMP_THREADS_BIND": self.cores or "nobind"}

    def describe(self) -> str:
        where = f"taskset -c {self.cores}" if self.cores else "no core binding (any core)"
        return f"{where}, {self.threads} thread(s) per system (split over a system's ranks)"


# ---------------------------------------------------------------- measured runs

def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait;
    steal counts, it is another guest's load)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / CLOCK_TICKS


def own_seconds() -> float:
    """CPU seconds this harness process has used (its polling counts as its own, not as load from elsewhere)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tree_sample(pid: int) -> tuple[float, dict[int, float]]:
    """(resident MiB, {pid: user+sys CPU seconds}) of a process and all its descendants (Linux /proc)."""
    rss_kib, cpu, todo = 0, {}, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kib += int(line.split()[1])
            stat = Path(f"/proc/{current}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            cpu[current] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError, IndexError):
            continue
    return rss_kib / 1024, cpu


@dataclass(frozen=True)
class Usage:
    """What one run cost and what else the machine did meanwhile."""
    wall_s: float
    cpu_s: float  # user+sys of the whole process tree
    peak_rss_mib: float  # the tree's resident memory, summed, sampled every 0.1 s
    load_before: float  # 1-minute load average at launch and at the end (this run's own work included)
    load_after: float
    # Cores the rest of the machine kept busy on average during the run: the machine's busy CPU seconds
    # less this run's tree and this harness, over the wall time.
    other_load: float
    affinity: str = ""  # the cores the tree's root process was allowed, as taskset lists them (seen while it ran)

    @property
    def loaded(self) -> bool:
        return self.other_load > LOADED_ABOVE

    @property
    def cores_used(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def record(self) -> dict:
        return {**{k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()},
                "cores_used": round(self.cores_used, 3), "loaded": self.loaded}


def core_list(cores: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (taskset's list form)."""
    spans: list[list[int]] = []
    for core in sorted(cores):
        if spans and core == spans[-1][1] + 1:
            spans[-1][1] = core
        else:
            spans.append([core, core])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def other_load(busy_s: float, tree_cpu_s: float, harness_cpu_s: float, wall_s: float) -> float:
    """Cores kept busy by the rest of the machine, on average over `wall_s`: the machine's busy CPU seconds
    less the run's process tree and this harness."""
    return max(0.0, busy_s - tree_cpu_s - harness_cpu_s) / wall_s if wall_s > 0 else 0.0


@dataclass(frozen=True)
class Launch:
    """One process to start: its command line (the binding's taskset first, if any), its environment (the
    binding's threads) and where its output goes."""
    command: list[str]
    env: dict
    log: Path


def bench_env(binding: Binding, ranks: int = 1) -> dict:
    """Every system's environment: the binding's threads (split over `ranks`) and cores, this checkout first
    on the path, no tokenizer threads; VLLM_CPU_KVCACHE_SPACE (GiB of vLLM's CPU KV cache) is set for all
    so that the environments differ in nothing but the threads a rank gets."""
    return {**binding.env(ranks=ranks), "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p), "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": "1"}


class RunFailed(RuntimeError):
    """A measured run that exited non-zero (`returncode`) or ran past its time (`returncode` None); `log` holds
    its output."""

    def __init__(self, message: str, log: Path, returncode: Optional[int]):
        super().__init__(message)
        self.log, self.returncode = log, returncode

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


@dataclass(frozen=True)
class Measured:
    launch: float  # time.time() at launch and when the tree was reaped
    end: float
    usage: Usage


def run_measured(launch: Launch, timeout_s: float, poll: Optional[Callable[[float], None]] = None) -> Measured:
    """Run `launch` to its end in its own session (a timeout, or this harness stopping, ends the whole
    tree: vLLM's engine core outlives a killed parent otherwise); `poll(now)` every 20 ms. Raises
    RunFailed (a RuntimeError) naming the log when it fails or runs past `timeout_s`."""
    command, log = launch.command, launch.log
    load_before, busy0, own0 = os.getloadavg()[0], busy_seconds(), own_seconds()
    started = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=launch.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    peak, seen, last_sample, status, rusage, affinity = 0.0, {}, 0.0, None, None, ""
    try:
        while status is None:
            pid, wait_status, wait_usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, rusage = wait_status, wait_usage
                break
            now = time.time()
            if poll:
                poll(now)
            if now - last_sample >= 0.1:
                rss, cpu = tree_sample(proc.pid)
                peak, last_sample = max(peak, rss), now
                seen.update(cpu)
                try:  # taskset execs the command in place: after its first moments, the pid's cores are the run's
                    affinity = core_list(os.sched_getaffinity(proc.pid))
                except OSError:
                    pass
            if now - started > timeout_s:
                raise RunFailed(f"{' '.join(command[:6])} ran past {timeout_s:.0f}s; log: {log}", log, None)
            time.sleep(0.02)
    finally:
        if status is None:
            os.killpg(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status) if status is not None else -9
    end = time.time()
    # wait4 counts every descendant its parent waited for; the samples also catch one that was not.
    tree_cpu = max(rusage.ru_utime + rusage.ru_stime, sum(seen.values()))
    wall = end - started
    usage = Usage(wall, tree_cpu, peak, load_before, os.getloadavg()[0],
                  other_load(busy_seconds() - busy0, tree_cpu, own_seconds() - own0, wall), affinity)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RunFailed(f"{' '.join(command[:6])}... exited {proc.returncode}; log {log}:\n{tail}", log,
                        proc.returncode)
    return Measured(started, end, usage)


# ---------------------------------------------------------------- distgen, as a user runs it

# Rank 0's engine line (distgen/job/worker.py), with or without the rank in its prefix.
ENGINE_LINE = re.compile(rb"^distgen(\[rank 0\])?: engine: ", re.MULTILINE)


class DistgenWatch:
    """distgen's stamps seen from outside: the coordinator prints `distgen: engine: ...` (`distgen[rank 0]:
    engine: ...` in a job of several ranks) just before its loop starts (ready), and a rank's output shard
    (output.dir/outputs/part-*) gets its first line when its first completion finishes (first output)."""

    def __init__(self, out_dir: Path, log: Path):
        self.outputs, self.log = out_dir / "outputs", log
        self.ready: Optional[float] = None
        self.first_output: Optional[float] = None

    def __call__(self, now: float) -> None:
        if self.ready is None and self.log.is_file() and ENGINE_LINE.search(self.log.read_bytes()):
            self.ready = now
        if self.first_output is None and self.outputs.is_dir():
            if any(p.stat().st_size > 0 for p in self.outputs.glob("part-*")):
                self.first_output = now


def compile_seconds(stats: dict) -> float:
    """The slowest rank's first compiled decode step (0 when it ran eager)."""
    return max(rank.get("compile_seconds", 0.0) for rank in stats["ranks"])


def generate_seconds(stats: dict) -> float:
    """The slowest rank's generation, its compile left out (start-up, as vLLM's warm-up is)."""
    return max(rank["generate_seconds"] - rank.get("compile_seconds", 0.0) for rank in stats["ranks"])


@dataclass(frozen=True)
class DistgenRun:
    records: list[dict]  # outputs.jsonl, in dataset order
    stats: dict  # stats.json
    measured: Measured
    ready: float  # stamps (time.time()): engine built (and compiled); first completion on disk; outputs.jsonl
    first_output: float
    done: float

    @property
    def tokens(self) -> list[list[int]]:
        return [r["completion_token_ids"] for r in self.records]


def distgen_command(overrides: Sequence[str], out_dir: Path, ranks: int = 1,
                    python: str = sys.executable) -> list[str]:
    launcher = ["launcher=torchrun", f"launcher.nproc_per_node={ranks}"] if ranks > 1 else []
    return [python, "-m", "distgen.launch", *launcher, *overrides, f"output.dir={out_dir}",
            "output.print_table=false", "output.resume=false", "output.progress_every_s=0"]


def distgen_launch(overrides: Sequence[str], out_dir: Path, binding: Binding, ranks: int = 1) -> Launch:
    """distgen's CLI (`python -m distgen.launch`, torchrun for several ranks) under `binding`; its log lands
    next to `out_dir`."""
    return Launch(binding.command(distgen_command(overrides, out_dir, ranks)), bench_env(binding, ranks),
                  out_dir.with_name(out_dir.name + ".log"))


def run_distgen(launch: Launch, out_dir: Path, timeout_s: float = 1800) -> DistgenRun:
    """One distgen job (a `distgen_launch` writing to `out_dir`), measured."""
    shutil.rmtree(out_dir, ignore_errors=True)  # an earlier run's shards would read as this run's first output
    watch = DistgenWatch(out_dir, launch.log)
    measured = run_measured(launch, timeout_s, watch)
    merged = out_dir / "outputs.jsonl"
    # split("\n"), not splitlines(): a completion may hold \x85 or \u2028, which splitlines() also splits on.
    records = [json.loads(line) for line in merged.read_text().split("\n") if line]
    stats = json.loads((out_dir / "stats.json").read_text())
    done = merged.stat().st_mtime
    # Ready once the engine line is out, plus any compile; without the line (a very short run): the merge
    # less the generation.
    ready = (watch.ready or done - generate_seconds(stats) - compile_seconds(stats)) + compile_seconds(stats)
    # The watch sees a stamp at its next poll, the merge's mtime is exact: a run shorter than a poll would
    # otherwise read its first output after its end, or as ready after its first output.
    first_output = min(watch.first_output or done, done)
    return DistgenRun(records, stats, measured, min(ready, first_output), first_output, done)


# ---------------------------------------------------------------- the HF baseline

@dataclass(frozen=True)
class HfRun:
    """What `hf_generate_static` produced: each prompt's tokens, in input order, and when."""
    tokens: list[list[int]]
    seconds: float  # generation wall time, the warm-up left out (the device synchronized at both ends)
    ready: float  # time.time() stamps: before the first timed batch, after it, after the last
    first_output: float
    done: float


def trim(tokens: Sequence[int], eos_ids: Sequence[int], budget: int) -> list[int]:
    """The first `budget` tokens, cut after the first EOS (kept)."""
    out = []
    for token in list(tokens)[:budget]:
        out.append(int(token))
        if token in eos_ids:
            break
    return out


def hf_generate_static(model, ids: Sequence[Sequence[int]], budgets: Sequence[int], batch_size: int, pad_id: int,
                       eos_ids: Sequence[int] = (), warm_up: bool = False) -> HfRun:
    """The HF baseline: greedy `model.generate` on static batches of `batch_size` prompts (token `ids`), longest
    first (less padding), left-padded, on the model's own device and dtype. Each batch runs to its largest
    budget; each prompt keeps the tokens it asked for, cut after its first EOS (`eos_ids`; none: every row runs
    to its budget, the model's own EOS switched off). `warm_up`: two of the shortest prompts first, untimed
    (kernels, cuBLAS handles), and CUDA's peak-memory counters reset after them."""
    import torch
    device = next(model.parameters()).device
    model.generation_config.eos_token_id = None  # only `eos_ids` end a row
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def generate(batch: list[int]) -> list[list[int]]:
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(ids[i])) + list(ids[i]) for i in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, pad_token_id=pad_id,
                             max_new_tokens=max(budgets[i] for i in batch), eos_token_id=list(eos_ids) or None)
        return out[:, width:].tolist()  # (rows, new tokens)

    tokens: list[list[int]] = [[] for _ in ids]
    with torch.inference_mode():
        if warm_up:
            generate(batches[-1][:2])
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        ready, start, first_output = time.time(), time.perf_counter(), None
        for batch in batches:
            for i, row in zip(batch, generate(batch)):
                tokens[i] = trim(row, eos_ids, budgets[i])
            first_output = first_output or time.time()
        sync()
    return HfRun(tokens, time.perf_counter() - start, ready, first_output or time.time(), time.time())
