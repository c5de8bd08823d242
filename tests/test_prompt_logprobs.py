"""Prompt logprobs (issue 24 item 2's optional part): generation.prompt_logprobs=K and a record's own, as vLLM's
SamplingParams.prompt_logprobs, equal to log_softmax of an HF forward of the whole prompt."""
import pytest
import torch

from distgen.config import GenerationConfig
from distgen.run import main as run_in_process
from tests.helpers import (DEFAULT_BUDGET, PROMPTS, assert_matches_generate, engine_for, generate_all,
                           generate_samples, read_outputs, write_prompts)

# The engine paths a prompt's logits take: the dynamic cache (a left-padded batch of whole prompts), the slot cache
# (whole prompts packed into one row), chunked prefill in chunks of 4 (a chunk's last position predicts the next
# chunk's first token; decode tokens mixed into the chunks' forwards), and the same with prefix sharing on.
PATHS = {
    "dynamic": dict(cache="dynamic"),
    "slots": dict(cache="static"),
    "chunked": dict(cache="static", scheduler="chunked", prefill_chunk_tokens=4, mixed_steps=False),
    "chunked-mixed-sharing": dict(cache="static", scheduler="chunked", prefill_chunk_tokens=4, mixed_steps=True,
                                  prefix_sharing="on"),
}


def path_engine(path, model, tokenizer, records, **settings):
    cfg = GenerationConfig(**{**dict(max_new_tokens=DEFAULT_BUDGET, batch_size=3, compile="off"), **PATHS[path],
                              **settings})
    return engine_for(model, tokenizer, records, cfg)


def reference(model, tokenizer, prompt: str) -> tuple[list[int], torch.Tensor]:
    """(the prompt's ids, log_softmax of HF's forward of the whole prompt: (tokens, vocab), fp32)."""
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return ids, logits.log_softmax(-1)


