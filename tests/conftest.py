import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

import distgen.backends.cpu  # noqa: F401  registers the CPU backend's kernels and slot attention
from distgen.common import log
from distgen.config import TinyModelConfig
from distgen.models.tiny import build_tokenizer, save_tiny
from helpers import LocalRay, LocalSlurm, missing_ray, missing_slurm

REPO = Path(__file__).resolve().parent.parent
# Prompts of different lengths; some carry their own budget so batches and ranks end at different steps.
PROMPTS = [
    {"id": "short", "prompt": "Hi", "max_new_tokens": 3},
    {"id": "france", "prompt": "The capital of France is"},
    {"id": "story", "prompt": "Once upon a time, in a land far away, there lived a dragon who", "max_new_tokens": 14},
    {"id": "code", "prompt": "def fibonacci(n):", "max_new_tokens": 5},
    {"id": "haiku", "prompt": "Write a haiku about distributed systems."},
    {"id": "primes", "prompt": "A short list of prime numbers: 2, 3, 5,", "max_new_tokens": 2},
    {"id": "fox", "prompt": "The quick brown fox"},
]
DEFAULT_BUDGET = 8
# Chat markers the tiny byte-level tokenizer spells out byte by byte; BOS/EOS are its own special tokens.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(autouse=True)
def distgen_lines():
    """Each test sees distgen's lines as a command line shows them (info to stdout, warnings to stderr,
    `distgen: `), also from functions it calls directly; whatever a test changed is undone after it."""
    log.unconfigure()
    log.configure("info")
    yield
    log.unconfigure()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), TinyModelConfig(layers=2, seed=7))


@pytest.fixture(scope="session")
def chat_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with CHAT_TEMPLATE in its tokenizer."""
    folder = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("tiny-chat") / "model")
    templated = build_tokenizer()
    templated.chat_template = CHAT_TEMPLATE
    templated.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def sliding_model(tokenizer):
    """A tiny Mistral attending over a sliding window of 6 tokens."""
    torch.manual_seed(3)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=6, initializer_range=0.2,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           max_position_embeddings=512)
    return MistralForCausalLM(config).eval()


def write_prompts(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_prompts(tmp_path / "prompts.jsonl", PROMPTS)


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int, eos_ids) -> list[int]:
    """Single-process, unpadded `model.generate`, cut after the first EOS."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=list(eos_ids) or None, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    for position, token in enumerate(new):
        if token in eos_ids:
            return new[:position + 1]
    return new


def assert_matches_generate(model, tokenizer, got: dict, records=PROMPTS, eos_ids=()) -> None:
    """In-process engine completions (by prompt id) equal `model.generate`'s greedy tokens, each record's budget."""
    for record in records:
        budget = record.get("max_new_tokens", DEFAULT_BUDGET)
        want = reference_greedy(model, tokenizer, record["prompt"], budget, list(eos_ids))
        assert got[record["id"]].token_ids == want, record["id"]


def assert_prompts_greedy(records, model, tokenizer) -> None:
    """`records` are PROMPTS' outputs, in order, each equal to `model.generate` (the tokenizer's EOS)."""
    assert [r["id"] for r in records] == [p["id"] for p in PROMPTS]
    for record, prompt in zip(records, PROMPTS):
        budget = prompt.get("max_new_tokens", DEFAULT_BUDGET)
        want = reference_greedy(model, tokenizer, prompt["prompt"], budget, [tokenizer.eos_token_id])
        assert record["completion_token_ids"] == want, prompt["id"]


def read_outputs(out_dir: Path) -> list[dict]:
    # "\n" only: splitlines() would also split a completion holding \x85 or \u2028.
    return [json.loads(line) for line in (out_dir / "outputs.jsonl").read_text(encoding="utf-8").split("\n") if line]


def read_stats(out_dir: Path) -> dict:
    return json.loads((out_dir / "stats.json").read_text())


