"""Memory: KV/activation estimates, generation.batch_size=auto, out-of-memory back-off, cache strategies."""
import copy
import importlib.util
import multiprocessing
from dataclasses import replace

import numpy as np

import pytest
import torch
from transformers import DynamicCache, MistralConfig, QuantizedCache, Qwen2Config

from distgen.catalog import check_section
from distgen.config import GenerationConfig
from distgen.engine.backoff import INJECT_ENV
from distgen.engine import build
from distgen.engine.plan import DeviceDefaults
from distgen.engine.build import device_defaults, plan_batch_size, plan_cache, rank_budget
from distgen.engine.kv import QueueShape
from distgen.engine.kv import CACHES
from distgen.engine.kv.quantized import QUANT_BACKENDS, dequantized, missing_package
from distgen.engine.memory import (AUTO_BATCH_MAX, activation_bytes_per_row,
                                   auto_batch_size, forward_bytes, kv_shape, logits_bytes_per_row, memory_budget)
from distgen.common.errors import ConfigError
from distgen.run import main as run_in_process
from tests.helpers import (DEFAULT_BUDGET, PROMPTS, agree_on_batch, engine_for, free_ports, generate_all, read_outputs,
                           read_stats, reference_greedy, run_module)

BUDGETS = {r["id"]: r.get("max_new_tokens", DEFAULT_BUDGET) for r in PROMPTS}


def greedy_reference(model, tokenizer) -> dict:
    return {r["id"]: reference_greedy(model, tokenizer, r["prompt"], BUDGETS[r["id"]], []) for r in PROMPTS}


def cache_bytes(layers) -> int:
    return sum(t.numel() * t.element_size() for layer in layers
               for t in (layer.keys, layer.values, getattr(layer, "key_scales", None),
                         getattr(layer, "value_scales", None)) if t is not None)


# --- estimates against real caches ---

def test_kv_estimate_equals_a_real_dynamic_cache(tiny_model):
    cache = DynamicCache()
    with torch.no_grad():
        tiny_model(input_ids=torch.ones((3, 21), dtype=torch.long), cache=cache, use_cache=True)
    assert cache_bytes(cache.layers) == kv_shape(tiny_model.config, torch.float32).bytes(3, 21)


@pytest.mark.parametrize("cache", ["static", "quantized"])
def test_kv_estimate_equals_the_slot_caches(tiny_model, tokenizer, cache):
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, cache=cache, compile="off")
    engine = engine_for(tiny_model, tokenizer, PROMPTS, cfg)
    generate_all(engine)
    columns = engine.kv.max_len + 1  # the slot cache's scratch column
    assert cache_bytes(engine.kv.cache.layers) == kv_shape(tiny_model.config, torch.float32,
                                                           quantized=cache == "quantized").bytes(3, columns)


def test_the_kv_estimate_charges_each_layers_columns_and_activations_grow_with_the_prompt(tiny_model):
    # Every layer of the slot caches keeps every column (a local layer applies its window in attention); the
    # sliding_window ring keeps only its columns, and only in local layers.
    config = MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=6)
    shape = kv_shape(config, torch.bfloat16)
    assert (shape.windows, shape.head_dim, shape.itemsize) == ((6, 6), 16, 2)
    assert shape.bytes(2, 100) == 2 * 100 * shape.bytes_per_token == 2 * 100 * (2 * 2 * 2 * 16 * 2)
    assert kv_shape(config, torch.bfloat16, ring=10).bytes(2, 100) == 2 * 10 * shape.bytes_per_token
    mixed = Qwen2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        use_sliding_window=True, sliding_window=6, max_window_layers=1)
    ring = kv_shape(mixed, torch.bfloat16, ring=10)  # layer 0 global: all 100 columns; layers 1-3 their rings
    assert ring.windows == (None, 6, 6, 6) and ring.bytes(1, 100) == (100 + 3 * 10) * ring.layer_bytes_per_token
    small = activation_bytes_per_row(tiny_model.config, torch.float32, 8, 16)
    assert activation_bytes_per_row(tiny_model.config, torch.float32, 64, 80) > 8 * small > 0


def test_auto_batch_size_fits_the_budget_and_is_capped():
    kv = kv_shape(MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                sliding_window=None), torch.float32)
    per_row = kv.bytes(1, 100) + 1000
    assert auto_batch_size(kv, 1000, 100, prompts=500, budget=7 * per_row + 5).rows == 7
    capped = auto_batch_size(kv, 1000, 100, prompts=5, budget=7 * per_row)
    assert capped.rows == 5 and "capped at the rank's 5 prompts" in capped.reason
    assert auto_batch_size(kv, 1000, 100, prompts=10**6, budget=1 << 50).rows == AUTO_BATCH_MAX
    assert auto_batch_size(kv, 1000, 100, prompts=5, budget=10).rows == 1
    assert memory_budget(1000, 0.5, sharing=2, params=100) == 150


