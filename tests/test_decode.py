"""The decode loop in one process against `model.generate`, token for token."""
import pytest
import torch

from conftest import DEFAULT_BUDGET, PROMPTS, reference_greedy
from distgen.config import GenerationConfig
from distgen.decode import RollingBatch
from distgen.loop import run_loop
from distgen.prompts import Prompt

CPU = torch.device("cpu")


def decode_all(model, tokenizer, records, cfg, eos_ids, batch_size, refill=True, counters=None):
    prompts = [Prompt(i, r["id"], r["prompt"], r.get("max_new_tokens")) for i, r in enumerate(records)]
    queue = [(p, tokenizer(p.text)["input_ids"]) for p in prompts]
    batch = RollingBatch(queue, cfg, tokenizer.pad_token_id, eos_ids, CPU, max_rows=batch_size, refill=refill)
    completions = []
    with torch.no_grad():
        counted = run_loop(model, batch, lockstep=False, idle_step=lambda: None, device=CPU,
                           on_finished=completions.extend)
    assert not batch.has_work
    if counters is not None:
        counters.append(counted)
    return {c.prompt.id: c for c in completions}


@pytest.mark.parametrize("refill", [True, False], ids=["continuous", "static"])
def test_batched_greedy_equals_generate_per_prompt(tiny_model, tokenizer, refill):
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET)
    got = decode_all(tiny_model, tokenizer, PROMPTS, cfg, eos_ids=[], batch_size=3, refill=refill)
    for record in PROMPTS:
        budget = record.get("max_new_tokens", DEFAULT_BUDGET)
        want = reference_greedy(tiny_model, tokenizer, record["prompt"], budget, [])
        assert got[record["id"]].token_ids == want, record["id"]
        assert got[record["id"]].finish_reason == "length"


@pytest.mark.parametrize("refill", [True, False], ids=["continuous", "static"])
def test_eos_stops_only_its_sequence(tiny_model, tokenizer, refill):
    free_run = decode_all(tiny_model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=DEFAULT_BUDGET), [], 4)
    eos = free_run["france"].token_ids[2]
    got = decode_all(tiny_model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=DEFAULT_BUDGET), [eos], 4,
                     refill=refill)
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
    static = decode_all(tiny_model, tokenizer, PROMPTS, cfg, [], batch_size=3, refill=False)
    assert {k: c.token_ids for k, c in static.items()} == {k: c.token_ids for k, c in batched.items()}
    assert {k: c.token_ids for k, c in alone.items()} == {k: c.token_ids for k, c in batched.items()}
    greedy = decode_all(tiny_model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=6), [], batch_size=4)
    assert {k: c.token_ids for k, c in alone.items()} != {k: c.token_ids for k, c in greedy.items()}
    reseeded = decode_all(tiny_model, tokenizer, PROMPTS, GenerationConfig(**{**vars(cfg), "seed": 4}), [], 4)
    assert {k: c.token_ids for k, c in reseeded.items()} != {k: c.token_ids for k, c in batched.items()}


def test_continuous_batching_refills_rows_and_needs_fewer_steps(tiny_model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET)
    continuous, static = [], []
    decode_all(tiny_model, tokenizer, PROMPTS, cfg, [], batch_size=3, refill=True, counters=continuous)
    decode_all(tiny_model, tokenizer, PROMPTS, cfg, [], batch_size=3, refill=False, counters=static)
    # static: 3 batches, each a prefill plus decode steps up to its longest budget (14, 8, 8)
    assert static[0].forward_steps == 14 + 8 + 8
    assert continuous[0].forward_steps < static[0].forward_steps


def test_cache_drops_columns_no_row_needs(tiny_model, tokenizer):
    prompts = [Prompt(i, r["id"], r["prompt"], r.get("max_new_tokens")) for i, r in enumerate(PROMPTS)]
    queue = [(p, tokenizer(p.text)["input_ids"]) for p in prompts]
    batch = RollingBatch(queue, GenerationConfig(max_new_tokens=DEFAULT_BUDGET), tokenizer.pad_token_id, [], CPU,
                         max_rows=2, refill=True)
    longest_life = max(len(ids) + p.budget(DEFAULT_BUDGET) for p, ids in queue)
    widths = []
    with torch.no_grad():
        while batch.has_work:
            batch.step(tiny_model)
            widths.append(batch.mask.shape[1])
            assert batch.mask.shape[0] == len(batch.active) == batch.cache.layers[0].keys.shape[0]
            assert all(layer.keys.shape[2] == batch.mask.shape[1] for layer in batch.cache.layers)
    assert max(widths) <= longest_life
