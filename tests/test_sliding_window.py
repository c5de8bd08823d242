"""Sliding-window models (Mistral, Qwen2 with use_sliding_window, Gemma 2/3 with local and global layers) generate
past their window, equal to `model.generate` token for token: every cache that can hold them, every slot attention
that runs on a CPU, both schedulers (chunks crossing the window), and whole jobs in every layout."""
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from distgen.backends.cpu import kernels
from distgen.common.errors import ConfigError
from distgen.config import GenerationConfig
from distgen.engine.assist import AssistantSpec
from distgen.engine.build import plan_cache
from distgen.engine.kv.attention import ATTENTIONS, attention, attention_context, plan_attention
from distgen.engine.kv.slots import SlotKV
from distgen.engine.kv.varlen import layer_window
from distgen.engine.memory import kv_shape
from distgen.engine.windows import LayerWindows, layer_windows
from distgen.run import main as run_in_process
from tests.helpers import (PROMPTS, WINDOW, WINDOW_ARCHITECTURES, build_window_model, engine_for, generate_all,
                           read_outputs, reference_greedy, run_module, save_window_model, write_prompts)

CPU = torch.device("cpu")
BUDGET = 8
# Which layers attend over the window, as each config says it (see tests/helpers/models.py WINDOW_ARCHITECTURES).
LOCAL = {"mistral": (WINDOW,) * 4, "qwen2": (None, None, WINDOW, WINDOW), "gemma2": (WINDOW, None, WINDOW, None),
         "gemma3": (WINDOW, None, WINDOW, None)}
NAMES = sorted(WINDOW_ARCHITECTURES)


@pytest.fixture(scope="module")
def models(tokenizer):
    return {name: build_window_model(name, tokenizer) for name in NAMES}


@pytest.fixture(scope="module")
def references(models, tokenizer):
    """generate's greedy tokens per model and prompt (no EOS: every record runs its whole budget)."""
    return {name: {r["id"]: reference_greedy(model, tokenizer, r["prompt"], r.get("max_new_tokens", BUDGET), [])
                   for r in PROMPTS} for name, model in models.items()}


def completions(engine) -> dict:
    return {key: c.token_ids for key, c in generate_all(engine).items()}


def longest(tokenizer) -> int:
    return max(len(tokenizer(r["prompt"])["input_ids"]) + r.get("max_new_tokens", BUDGET) for r in PROMPTS)


@pytest.mark.parametrize("name", NAMES)
def test_the_local_layers_are_those_the_model_applies_a_window_in(name, models, tokenizer):
    model = models[name]
    applied = tuple(getattr(layer.self_attn, "sliding_window", model.config.sliding_window)
                    for layer in model.model.layers)
    assert layer_windows(model.config) == applied == LOCAL[name]
    windows = LayerWindows.of(model.config)
    by_type = None if name == "mistral" else dict(zip(model.config.layer_types,
                                                      ["full" if w is None else "local" for w in LOCAL[name]]))
    assert windows.masks({None: "full", WINDOW: "local"}) == (by_type or "local")
    assert windows.binding(WINDOW).windows == (None,) * 4  # positions 0..5: no window binds
    assert layer_windows(build_window_model("qwen2", tokenizer, use_sliding_window=False).config) == (None,) * 4


def test_a_window_the_config_does_not_say_stops_the_forward_where_it_would_change_tokens():
    kv = SlotKV(2, 2, 20, 0, CPU, torch.float32, full_width=False, windows=LayerWindows((None, 8)))
    layers = kv.cache.layers
    assert [layer.window for layer in layers] == [None, 8] and kv.windows.local
    assert layer_window(layers[1], 1, 8) == 8 and layer_window(layers[0], 0, 0) is None
    assert layer_window(layers[0], 0, 64) is None  # no position of the cache reaches it: nothing changes
    with pytest.raises(RuntimeError, match="layer 0 attends over a sliding window of 4, but distgen read None"):
        layer_window(layers[0], 0, 4)
    with pytest.raises(RuntimeError, match="layer 1 attends over a sliding window of None, but distgen read 8"):
        layer_window(layers[1], 1, 0)


@pytest.mark.parametrize("name", NAMES)
def test_the_window_changes_the_tokens(name, tokenizer, references):
    """The same weights with a window past every sequence generate other tokens: equality below tests the window."""
    wide = build_window_model(name, tokenizer, sliding_window=512)
    assert any(reference_greedy(wide, tokenizer, r["prompt"], r.get("max_new_tokens", BUDGET), [])
               != references[name][r["id"]] for r in PROMPTS)