def test_a_slot_cache_charges_one_forward_and_rows_scale_with_kv_memory(tiny_model, monkeypatch):
    """A slot cache packs a prefill into one forward of at most the token budget: its activations are charged once
    (scores only where attention materialises them), each row its KV and logits; a padded cache pays every row's
    whole forward."""
    shape = QueueShape(np.full(5000, 40), np.full(5000, 24))
    gen = GenerationConfig(batch_size="auto", prefill_chunk_tokens=64)
    kv, f32 = kv_shape(tiny_model.config, torch.float32), torch.float32
    per_row = kv.bytes(1, 64) + logits_bytes_per_row(tiny_model.config, f32)
    rows = {}
    for mib in (16, 32):
        budget = mib << 20
        choice = plan_batch_size(tiny_model, gen, shape, budget)
        forward = forward_bytes(tiny_model.config, f32, 64, 40)  # CPU: SDPA materialises one prompt's scores
        assert choice.rows == (budget - forward) // per_row and "for one forward of 64 tokens" in choice.reason
        rows[mib] = choice.rows
    assert rows[32] > 2 * rows[16] - 2  # twice the memory, (about) twice the rows: nothing per row but KV and logits
    padded = plan_batch_size(tiny_model, replace(gen, cache="dynamic"), shape, 16 << 20)
    assert padded.rows < rows[16] and "activations)" in padded.reason
    # on CUDA in bf16 FlashAttention varlen materialises no scores: only the hidden states and MLP of the forward
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    half = copy.deepcopy(tiny_model).to(torch.bfloat16)
    cuda = plan_batch_size(half, gen, shape, 16 << 20, torch.device("cuda"))
    kv16 = kv_shape(half.config, torch.bfloat16)
    assert cuda.rows == ((16 << 20) - forward_bytes(half.config, torch.bfloat16, 64)) // \
        (kv16.bytes(1, 64) + logits_bytes_per_row(half.config, torch.bfloat16))


def test_the_batch_planner_charges_the_cache_the_engine_builds(tiny_model, tokenizer):
    """plan_batch_size charges a slot cache one packed forward: its guess (packs_prefill) is what the built cache
    does, for every kind this model takes on the CPU (a hand list of slot kinds left out quantized int8, a slot cache)."""
    from distgen.engine.build import packs_prefill
    from tests.helpers import engine_for
    for settings in (dict(cache="static"), dict(cache="dynamic"),
                     dict(cache="quantized", cache_quant_backend="int8")):
        gen = GenerationConfig(batch_size=2, max_new_tokens=2, **settings)
        engine = engine_for(tiny_model, tokenizer, [{"prompt": "hello"}], gen)
        assert packs_prefill(tiny_model, gen) == engine.kv.packs_prefill, settings


def test_settings_left_to_the_device_are_filled_in_and_said():
    cuda, said = device_defaults(GenerationConfig(), torch.device("cuda"))
    assert (cuda.batch_size, cuda.prefill_chunk_tokens) == ("auto", 8192) and "the cuda defaults" in said.said
    cpu, said = device_defaults(GenerationConfig(), torch.device("cpu"))
    assert (cpu.batch_size, cpu.prefill_chunk_tokens) == (4, 512) and "the cpu defaults" in said.said
    given = GenerationConfig(batch_size=2, prefill_chunk_tokens=16)
    assert device_defaults(given, torch.device("cuda")) == (given, DeviceDefaults((), "cuda"))
    assert device_defaults(given, torch.device("cuda"))[1].said == ""


def test_rank_budget_splits_host_ram_among_the_ranks_on_it(monkeypatch):
    monkeypatch.setattr(build, "available_bytes", lambda device: 8000)
    gen = GenerationConfig(memory_fraction=0.5)
    assert rank_budget(gen, torch.device("cpu"), local_world_size=4) == 1000
    assert rank_budget(gen, torch.device("cpu")) == 4000
    # each GPU has its own memory: the ranks on its host do not share it
    assert rank_budget(gen, torch.device("cuda", 0), local_world_size=4) == 4000


# --- generation.batch_size=auto ---

def job_args(model_dir, prompts, out, *extra):
    return [f"model={model_dir}", f"dataset={prompts}", f"output.dir={out}", "output.print_table=false",
            f"generation.max_new_tokens={DEFAULT_BUDGET}", *extra]


