"""The decode loop in one process against `model.generate`, token for token."""
import torch

from conftest import DEFAULT_BUDGET, PROMPTS, reference_greedy
from distgen.config import GenerationConfig
from distgen.decode import BatchDecoder
from distgen.loop import run_loop
from distgen.prompts import Prompt

CPU = torch.device("cpu")


def decode_all(model, tokenizer, records, cfg, eos_ids, batch_size):
    prompts = [Prompt(i, r["id"], r["prompt"], r.get("max_new_tokens")) for i, r in enumerate(records)]
    token_ids = [tokenizer(p.text)["input_ids"] for p in prompts]
    batches = [list(range(start, min(start + batch_size, len(prompts))))
               for start in range(0, len(prompts), batch_size)]
    decoders = (BatchDecoder([prompts[i] for i in b], [token_ids[i] for i in b], cfg, tokenizer.pad_token_id,
                             eos_ids, CPU) for b in batches)
    completions = []
    with torch.no_grad():
        run_loop(model, decoders, lockstep=False, idle_step=lambda: None, device=CPU, on_batch_done=completions.extend)
    return {c.prompt.id: c for c in completions}


def test_batched_greedy_equals_generate_per_prompt(tiny_model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET)
    got = decode_all(tiny_model, tokenizer, PROMPTS, cfg, eos_ids=[], batch_size=3)
    for record in PROMPTS:
        budget = record.get("max_new_tokens", DEFAULT_BUDGET)
        want = reference_greedy(tiny_model, tokenizer, record["prompt"], budget, [])
        assert got[record["id"]].token_ids == want, record["id"]
        assert got[record["id"]].finish_reason == "length"


def test_eos_stops_only_its_sequence(tiny_model, tokenizer):
    free_run = decode_all(tiny_model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=DEFAULT_BUDGET), [], 4)
    eos = free_run["france"].token_ids[2]
    got = decode_all(tiny_model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=DEFAULT_BUDGET), [eos], 4)
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
    assert {k: c.token_ids for k, c in alone.items()} == {k: c.token_ids for k, c in batched.items()}
    greedy = decode_all(tiny_model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=6), [], batch_size=4)
    assert {k: c.token_ids for k, c in alone.items()} != {k: c.token_ids for k, c in greedy.items()}
    reseeded = decode_all(tiny_model, tokenizer, PROMPTS, GenerationConfig(**{**vars(cfg), "seed": 4}), [], 4)
    assert {k: c.token_ids for k, c in reseeded.items()} != {k: c.token_ids for k, c in batched.items()}