@pytest.mark.parametrize("impl", ["torch_sdpa", "varlen_reference", "sdpa_folded"])
@pytest.mark.parametrize("scheduler", ["continuous", "chunked"])
@pytest.mark.parametrize("name", NAMES)
def test_each_architecture_generates_past_its_window(name, scheduler, impl, models, references, tokenizer,
                                                     monkeypatch):
    """Prompts up to 10x the window; chunks of 5 cross it; the slot cache keeps every column and each local layer
    applies its window (a mask, or varlen_reference's reading of cuda_varlen's metadata)."""
    model = models[name]
    if impl == "sdpa_folded" and name == "gemma2":  # soft-capping: it refuses, torch_sdpa computes it
        with pytest.raises(ConfigError, match="attn_logit_softcapping=5"):
            engine_for(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=BUDGET, compile="off",
                                                                   attention=impl))
        return
    cfg = GenerationConfig(max_new_tokens=BUDGET, batch_size=3, scheduler=scheduler, compile="off",
                           prefill_chunk_tokens=5, attention=impl)
    engine = engine_for(model, tokenizer, PROMPTS, cfg)
    assert "cache=static (" in engine.choice
    assert engine.kv.varlen and engine.kv.attention.name == impl and longest(tokenizer) > 10 * WINDOW
    assert [layer.window for layer in engine.kv.cache.layers] == list(LOCAL[name])
    assert completions(engine) == references[name]


@pytest.mark.parametrize("name", NAMES)
def test_the_dynamic_cache_and_assisted_verifies_apply_the_windows(name, models, references, tokenizer):
    """The dynamic cache (transformers' masks over left-padded rows) and an assisted job's verify forwards (the slot
    cache's mask path: a mask per layer type) equal generate too."""
    model = models[name]
    cfg = GenerationConfig(max_new_tokens=BUDGET, batch_size=3, compile="off", cache="dynamic")
    assert completions(engine_for(model, tokenizer, PROMPTS, cfg)) == references[name]
    cfg = GenerationConfig(max_new_tokens=BUDGET, batch_size=3, compile="off", num_assistant_tokens=4,
                           scheduler="chunked", prefill_chunk_tokens=5)
    engine = engine_for(model, tokenizer, PROMPTS, cfg, assistant=AssistantSpec("draft", model))
    assert completions(engine) == references[name]
    assert engine.assistant.counters.accepted > 0


def test_the_ring_holds_only_the_window_of_models_local_everywhere(models, tokenizer, references):
    cfg = GenerationConfig(max_new_tokens=BUDGET, batch_size=3, compile="off", cache="sliding_window",
                           scheduler="chunked", prefill_chunk_tokens=5)
    engine = engine_for(models["mistral"], tokenizer, PROMPTS, cfg)
    assert engine.kv.max_len == WINDOW + 5 - 1 and not engine.kv.varlen
    assert completions(engine) == references["mistral"]
    with pytest.raises(ConfigError, match="generation.cache=sliding_window is not possible: layers 0, 1 attend "
                                          "globally"):
        engine_for(models["qwen2"], tokenizer, PROMPTS, cfg)


def test_auto_picks_the_slot_cache_and_a_ring_only_where_memory_is_short(models):
    gen = GenerationConfig()
    cache, why = plan_cache(gen, models["gemma2"], compiling=False, columns=100)
    assert cache == "static" and why.startswith("layers 0, 2 attend over a sliding window of 6")
    assert plan_cache(gen, models["mistral"], compiling=False, columns=100)[0] == "static"
    short = dict(compiling=False, need=2 << 30, budget=1 << 30, columns=100)
    cache, why = plan_cache(gen, models["mistral"], **short, ring_need=1 << 20)
    assert cache == "sliding_window" and "a ring of the window of 6 (~1 MiB) fits" in why
    assert plan_cache(gen, models["mistral"], **short, ring_need=2 << 30)[0] == "quantized"
    assert plan_cache(gen, models["gemma2"], **short, ring_need=None)[0] == "quantized"
    # no sequence reaches the window: the model is held as any other of its type (dynamic for gemma2)
    assert plan_cache(gen, models["gemma2"], compiling=False, columns=WINDOW)[0] == "dynamic"


@pytest.mark.parametrize("name,cache", [("gemma2", "static"), ("mistral", "sliding_window")])
def test_the_kv_estimate_equals_each_layers_buffers(name, cache, models, tokenizer):
    """batch_size=auto's KV model charges each layer its own columns: every column in the static cache, the ring's
    in the local layers of the sliding_window cache."""
    cfg = GenerationConfig(max_new_tokens=BUDGET, batch_size=3, compile="off", cache=cache, scheduler="chunked",
                           prefill_chunk_tokens=5)
    engine = engine_for(models[name], tokenizer, PROMPTS, cfg)
    generate_all(engine)
    held = sum(t.numel() * t.element_size() for layer in engine.kv.cache.layers for t in (layer.keys, layer.values))
    columns = engine.kv.max_len + 1  # with the scratch column
    ring = columns if cache == "sliding_window" else None
    assert held == kv_shape(models[name].config, torch.float32, ring=ring).bytes(3, columns if ring is None
                                                                                    else longest(tokenizer))