def test_batch_size_auto_picks_rows_and_equals_a_fixed_batch(tiny_model_dir, prompts_file, tmp_path, capsys):
    outputs = {}
    for batch in ("auto", "2"):
        out = tmp_path / batch
        assert run_in_process(job_args(tiny_model_dir, prompts_file, out, f"generation.batch_size={batch}")) == 0
        outputs[batch] = [(r["id"], r["completion_token_ids"]) for r in read_outputs(out)]
        [rank] = read_stats(out)["ranks"]
        if batch == "auto":  # plenty of memory: every prompt in one batch
            assert rank["batch_size"] == len(PROMPTS) and "capped at the rank's 7 prompts" in rank["batch_size_reason"]
            assert "generation.batch_size=auto picked 7" in capsys.readouterr().out
        else:
            assert rank["batch_size"] == 2 and rank["batch_size_reason"] == "generation.batch_size=2"
    assert outputs["auto"] == outputs["2"]


def test_lockstep_ranks_agree_on_the_least_batch():
    # Three gloo ranks: the least batch any rank with prompts fits wins; a rank without prompts has no say.
    context = multiprocessing.get_context("fork")  # spawn would import torch and transformers again (slow)
    results, port = context.Queue(), free_ports(1)[0]
    rows, has_prompts = [5, 3, 1], [True, True, False]
    procs = [context.Process(target=agree_on_batch, args=(rank, 3, port, rows, has_prompts, results))
             for rank in range(3)]
    for proc in procs:
        proc.start()
    try:
        got = sorted(results.get(timeout=120) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert [(rank, agreed) for rank, agreed, _ in got] == [(0, 3), (1, 3), (2, 3)]
    assert "the least a rank of the lockstep group fits (this rank alone: alone)" == got[0][2]
    assert got[1][2] == "alone"


# --- out-of-memory back-off ---

@pytest.mark.parametrize("cache,do_sample", [("static", False), ("dynamic", False), ("static", True)])
def test_oom_backoff_requeues_and_gives_the_outputs_of_a_clean_run(tiny_model, tokenizer, monkeypatch, cache,
                                                                   do_sample):
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=4, cache=cache, compile="off",
                           do_sample=do_sample, seed=3)
    clean = generate_all(engine_for(tiny_model, tokenizer, PROMPTS, cfg))
    monkeypatch.setenv(INJECT_ENV, "3")  # mid-job: rows are decoding, some prompts still queued
    engine = engine_for(tiny_model, tokenizer, PROMPTS, cfg)
    faulted = generate_all(engine)
    assert engine.backoff.count == 1 and engine.backoff.rows == 2
    assert sorted(faulted) == sorted(clean) == sorted(BUDGETS)  # every prompt once
    assert {k: c.token_ids for k, c in faulted.items()} == {k: c.token_ids for k, c in clean.items()}
    if not do_sample:
        assert {k: c.token_ids for k, c in faulted.items()} == greedy_reference(tiny_model, tokenizer)


def test_a_ranks_uncaught_error_is_an_error_line_with_its_traceback_each_line_prefixed(tiny_model_dir, prompts_file,
                                                                                        tmp_path):
    result = run_module("distgen.run", [f"model={tiny_model_dir}", f"dataset={prompts_file}",
                                        f"output.dir={tmp_path}", "layout=fsdp"], env={INJECT_ENV: "2"})
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    start = lines.index("distgen: this rank stopped on an error:")
    assert lines[start + 1] == "distgen: Traceback (most recent call last):"
    assert all(line.startswith("distgen: ") for line in lines[start:]), result.stderr
    assert lines[-1].startswith("distgen: torch.OutOfMemoryError: out of memory injected by " + INJECT_ENV)


def test_oom_in_a_lockstep_layout_is_not_backed_off(tiny_model, tokenizer, monkeypatch, capsys):
    monkeypatch.setenv(INJECT_ENV, "1")
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=4, compile="off")
    engine = engine_for(tiny_model, tokenizer, PROMPTS, cfg)
    engine.backoff.enabled = False  # what build_engine sets for lockstep=True
    with pytest.raises(torch.OutOfMemoryError, match=INJECT_ENV):
        generate_all(engine)
    assert "back-off is supported only where ranks run free" in capsys.readouterr().err