def run_module(module: str, args, nproc: int | None = None, timeout: float = 240,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m module args`, under torchrun with `nproc` ranks when nproc is given (gloo, or NCCL on GPUs).

    The repository comes first on PYTHONPATH; what was there stays (packages carried to a GPU machine)."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([sys.executable, *launcher, "-m", module, *map(str, args)], cwd=REPO,
                          env={**child_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)


def child_env() -> dict[str, str]:
    """The repository first on PYTHONPATH (what was there stays: packages carried to a GPU machine);
    DeepSpeed JIT-builds its C++ ops once into the ignored .cache/ that setup and CI keep."""
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {"TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"), **os.environ,
            "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}


def paced_env(append_delay_s: float) -> dict[str, str]:
    """child_env, with every journal append in a rank sleeping `append_delay_s` (tests/slow_journal), so
    a test can signal, kill or preempt a job while it is surely part way through its prompts."""
    env = child_env()
    return {**env, "PYTHONPATH": f"{env['PYTHONPATH']}{os.pathsep}{REPO / 'tests' / 'slow_journal'}",
            "DISTGEN_TEST_APPEND_DELAY_S": str(append_delay_s)}


def run_deepspeed(module: str, args, gpus: int, timeout: float = 240) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N --module module args` (on CPU it starts N gloo ranks)."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    with socket.socket() as probe:  # deepspeed's fixed default port may be taken by another job
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return subprocess.run([sys.executable, str(deepspeed), "--num_gpus", str(gpus), "--master_port", str(port),
                           "--module", module, *map(str, args)], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=timeout)


# --- GPU tests (marker `gpu`): skipped, saying why, where no CUDA device is visible. ---

def gpu_unavailable_reason() -> str | None:
    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
    return (f"needs a CUDA GPU and none is visible (torch {torch.__version__}, a {build} build); "
            "scripts/gpu_check.sh runs these on a GPU machine")


def pytest_collection_modifyitems(config, items):
    reason = gpu_unavailable_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason=reason))


def unknown_config_key(*overrides: str) -> str | None:
    """Why `overrides` do not compose because a key or option does not exist (a feature not on this
    branch yet), or None. Other config errors are left to the run that uses them."""
    from distgen.common.errors import ConfigError
    from distgen.catalog.load import load_config
    try:
        load_config(["model=tiny", "dataset=prompts.jsonl", *overrides])
    except ConfigError as err:
        if "unknown config key" in str(err) or "Could not find" in str(err):
            return str(err).splitlines()[0]
    return None


def layout_names() -> list[str]:
    """Every registered layout, read from the name table (so new layouts are tested as they land)."""
    from distgen.parallel.layouts import LAYOUTS
    return list(LAYOUTS.names())


# --- Real clusters on this machine for the launcher tests (tests/helpers.py starts and stops them). ---

@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A SLURM controller with two slurmd "nodes" (dg1, dg2) on this machine, for the whole session."""
    reason = missing_slurm()
    if reason:
        pytest.skip(reason)
    with LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def ray_head():
    """A local Ray head (2 CPUs) for the whole session; with the job server for `ray job submit`
    where ray[default] is installed (its dashboard costs ~0.65 GB and ~20 s, more on a busy machine)."""
    reason = missing_ray()
    if reason:
        pytest.skip(reason)
    from ray._private.utils import get_dashboard_dependency_error
    # Short: Ray's socket paths under it must stay within the 107-byte limit.
    root = Path(tempfile.mkdtemp(prefix="dgray", dir="/tmp"))
    env = {**child_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    try:
        with LocalRay(root, cpus=2, dashboard=get_dashboard_dependency_error() is None, env=env) as head:
            yield head
    finally:
        shutil.rmtree(root, ignore_errors=True)


def journaled(out_dir: Path) -> list[dict]:
    """Records a run left in its output shards (open or full)."""
    from distgen.outputs.shards import list_shards, read_shard
    return [record for path in list_shards(out_dir) for record in read_shard(path)]


def crash_at_step(monkeypatch, step_count):
    from distgen.engine import Engine
    real_step, steps = Engine.step, []

    def step_then_fail(self):
        if len(steps) == step_count:
            raise RuntimeError("simulated crash")
        steps.append(1)
        return real_step(self)

    monkeypatch.setattr(Engine, "step", step_then_fail)
