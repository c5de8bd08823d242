"""Fixtures and pytest hooks shared by the tests, nothing else: the helpers they call live in tests/helpers/."""
import os
import shutil
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
from tests.helpers import (CHAT_TEMPLATE, PROMPTS, LocalRay, LocalSlurm, child_env, gpu_unavailable_reason, missing_ray,
                           missing_slurm, write_prompts)


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


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_prompts(tmp_path / "prompts.jsonl", PROMPTS)


# --- GPU tests (marker `gpu`): skipped, saying why, where no CUDA device is visible. ---


def pytest_collection_modifyitems(config, items):
    reason = gpu_unavailable_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason=reason))


# --- Real clusters on this machine for the launcher tests (tests/helpers/ starts and stops them). ---

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
