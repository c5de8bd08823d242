"""Engine choices (slot cache, compile, chunked prefill, sliding window) against `model.generate`."""
import re
from collections import deque
from pathlib import Path

import pytest
import torch

from distgen.catalog import check_section
from distgen.config import GenerationConfig, TinyModelConfig
from distgen.engine.build import COMPILE_MIN_DECODE_STEPS, graphs_over_compile, own_graphs, plan_cache, plan_compile
from distgen.engine.request import Request, Status
from distgen.engine.scheduler import SCHEDULERS, SchedulerState
from distgen.inputs.records import Prompt
from distgen.models.tiny import build_tiny_model
from distgen.common.errors import ConfigError
from tests.helpers import DEFAULT_BUDGET, PROMPTS, assert_matches_generate, engine_for, generate_all, reference_greedy


def test_refilled_slot_never_attends_to_its_previous_tenant(tiny_model, tokenizer):
    # One slot: the long prompt fills many columns, then the short one reuses the slot. If the short
    # prompt attended to any stale column its greedy tokens would differ from generating it alone.
    records = [{"id": "long", "prompt": "x" * 90 + " a long first tenant", "max_new_tokens": 12},
               {"id": "short", "prompt": "Hi", "max_new_tokens": 12}]
    cfg = GenerationConfig(max_new_tokens=12, batch_size=1, cache="static", compile="off")
    engine = engine_for(tiny_model, tokenizer, records, cfg)
    got = generate_all(engine)
    assert_matches_generate(tiny_model, tokenizer, got, records)
    assert engine.kv.free == [0]


@pytest.mark.parametrize("scheduler", ["continuous", "static", "chunked"])
def test_packed_prefills_and_compacted_decodes_equal_generate(tiny_model, tokenizer, scheduler):
    # A prefill packs its prompts into one row (no padding) under the token budget; a finished row's slot
    # is refilled or taken by the highest row, so an eager decode reads exactly its running rows.
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=4, cache="static", compile="off",
                           scheduler=scheduler, prefill_chunk_tokens=48)
    engine = engine_for(tiny_model, tokenizer, PROMPTS, cfg)
    kv, packed, decodes = engine.kv, [], []
    prefill_inputs, decode_inputs = kv.prefill_inputs, kv.decode_inputs

    def record_prefill(plan):
        batch = prefill_inputs(plan)
        assert batch.inputs["input_ids"].shape == (1, sum(plan.chunks)) and sum(plan.chunks) <= 48 or \
            len(plan.requests) == 1, plan.chunks  # one row; several prompts only while they fit the budget
        segments = batch.inputs["attention_plan"].segments  # each prompt attends to its own slot only
        assert [(s.slot, s.q1 - s.q0) for s in segments] == [(r.row, c) for r, c in zip(plan.requests, plan.chunks)]
        packed.append(len(plan.requests))
        return batch

    def record_decode(requests):
        batch = decode_inputs(requests)
        decodes.append((batch.inputs["attention_plan"].decode, len(requests)))  # slots the decode reads
        return batch

    kv.prefill_inputs, kv.decode_inputs = record_prefill, record_decode
    assert_matches_generate(tiny_model, tokenizer, generate_all(engine), PROMPTS)
    assert max(packed) >= 2, packed  # some forward packed several prompts
    assert all(rows == running for rows, running in decodes), decodes  # no idle slot was decoded
    assert sorted(kv.free) == [0, 1, 2, 3] and not kv.owners