def assert_prompt_logprobs(entries, ids: list[int], logprobs: torch.Tensor, k: int) -> None:
    """One entry per prompt token, the first None; each the token's logprob at the position before it and the
    top-k there (torch.topk's ids and values, sorted best first)."""
    assert len(entries) == len(ids) and entries[0] is None
    for at, (token, entry) in enumerate(zip(ids[1:], entries[1:]), start=1):
        assert entry["token_id"] == token and len(entry["top"]) == k, at
        assert abs(entry["logprob"] - logprobs[at - 1, token].item()) < 1e-4, at
        best = torch.topk(logprobs[at - 1], k)
        ids_got = [alt["token_id"] for alt in entry["top"]]
        # the whole vocabulary: near-equal logprobs may trade places between two forwards, so every id once
        assert ids_got == best.indices.tolist() or k == len(logprobs[0]) and sorted(ids_got) == list(range(k)), at
        torch.testing.assert_close(torch.tensor([alt["logprob"] for alt in entry["top"]], dtype=torch.float64),
                                   best.values.double(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_prompt_logprobs_equal_an_hf_forward_of_the_prompt(path, tiny_model, tokenizer):
    """Records asking (K 0, 3, more than the vocabulary: capped) and records not asking in one batch: each asking
    record's entries equal log_softmax of HF's forward logits of its whole prompt (fp32, 1e-4) with torch.topk's
    ids; the others carry none; every completion is greedy `model.generate`'s, asking or not."""
    vocab = tiny_model.config.vocab_size
    asks = {PROMPTS[0]["id"]: 3, PROMPTS[2]["id"]: 0, PROMPTS[5]["id"]: 10 ** 6, PROMPTS[6]["id"]: 2}
    records = [dict(r, prompt_logprobs=asks[r["id"]]) if r["id"] in asks else r for r in PROMPTS]
    got = generate_all(path_engine(path, tiny_model, tokenizer, records, max_logprobs=-1))
    assert_matches_generate(tiny_model, tokenizer, got)
    for record in PROMPTS:
        completion = got[record["id"]]
        if record["id"] not in asks:
            assert completion.prompt_logprobs is None
            continue
        ids, logprobs = reference(tiny_model, tokenizer, record["prompt"])
        assert_prompt_logprobs(completion.prompt_logprobs, ids, logprobs, min(asks[record["id"]], vocab))


def test_every_sample_of_a_prompt_carries_its_prompt_logprobs(tiny_model, tokenizer):
    """generation.prompt_logprobs with n=3 and prefix sharing on: each sample prefills its whole prompt (none takes
    a shared prefix) and carries the same prompt logprobs."""
    records = [PROMPTS[1], PROMPTS[4]]
    got = generate_samples(path_engine("chunked-mixed-sharing", tiny_model, tokenizer, records, n=3,
                                       prompt_logprobs=2))
    assert len(got) == 6
    for record in records:
        ids, logprobs = reference(tiny_model, tokenizer, record["prompt"])
        for sample in range(3):
            assert_prompt_logprobs(got[record["id"], sample].prompt_logprobs, ids, logprobs, 2)


def test_a_job_writes_prompt_logprobs_on_the_records_that_ask(tiny_model_dir, tiny_model, tokenizer, tmp_path):
    """A real run (distgen.run.main in process): the field only on records that ask (their own, or
    generation.prompt_logprobs for the rest), equal to the HF forward's; completions unchanged."""
    records = [{"id": "asks", "prompt": PROMPTS[0]["prompt"], "prompt_logprobs": 1},
               {"id": "plain", "prompt": PROMPTS[3]["prompt"]},
               {"id": "zero", "prompt": PROMPTS[6]["prompt"], "prompt_logprobs": 0}]
    out = tmp_path / "out"
    assert run_in_process([f"model={tiny_model_dir}", f"dataset={write_prompts(tmp_path / 'p.jsonl', records)}",
                           f"output.dir={out}", "generation.max_new_tokens=5", "generation.scheduler=chunked",
                           "generation.prefill_chunk_tokens=4", "output.print_table=false"]) == 0
    lines = {line["id"]: line for line in read_outputs(out)}
    assert "prompt_logprobs" not in lines["plain"]
    for record, k in ((records[0], 1), (records[2], 0)):
        ids, logprobs = reference(tiny_model, tokenizer, record["prompt"])
        assert_prompt_logprobs(lines[record["id"]]["prompt_logprobs"], ids, logprobs, k)
    for line in lines.values():
        ids = torch.tensor([tokenizer(line["prompt"])["input_ids"]])
        want = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                   eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
        new = want[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id) + 1]
        assert line["completion_token_ids"] == new


@pytest.mark.parametrize("value", [-1, 1.5, "2"])
def test_a_bad_prompt_logprobs_is_refused(value):
    from distgen.catalog import check_section
    from distgen.common.errors import ConfigError
    from distgen.inputs.records import overrides_of
    with pytest.raises(ConfigError, match="generation.prompt_logprobs"):
        check_section("generation", GenerationConfig(prompt_logprobs=value))
    assert overrides_of({"prompt_logprobs": value})[1].startswith(f"prompt_logprobs={value!r} is not allowed")


def test_assisted_generation_keeps_prompt_logprobs(tiny_model, tokenizer):
    """With a draft model verifying drafts, prompts are still prefilled by the model: the entries equal the HF
    forward's, the completions greedy `model.generate`'s."""
    from distgen.engine.assist import AssistantSpec
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, compile="off", prompt_logprobs=2)
    got = generate_all(engine_for(tiny_model, tokenizer, PROMPTS, cfg, assistant=AssistantSpec("draft", tiny_model)))
    assert_matches_generate(tiny_model, tokenizer, got)
    for record in PROMPTS:
        ids, logprobs = reference(tiny_model, tokenizer, record["prompt"])
        assert_prompt_logprobs(got[record["id"]].prompt_logprobs, ids, logprobs, 2)