def test_oom_backoff_on_two_replicate_ranks_under_torchrun(tiny_model_dir, tiny_model, tokenizer, prompts_file,
                                                           tmp_path):
    out = tmp_path / "out"
    result = run_module("distgen.run", job_args(tiny_model_dir, prompts_file, out, "layout=replicate",
                                                "generation.batch_size=auto", "generation.eos_token_ids=[]"),
                        nproc=2, env={INJECT_ENV: "2"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("backing off to generation.batch_size=") == 2, result.stderr
    records = read_outputs(out)
    assert [r["index"] for r in records] == list(range(len(PROMPTS)))
    assert {r["id"]: r["completion_token_ids"] for r in records} == greedy_reference(tiny_model, tokenizer)
    stats = read_stats(out)
    assert stats["summary"]["oom_backoffs"] == 2
    assert [s["final_batch_size"] for s in stats["ranks"]] == [max(1, s["batch_size"] // 2) for s in stats["ranks"]]


# --- cache strategies ---

def test_cache_table_is_what_config_checks_and_docs_read():
    assert CACHES.names() == ("dynamic", "static", "sliding_window", "quantized", "offloaded")
    assert "generation.cache=offloaded" in CACHES.describe()
    with pytest.raises(ConfigError, match="generation.cache='paged' is not allowed: expected one of auto, dynamic"):
        check_section("generation", GenerationConfig(cache="paged"))


@pytest.mark.parametrize("backend", QUANT_BACKENDS.names())
def test_quantized_cache_backends_run_and_keep_shapes(tiny_model, tokenizer, backend):
    if missing_package(QUANT_BACKENDS.get(backend)):
        pytest.skip(f"the {backend} backend needs {missing_package(QUANT_BACKENDS.get(backend))}, not installed")
    residual = {"cache_residual_length": 3} if QUANT_BACKENDS.entry(backend).owns else {}  # quanto, hqq
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, cache="quantized", compile="off",
                           cache_quant_backend=backend, **residual)
    check_section("generation", cfg)
    engine = engine_for(tiny_model, tokenizer, PROMPTS, cfg)
    assert f"backend {backend}" in engine.choice
    completions = []
    with torch.no_grad():
        for _ in range(6):  # a prefill and decode steps past the residual length
            completions += engine.step()
    if backend == "int8":
        layer = engine.kv.cache.layers[0]
        assert layer.keys.dtype == torch.int8 and layer.keys.shape == (3, 2, engine.kv.max_len + 1, 16)
    else:  # (rows, kv heads, columns, head_dim), as many columns as the attention mask
        assert isinstance(engine.kv.cache, QuantizedCache)
        keys, values = dequantized(engine.kv.cache.layers[0])
        assert keys.shape == values.shape == (engine.kv.rows, 2, engine.kv.mask.shape[1], 16)
    rest = generate_all(engine)
    got = {c.prompt.id: c.token_ids for c in completions} | {k: c.token_ids for k, c in rest.items()}
    assert {k: len(v) for k, v in got.items()} == BUDGETS  # random weights: tokens differ, budgets hold


def test_offloaded_cache_on_cpu_is_a_clear_error(tiny_model, tokenizer):
    with pytest.raises(ConfigError, match="generation.cache='offloaded' is not allowed: .* this rank runs on cpu"):
        engine_for(tiny_model, tokenizer, PROMPTS, GenerationConfig(cache="offloaded", compile="off"))


def test_auto_picks_quantized_when_memory_is_tight(tiny_model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size="auto", memory_fraction=1e-12, compile="off")
    engine = engine_for(tiny_model, tokenizer, PROMPTS, cfg)
    assert engine.batch.rows == 1 and "not even one row" in engine.batch.reason
    assert "cache=quantized (a full-precision KV cache" in engine.choice
    assert len(generate_all(engine)) == len(PROMPTS)
    # On CUDA, a quantized cache that does not fit either goes to CPU memory.
    gen = GenerationConfig()
    assert plan_cache(gen, tiny_model, False, need=8 << 20, budget=4 << 20, device_type="cuda")[0] == "quantized"
    assert plan_cache(gen, tiny_model, False, need=8 << 20, budget=1 << 20, device_type="cuda")[0] == "offloaded"
    assert plan_cache(gen, tiny_model, False, need=8 << 20, budget=1 << 20, device_type="cpu")[0] == "quantized"


@pytest.mark.skipif(importlib.util.find_spec("hqq") is not None, reason="hqq is installed here")
def test_hqq_backend_without_hqq_is_a_clear_error():
    with pytest.raises(ConfigError, match="generation.cache_quant_backend='hqq' is not allowed: it needs .*hqq"):
        check_section("generation", GenerationConfig(cache="quantized", cache_quant_backend="hqq"))