def test_the_cpu_kernels_run_where_no_window_binds_and_refuse_where_one_does(models, tokenizer):
    if kernels.load_kernel()[0] is None:
        pytest.skip(f"distgen's CPU kernels did not build here: {kernels.load_kernel()[1]}")
    model = models["qwen2"]
    short = [{"id": "hi", "prompt": "Hi", "max_new_tokens": 2}]  # 5 tokens in all: inside the window of 6
    engine = engine_for(model, tokenizer, short, GenerationConfig(max_new_tokens=2, batch_size=2, compile="off",
                                                                  cache="static"))
    assert engine.kv.attention.name == "cpu_kernels" and "decoder stack: distgen's" in engine.choice
    assert completions(engine)["hi"] == reference_greedy(model, tokenizer, "Hi", 2, [])
    ctx = attention_context(model.config, CPU, torch.float32, torch.float32, columns=longest(tokenizer))
    assert ctx.window == WINDOW and "a sliding window of 6 binds" in ATTENTIONS.get("cpu_kernels").blocker(ctx)
    assert plan_attention(ctx)[0].name == "torch_sdpa"


def test_what_cannot_soft_cap_refuses_gemma2_on_cuda(models, monkeypatch):
    """On a CUDA context (the plan reads the device type and capability only) Gemma 2's soft-capping rules out
    FlashAttention and sdpa_folded, saying so; torch_sdpa computes it."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    ctx = attention_context(models["gemma2"].config, torch.device("cuda"), torch.bfloat16, torch.bfloat16,
                            columns=100)
    impl, why = plan_attention(ctx)
    assert impl.name == "torch_sdpa" and ctx.softcap == 5.0
    assert "cuda_varlen: the model soft-caps attention scores (attn_logit_softcapping=5)" in why
    assert "sdpa_folded: the model soft-caps" in why
    gemma3 = attention_context(models["gemma3"].config, torch.device("cuda"), torch.bfloat16, torch.bfloat16,
                               columns=100)
    assert gemma3.window == WINDOW and ATTENTIONS.get("cuda_varlen").blocker(gemma3) is None


def test_soft_capped_attention_is_transformers_eager_arithmetic():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator) * 3 for shape in ((2, 4, 5, 16), (2, 2, 7, 16), (2, 2, 7, 16)))
    allowed = torch.ones(5, 7, dtype=torch.bool).tril(2)
    module = type("Attn", (), {"num_key_value_groups": 2, "head_dim": 16, "training": False})()
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    want = eager_attention_forward(module, q, k, v, mask, scaling=0.2, softcap=5.0)[0]  # (rows, q, heads, dim)
    got = attention(q, k, v, allowed, 0.2, softcap=5.0).transpose(1, 2)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(attention(q, k, v, allowed, 0.2).transpose(1, 2), want, atol=1e-3)


def window_job(model_dir, prompts, out, *extra):
    return [f"model={model_dir}", f"dataset={prompts}", f"output.dir={out}", f"generation.max_new_tokens={BUDGET}",
            "generation.batch_size=2", "generation.eos_token_ids=[]", "output.print_table=false", *extra]


def assert_records_equal_generate(out, model_dir, tokenizer, prompts=PROMPTS):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    records = read_outputs(out)
    assert [r["id"] for r in records] == [p["id"] for p in prompts]
    for record, prompt in zip(records, prompts):
        want = reference_greedy(model, tokenizer, prompt["prompt"], prompt.get("max_new_tokens", BUDGET), [])
        assert record["completion_token_ids"] == want, prompt["id"]


def test_a_job_generates_past_the_window_and_the_position_limit_still_bounds(tokenizer, tmp_path, prompts_file):
    """The window refusal is gone (every record of a replicate job completes); max_position_embeddings still
    refuses what does not fit."""
    model_dir = save_window_model("gemma3", tmp_path / "gemma3")
    out = tmp_path / "out"
    assert run_in_process(window_job(model_dir, prompts_file, out)) == 0
    assert all(r["finish_reason"] == "length" for r in read_outputs(out))
    assert_records_equal_generate(out, model_dir, tokenizer)
    short = save_window_model("gemma3", tmp_path / "short", max_position_embeddings=44)
    out = tmp_path / "out-short"
    assert run_in_process(window_job(short, prompts_file, out)) == 0
    refused = {r["id"]: r["error"] for r in read_outputs(out) if r["finish_reason"] == "error"}
    assert set(refused) == {"story", "haiku"} and all("max_position_embeddings=44" in e for e in refused.values())


@pytest.mark.parametrize("layout", ["fsdp", "zero3", "device_map"])
def test_two_ranks_generate_past_the_window_in_each_layout(layout, tokenizer, tmp_path):
    """Gemma 2 (alternating layers, soft-capping) on 2 gloo ranks: the lockstep layouts share the engine."""
    model_dir = save_window_model("gemma2", tmp_path / "gemma2")
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    extra = ["layout.param_persistence_threshold=0"] if layout == "zero3" else []
    result = run_module("distgen.run", window_job(model_dir, prompts, out, f"layout={layout}",
                                                  "generation.scheduler=chunked", "generation.prefill_chunk_tokens=5",
                                                  *extra), nproc=2, timeout=400)
    assert result.returncode == 0, result.stderr
    assert_records_equal_generate(out, model_dir, tokenizer)
