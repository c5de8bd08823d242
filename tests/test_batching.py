"""The engine in one process against `model.generate`, token for token."""
import pytest
import torch

from distgen.config import GenerationConfig
from distgen.engine import build_engine
from distgen.parallel.loop import run_loop
from distgen.inputs.records import Prompt
from tests.helpers import DEFAULT_BUDGET, PROMPTS, reference_greedy

CPU = torch.device("cpu")


def make_engine(model, tokenizer, records, cfg, eos_ids, batch_size=None):
    if batch_size is not None:
        cfg = GenerationConfig(**{**vars(cfg), "batch_size": batch_size})
    prompts = [Prompt(i, r["id"], r["prompt"], r.get("max_new_tokens")) for i, r in enumerate(records)]
    queue = [(p, tokenizer(p.text)["input_ids"]) for p in prompts]
    return build_engine(model, queue, cfg, tokenizer.pad_token_id, eos_ids, CPU)


def decode_all(model, tokenizer, records, cfg, eos_ids, batch_size, scheduler="continuous", counters=None,
               cache="dynamic"):
    cfg = GenerationConfig(**{**vars(cfg), "scheduler": scheduler, "compile": "off", "cache": cache})
    engine = make_engine(model, tokenizer, records, cfg, eos_ids, batch_size)
    completions = []
    with torch.no_grad():
        counted = run_loop(engine, lockstep=False, idle_step=lambda: None, device=CPU, on_finished=completions.extend)
    assert not engine.has_work
    if counters is not None:
        counters.append(counted)
    return {c.prompt.id: c for c in completions}


@pytest.mark.parametrize("scheduler,cache", [("continuous", "dynamic"), ("static", "dynamic"),
                                             ("continuous", "static"), ("static", "static")])
def test_batched_greedy_equals_generate_per_prompt(tiny_model, tokenizer, scheduler, cache):
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET)
    got = decode_all(tiny_model, tokenizer, PROMPTS, cfg, [], 3, scheduler, cache=cache)
    for record in PROMPTS:
        budget = record.get("max_new_tokens", DEFAULT_BUDGET)
        want = reference_greedy(tiny_model, tokenizer, record["prompt"], budget, [])
        assert got[record["id"]].token_ids == want, record["id"]
        assert got[record["id"]].finish_reason == "length"


@pytest.mark.parametrize("scheduler,cache", [("continuous", "dynamic"), ("static", "dynamic"),
                                             ("continuous", "static"), ("chunked", "static")])
def test_eos_stops_only_its_sequence(tiny_model, tokenizer, scheduler, cache):
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, prefill_chunk_tokens=16)
    free_run = decode_all(tiny_model, tokenizer, PROMPTS, cfg, [], 4, cache="dynamic")
    eos = free_run["france"].token_ids[2]
    got = decode_all(tiny_model, tokenizer, PROMPTS, cfg, [eos], 4, scheduler, cache=cache)
    assert got["france"].token_ids == free_run["france"].token_ids[:3]
    assert got["france"].finish_reason == "eos"
    for record in PROMPTS:
        budget = record.get("max_new_tokens", DEFAULT_BUDGET)
        assert got[record["id"]].token_ids == reference_greedy(tiny_model, tokenizer, record["prompt"], budget, [eos])
    assert any(c.finish_reason == "length" for c in got.values())


def test_seeded_sampling_does_not_depend_on_batching(tiny_model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=40, top_p=0.9, seed=3)
    alone = decode_all(tiny_model, tokenizer, PROMPTS, cfg, [], batch_size=1)
    batched = decode_all(tiny_model, tokenizer, PROMPTS, cfg, [], batch_size=4)
    static = decode_all(tiny_model, tokenizer, PROMPTS, cfg, [], batch_size=3, scheduler="static")
    slots = decode_all(tiny_model, tokenizer, PROMPTS, cfg, [], batch_size=3, cache="static")
    assert {k: c.token_ids for k, c in static.items()} == {k: c.token_ids for k, c in batched.items()}
    assert {k: c.token_ids for k, c in alone.items()} == {k: c.token_ids for k, c in batched.items()}
    assert {k: c.token_ids for k, c in slots.items()} == {k: c.token_ids for k, c in batched.items()}
    greedy = decode_all(tiny_model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=6), [], batch_size=4)
    assert {k: c.token_ids for k, c in alone.items()} != {k: c.token_ids for k, c in greedy.items()}
    reseeded = decode_all(tiny_model, tokenizer, PROMPTS, GenerationConfig(**{**vars(cfg), "seed": 4}), [], 4)
    assert {k: c.token_ids for k, c in reseeded.items()} != {k: c.token_ids for k, c in batched.items()}


def test_continuous_batching_refills_rows_and_needs_fewer_steps(tiny_model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET)
    continuous, static = [], []
    decode_all(tiny_model, tokenizer, PROMPTS, cfg, [], 3, "continuous", counters=continuous)
    decode_all(tiny_model, tokenizer, PROMPTS, cfg, [], 3, "static", counters=static)
    # static: 3 batches, each a prefill plus decode steps up to its longest budget (14, 8, 8)
    assert static[0].forward_steps == 14 + 8 + 8
    assert continuous[0].forward_steps < static[0].forward_steps


def test_dynamic_cache_drops_columns_no_row_needs(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=DEFAULT_BUDGET,
                                                                          cache="dynamic", batch_size=2), [])
    longest_life = max(len(r.token_ids) + r.budget for r in engine.waiting)
    kv, widths = engine.kv, []
    with torch.no_grad():
        while engine.has_work:
            engine.step()
            widths.append(kv.mask.shape[1])
            assert kv.mask.shape[0] == len(engine.running) == kv.cache.layers[0].keys.shape[0]
            assert all(layer.keys.shape[2] == kv.mask.shape[1] for layer in kv.cache.layers)
    assert max(widths) <= longest_life