def test_compiled_decode_equals_generate_and_compiles_once(tiny_model, tokenizer, monkeypatch):
    # The eager backend traces exactly what inductor would compile, without minutes of codegen on CI.
    monkeypatch.setenv("DISTGEN_COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, compile="on", scheduler="continuous")
    engine = engine_for(tiny_model, tokenizer, PROMPTS, cfg)
    assert engine.runner.compiled and "static" in engine.choice
    assert_matches_generate(tiny_model, tokenizer, generate_all(engine), PROMPTS)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert engine.runner.compile_seconds > 0  # the first compiled step, reported in the rank's stats


def test_chunked_scheduler_splits_prompts_under_the_token_budget():
    waiting = deque(Request(Prompt(i, str(i), ""), [5] * n, 4, None) for i, n in enumerate([10, 3, 7]))
    state = lambda running, last: SchedulerState(waiting, running, free_rows=2 - len(running), token_budget=8,
                                                 last_kind=last)
    first = SCHEDULERS.get("chunked")(state([], ""))
    assert [r.prompt.index for r in first.requests] == [0] and first.chunks == [8]
    waiting[0].status, waiting[0].prefilled = Status.PREFILLING, 8
    running = [waiting.popleft()]
    second = SCHEDULERS.get("chunked")(state(running, "prefill"))
    assert [r.prompt.index for r in second.requests] == [0, 1] and second.chunks == [2, 3]
    running[0].status = Status.DECODING
    assert SCHEDULERS.get("chunked")(state(running, "prefill")).kind == "decode"
    assert SCHEDULERS.get("static")(state(running, "decode")).kind == "decode"
    assert SCHEDULERS.get("continuous")(state(running, "decode")).chunks == [3]


def test_mixing_schedulers_decode_the_running_rows_with_the_prompts_they_admit():
    waiting = deque(Request(Prompt(i, str(i), ""), [5] * n, 4, None) for i, n in enumerate([10, 3, 7]))
    decoding = Request(Prompt(9, "9", ""), [5] * 4, 4, None, status=Status.DECODING, prefilled=4, row=0)
    state = lambda running, last, budget=8: SchedulerState(waiting, running, free_rows=3 - len(running),
                                                           token_budget=budget, last_kind=last, mixes=True)
    plan = SCHEDULERS.get("continuous")(state([decoding], "decode"))  # whole prompts, under the budget
    assert plan.kind == "mixed" and plan.decodes == 1 and plan.chunks == [1, 10]
    assert [plan.prefills(i) for i in range(2)] == [False, True]
    assert plan.part("prefill").requests == [waiting[0]] and plan.part("decode").requests == [decoding]
    plan = SCHEDULERS.get("chunked")(state([decoding], "prefill"))  # no alternating: the decode rides along
    assert plan.kind == "mixed" and plan.decodes == 1 and plan.chunks == [1, 7]  # budget 8 less 1 decode token
    plan = SCHEDULERS.get("chunked")(state([decoding] * 2, "prefill", budget=3))  # prompts keep half the budget
    assert plan.chunks == [1, 1, 2]
    assert SCHEDULERS.get("static")(state([decoding], "decode")).kind == "decode"  # a static batch never mixes
    assert SCHEDULERS.get("continuous")(state([], "")).kind == "prefill"  # nothing decoding: a plain prefill


@pytest.mark.parametrize("scheduler", ["continuous", "chunked"])
@pytest.mark.parametrize("kernels", ["auto", "torch"])  # distgen's stack and decode kernel; transformers' + SDPA
def test_mixed_steps_equal_generate_and_save_forwards(tiny_model, tokenizer, scheduler, kernels):
    """Admitting a prompt (or a chunk of one) while rows decode runs both in one forward; the tokens are
    generate's, with fewer forwards than the steps that pause the decoding rows."""
    records = [*PROMPTS, {"id": "late", "prompt": "A prompt admitted while others decode " * 3, "max_new_tokens": 9}]
    steps = {}
    for mixed in (True, False):
        cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, cache="static", compile="off",
                               scheduler=scheduler, prefill_chunk_tokens=24, cpu_kernels=kernels, mixed_steps=mixed)
        engine = engine_for(tiny_model, tokenizer, records, cfg)
        kinds = []
        execute = engine.execute
        engine.execute = lambda plan: (kinds.append(plan.kind), execute(plan))[1]
        assert_matches_generate(tiny_model, tokenizer, generate_all(engine), records)
        assert ("mixed" in kinds) == mixed, kinds
        assert sorted(engine.kv.free) == [0, 1, 2] and not engine.kv.owners
        steps[mixed] = len(kinds)
    assert steps[True] < steps[False], steps


def test_mixed_steps_keep_each_prompts_sampled_tokens(tiny_model, tokenizer):
    # Each prompt draws from its own seeded generator: riding along a prefill forward changes no draw.
    got = {}
    for mixed in (True, False):
        cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=2, cache="static", compile="off",
                               do_sample=True, temperature=0.9, top_k=20, seed=3, mixed_steps=mixed)
        got[mixed] = {k: c.token_ids for k, c in generate_all(engine_for(tiny_model, tokenizer, PROMPTS, cfg)).items()}
    assert got[True] == got[False]


def test_auto_compile_leaves_the_decode_step_to_the_engines_own_cuda_graphs(tokenizer, monkeypatch):
    """bf16 on CUDA in a static slot cache: cuda_varlen's decode step is replayed from the engine's own CUDA graphs,
    so generation.compile=auto does not compile it however many steps the job has (compile=on still does); where
    those graphs cannot run (fp32: torch_sdpa; lockstep; another cache) auto compiles as before."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100, for the plan
    cuda, gen = torch.device("cuda"), GenerationConfig()
    model = build_tiny_model(TinyModelConfig(), tokenizer)
    plan = plan_compile(gen, model, COMPILE_MIN_DECODE_STEPS, lockstep=False, device=cuda)
    assert plan.enabled
    assert own_graphs(gen, model, cuda, False, None, "static", 64) is None  # fp32 keeps torch_sdpa
    half = model.to(torch.bfloat16)
    assert own_graphs(gen, half, cuda, False, None, "static", 64) == "cuda_varlen"
    assert own_graphs(gen, half, cuda, True, None, "static", 64) is None  # lockstep: no graphs
    assert own_graphs(gen, half, cuda, False, None, "quantized", 64) is None
    assert own_graphs(gen, half, torch.device("cpu"), False, None, "static", 64) is None
    kept = graphs_over_compile(plan, gen, "cuda_varlen")
    assert not kept.enabled and "own CUDA graphs replay the decode step (cuda_varlen" in kept.reason
    assert graphs_over_compile(plan, gen, None) is plan
    asked = plan_compile(GenerationConfig(compile="on"), model, 10, lockstep=False, device=cuda)
    assert graphs_over_compile(asked, GenerationConfig(compile="on"), "cuda_varlen") is asked


def test_auto_choices_say_why(tiny_model):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # the plan only reads the device type
    small = plan_compile(GenerationConfig(), tiny_model, decode_steps=10, lockstep=False, device=cuda)
    assert not small.enabled and "too few" in small.reason
    assert plan_compile(GenerationConfig(), tiny_model, COMPILE_MIN_DECODE_STEPS, lockstep=False, device=cuda).enabled
    for steps in (COMPILE_MIN_DECODE_STEPS, 10**6):  # auto never compiles on CPU: it was not measured faster
        on_cpu = plan_compile(GenerationConfig(), tiny_model, steps, lockstep=False, device=cpu)
        assert not on_cpu.enabled and "on CPU a compile is not measured faster" in on_cpu.reason
    asked = plan_compile(GenerationConfig(compile="on"), tiny_model, 10**6, lockstep=False, device=cpu)
    assert asked.enabled and asked.freeze  # a CPU compile freezes the weights (C++ GEMMs)
    assert not plan_compile(GenerationConfig(compile="on"), tiny_model, 1, lockstep=True, device=cpu).freeze
    sharded = plan_compile(GenerationConfig(), tiny_model, 10**6, lockstep=True, device=cuda)
    assert not sharded.enabled and "lockstep" in sharded.reason
    assert plan_compile(GenerationConfig(compile="on"), tiny_model, 10, lockstep=True, device=cpu).enabled
    assert not plan_compile(GenerationConfig(compile="off"), tiny_model, 10**6, lockstep=False, device=cuda).enabled
    assert plan_cache(GenerationConfig(), tiny_model, compiling=True)[0] == "static"
    assert plan_cache(GenerationConfig(), tiny_model, compiling=False)[0] == "static"
    assert plan_cache(GenerationConfig(scheduler="chunked"), tiny_model, compiling=False)[0] == "static"
    assert plan_cache(GenerationConfig(), tiny_model, compiling=False, need=2 << 30, budget=1 << 30)[0] == "quantized"
    with pytest.raises(ConfigError, match="generation.cache=sliding_window is not possible: its config has no "
                                          "sliding_window"):
        plan_cache(GenerationConfig(cache="sliding_window"), tiny_model, compiling=False)


@pytest.mark.parametrize("values,match", [
    ({"scheduler": "chunked", "cache": "dynamic"}, "generation.cache='dynamic'"),
    ({"compile": "on", "cache": "dynamic"}, "generation.compile=on needs"),
    ({"scheduler": "rolling"}, "expected one of static, continuous, chunked"),
    ({"cache": "paged"}, "generation.cache='paged'"),
    ({"prefill_chunk_tokens": 0}, "generation.prefill_chunk_tokens"),
])
def test_bad_engine_settings_are_config_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        check_section("generation", GenerationConfig(**values))


@pytest.mark.parametrize("scheduler", ["continuous", "chunked"])
def test_quantized_cache_runs_keeps_shapes_and_is_smaller(tiny_model, tokenizer, scheduler):
    # int8 keys/values change a random model's tokens, so only the shapes and budgets are checked
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, cache="quantized", compile="off",
                           scheduler=scheduler, prefill_chunk_tokens=8)
    engine = engine_for(tiny_model, tokenizer, PROMPTS, cfg)
    got = generate_all(engine)
    assert [len(got[r["id"]].token_ids) for r in PROMPTS] == [r.get("max_new_tokens", DEFAULT_BUDGET) for r in PROMPTS]
    layer = engine.kv.cache.layers[0]
    assert layer.keys.dtype == torch.int8 and layer.keys.shape[:3] == layer.key_scales.shape[:3]
    assert layer.keys.shape == (3, 2, engine.kv.max_len + 1, 16)


@pytest.mark.parametrize("scheduler", ["continuous", "chunked"])
def test_sliding_window_cache_equals_generate(sliding_model, tokenizer, scheduler):
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, scheduler=scheduler, compile="off",
                           prefill_chunk_tokens=5, cache="sliding_window")
    engine = engine_for(sliding_model, tokenizer, PROMPTS, cfg)
    assert "cache=sliding_window" in engine.choice
    longest_chunk = 5 if scheduler == "chunked" else max(len(tokenizer(p["prompt"])["input_ids"]) for p in PROMPTS)
    assert engine.kv.max_len == 6 + longest_chunk - 1  # only the window (and one chunk) is cached
    assert_matches_generate(sliding_model, tokenizer, generate_all(engine), PROMPTS)


def peak_rss_growth_kib(run) -> int:
    """Peak RSS above the starting RSS while `run()` runs (Linux: clear_refs resets the peak)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    status = lambda key: int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    base = status("VmRSS")
    run()
    return status("VmHWM") - base


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak RSS")
def test_chunked_prefill_of_a_4k_prompt_same_tokens_lower_peak(tokenizer):
    # wide enough that a whole prefill's activations (tokens x 1024 per MLP tensor) stand well above the
    # allocator's noise in RSS (a few MiB either way)
    tiny_model = build_tiny_model(TinyModelConfig(layers=2, hidden_size=256, heads=4, kv_heads=2,
                                                  intermediate_size=1024, seed=7), tokenizer).eval()
    records = [{"id": "long", "prompt": "".join(chr(97 + (i * 7) % 26) for i in range(4000)), "max_new_tokens": 4}]
    tokens, peaks = {}, {}
    # a chunked run first pays the one-time costs (lazy kernels, position tables) outside both figures
    warm = GenerationConfig(batch_size=1, compile="off", scheduler="chunked", prefill_chunk_tokens=256)
    generate_all(engine_for(tiny_model, tokenizer, records, warm))
    # chunked first: memory it frees and the allocator keeps would only lower the whole prefill's figure
    for name, settings in [("chunked", {"scheduler": "chunked", "prefill_chunk_tokens": 256}),
                           ("whole", {"scheduler": "continuous", "cache": "static"})]:
        cfg = GenerationConfig(batch_size=1, compile="off", **settings)
        engine = engine_for(tiny_model, tokenizer, records, cfg)
        peaks[name] = peak_rss_growth_kib(lambda: tokens.update({name: generate_all(engine)["long"].token_ids}))
    assert tokens["chunked"] == tokens["whole"] == reference_greedy(tiny_model, tokenizer, records[0]["prompt"], 4, [])
    # one 4k-token prefill holds every token's activations at once; chunks of 256 hold 16x fewer
    assert peaks["chunked"] < peaks["whole"] / 2, peaks
