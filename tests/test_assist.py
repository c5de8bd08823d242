"""Assisted (speculative) generation: greedy output equals plain greedy token for token, the
speculative-sampling rule draws from the main model's distribution, and lockstep ranks stay in step."""
import copy

import pytest
import torch

from distgen.catalog import check_section
from distgen.config import GenerationConfig, ModelConfig, TinyModelConfig
from distgen.engine.backoff import INJECT_ENV
from distgen.engine.assist import AssistantSpec, accept_greedy, accept_sampled, lookup_ngram
from distgen.common.errors import ConfigError
from distgen.engine.stops import StopStrings
from distgen.models.tiny import build_tiny_model
from tests.helpers import (DEFAULT_BUDGET, PROMPTS, engine_for, generate_all, read_outputs, read_stats,
                           reference_greedy, run_module, write_prompts)

# A record whose text repeats, so prompt lookup finds n-grams, and one cut by a stop string.
RECORDS = [*PROMPTS,
           {"id": "repeat", "prompt": "ab ab ab ab ab ab ab ab", "max_new_tokens": 11},
           {"id": "long", "prompt": "The end of the story", "max_new_tokens": 13}]


@pytest.fixture(scope="module")
def eos(tiny_model, tokenizer):
    """A token "france" produces early, so EOS lands inside accepted drafts for some rows."""
    return reference_greedy(tiny_model, tokenizer, "The capital of France is", DEFAULT_BUDGET, [])[2]


@pytest.fixture(scope="module")
def greedy_reference(tiny_model, tokenizer, eos):
    return {r["id"]: reference_greedy(tiny_model, tokenizer, r["prompt"], r.get("max_new_tokens", DEFAULT_BUDGET),
                                      [eos]) for r in RECORDS}


def near_copy(model, noise: float):
    """The main model with its weights nudged: a draft that agrees on some tokens, not all."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise)
    return draft


@pytest.mark.parametrize("kind,schedule,extra", [
    ("tiny", "constant", {}), ("tiny", "heuristic", {"num_assistant_tokens": 3}),
    ("near", "heuristic", {"assistant_confidence_threshold": 0.05}),
    ("near", "constant", {"scheduler": "chunked", "prefill_chunk_tokens": 7}),
    ("self", "heuristic", {"scheduler": "chunked", "prefill_chunk_tokens": 5}),
    ("near", "heuristic", {"cache": "dynamic"}), ("prompt_lookup", "constant", {"prompt_lookup_ngram": 2}),
    ("prompt_lookup", "heuristic", {"batch_size": 2, "cache": "dynamic"})])
def test_assisted_greedy_equals_plain_greedy(kind, schedule, extra, tiny_model, tokenizer, eos, greedy_reference):
    drafts = {"tiny": build_tiny_model(TinyModelConfig(seed=1), tokenizer), "near": near_copy(tiny_model, 0.01),
              "self": tiny_model, "prompt_lookup": None}
    spec = AssistantSpec("prompt_lookup" if kind == "prompt_lookup" else "draft", drafts[kind])
    cfg = GenerationConfig(**{"max_new_tokens": DEFAULT_BUDGET, "batch_size": 3, "compile": "off",
                              "assistant_schedule": schedule, **extra})
    engine = engine_for(tiny_model, tokenizer, RECORDS, cfg, [eos], assistant=spec)
    widths = []  # dynamic cache: (columns after a verify, most tokens a row caches); rejected columns leave
    if cfg.cache == "dynamic":
        verified = engine.kv.verified
        engine.kv.verified = lambda requests, *rest: (verified(requests, *rest), widths.append(
            (engine.kv.mask.shape[1], max(r.prompt_length + len(r.generated) - 1 for r in requests))))
    got = generate_all(engine)
    assert {k: c.token_ids for k, c in got.items()} == greedy_reference
    assert all(columns <= longest for columns, longest in widths) and (cfg.cache != "dynamic" or widths)
    assert got["france"].finish_reason == "eos" and got["long"].finish_reason == "length"
    counters = engine.assistant.counters
    assert counters.proposed > 0 and engine.kv.free_rows == cfg.batch_size
    if kind == "self":  # the main model as its own draft (its cache caught up in chunks): every draft token is kept
        assert counters.accepted == counters.proposed
    if kind == "near":  # partial agreement: rows rewind to different lengths
        assert 0 < counters.accepted < counters.proposed
    if kind == "tiny":
        assert counters.accepted < counters.proposed / 2


def test_stop_strings_and_budgets_cut_inside_accepted_drafts(tiny_model, tokenizer):
    plain_cfg = GenerationConfig(max_new_tokens=12, batch_size=2, compile="off")
    records = [{"id": r["id"], "prompt": r["prompt"], "max_new_tokens": 12} for r in RECORDS]
    plain = generate_all(engine_for(tiny_model, tokenizer, records, plain_cfg))
    stops = StopStrings(tokenizer)
    # stop at the text of each record's 4th..6th generated tokens: it appears mid-draft for the self draft
    for record in records:
        record["stop"] = [tokenizer.decode(plain[record["id"]].token_ids[3:6])]
    want = generate_all(engine_for(tiny_model, tokenizer, records, plain_cfg, stop_check=stops.hit))
    assisted = engine_for(tiny_model, tokenizer, records, plain_cfg, stop_check=stops.hit,
                          assistant=AssistantSpec("draft", tiny_model))
    got = generate_all(assisted)
    assert {k: (c.token_ids, c.finish_reason) for k, c in got.items()} == \
           {k: (c.token_ids, c.finish_reason) for k, c in want.items()}
    assert sum(c.finish_reason == "stop" for c in got.values()) >= len(records) - 2
    assert assisted.assistant.counters.accepted > 0


def test_oom_backoff_restarts_assisted_rows_afresh(tiny_model, tokenizer, eos, greedy_reference, monkeypatch):
    # Step 3 is an assisted decode: the requeued prompts come back as new requests with empty draft caches.
    monkeypatch.setenv(INJECT_ENV, "3")
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=4, compile="off", assistant_schedule="heuristic")
    engine = engine_for(tiny_model, tokenizer, RECORDS, cfg, [eos], assistant=AssistantSpec("draft", tiny_model))
    got = generate_all(engine)
    assert engine.backoff.count == 1 and engine.backoff.rows == 2
    assert {k: c.token_ids for k, c in got.items()} == greedy_reference
    counters = engine.assistant.counters
    assert counters.accepted == counters.proposed > 0  # a stale draft cache would break the self-draft's agreement


def test_sliding_window_ring_holds_a_whole_verify(sliding_model, tokenizer):
    # A ring of window + chunk - 1 columns: the verify's k + 1 tokens must not overwrite what they attend to.
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, compile="off", num_assistant_tokens=9,
                           cache="sliding_window")
    engine = engine_for(sliding_model, tokenizer, RECORDS[1:5], cfg, assistant=AssistantSpec("draft", sliding_model))
    assert "cache=sliding_window" in engine.choice and engine.kv.max_len >= 6 + 10 - 1
    got = generate_all(engine)
    for record in RECORDS[1:5]:
        budget = record.get("max_new_tokens", DEFAULT_BUDGET)
        want = reference_greedy(sliding_model, tokenizer, record["prompt"], budget, [])
        assert got[record["id"]].token_ids == want, record["id"]


def test_speculative_sampling_draws_from_the_target_distribution():
    # p: the main model's distribution; q: the draft's. Whatever q proposes, the first emitted token ~ p.
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05, 0.0], [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.4, 0.1, 0.1, 0.1, 0.2]])
    generator = torch.Generator().manual_seed(0)
    trials = 3000
    first = torch.zeros(6)
    accepted = 0
    for _ in range(trials):
        draft = int(torch.multinomial(q[0], 1, generator=generator))
        emitted, kept = accept_sampled(p, q, [draft], generator)
        first[emitted[0]] += 1
        accepted += kept
        assert len(emitted) == kept + 1
    assert torch.allclose(first / trials, p[0], atol=0.03), first / trials
    assert abs(accepted / trials - float(torch.minimum(p[0], q[0]).sum())) < 0.03  # P(accept) = sum min(p, q)
    # A deterministic proposal (prompt lookup): q is one-hot on the draft token.
    first = torch.zeros(6)
    for _ in range(trials):
        emitted, _ = accept_sampled(p, None, [1], generator)
        first[emitted[0]] += 1
    assert torch.allclose(first / trials, p[0], atol=0.03), first / trials


def test_accept_rules_and_lookup_keep_the_longest_agreeing_prefix():
    assert accept_greedy([4, 5, 6, 7], [4, 5, 9]) == ([4, 5, 6], 2)
    assert accept_greedy([4, 5, 6, 7], [4, 5, 6]) == ([4, 5, 6, 7], 3)
    assert accept_greedy([8], []) == ([8], 0)
    assert lookup_ngram([1, 2, 3, 9, 1, 2, 3, 4, 1, 2], 3, 2) == [3, 4]  # the latest match of [1, 2]
    assert lookup_ngram([5, 6, 7], 3, 2) == []


def test_sampled_assisted_runs_are_seeded_and_keep_budgets(tiny_model, tokenizer, eos):
    records = [{**r, "temperature": 0.7} if i % 2 else r for i, r in enumerate(RECORDS)]
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, compile="off", seed=5,
                           assistant_schedule="heuristic")
    runs = [generate_all(engine_for(tiny_model, tokenizer, records, cfg, [eos],
                                    assistant=AssistantSpec("draft", near_copy(tiny_model, 0.01)))) for _ in range(2)]
    assert {k: c.token_ids for k, c in runs[0].items()} == {k: c.token_ids for k, c in runs[1].items()}
    for record in records:
        tokens = runs[0][record["id"]].token_ids
        assert 1 <= len(tokens) <= record.get("max_new_tokens", DEFAULT_BUDGET)
        assert eos not in tokens[:-1]


@pytest.mark.parametrize("values,match", [
    ({"num_assistant_tokens": 0}, "generation.num_assistant_tokens"),
    ({"assistant_schedule": "grow"}, "expected one of constant, heuristic"),
    ({"assistant_confidence_threshold": 1.5}, "generation.assistant_confidence_threshold"),
    ({"prompt_lookup_ngram": 0}, "generation.prompt_lookup_ngram")])
def test_bad_assistant_settings_are_config_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        check_section("generation", GenerationConfig(**values))


def test_bad_assistant_choices_name_the_key(tiny_model, tokenizer):
    with pytest.raises(ConfigError, match="model.assistant='medusa'.*none, tiny, prompt_lookup, draft"):
        check_section("model", ModelConfig(source="tiny", assistant="medusa"))
    with pytest.raises(ConfigError, match="model.assistant=draft needs model.assistant_path"):
        check_section("model", ModelConfig(source="tiny", assistant="draft"))
    with pytest.raises(ConfigError, match="only model.assistant=draft reads it"):
        check_section("model", ModelConfig(source="tiny", assistant="tiny", assistant_path="/x"))
    lookup = AssistantSpec("prompt_lookup")
    with pytest.raises(ConfigError, match="generation.compile=on is not possible with model.assistant"):
        engine_for(tiny_model, tokenizer, PROMPTS, GenerationConfig(compile="on"), assistant=lookup)
    wide = build_tiny_model(TinyModelConfig(seed=1), tokenizer)
    wide.resize_token_embeddings(len(tokenizer) + 8)
    with pytest.raises(ConfigError, match="vocabulary"):
        engine_for(tiny_model, tokenizer, PROMPTS, GenerationConfig(), assistant=AssistantSpec("draft", wide))


@pytest.mark.parametrize("layout,assistant", [
    ("replicate", ["model.assistant=prompt_lookup", "generation.prompt_lookup_ngram=2"]),
    ("fsdp", ["model.assistant=tiny", "generation.assistant_schedule=heuristic"]),
    ("zero3", ["model.assistant=tiny", "layout.param_persistence_threshold=0"])])
def test_two_ranks_assisted_equal_generate_and_lockstep_ranks_stay_in_step(layout, assistant, tiny_model_dir,
                                                                           tiny_model, tokenizer, eos, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", RECORDS)
    out = tmp_path / "out"
    result = run_module("distgen.run", [f"model={tiny_model_dir}", f"dataset={prompts}", f"output.dir={out}",
                                        f"generation.max_new_tokens={DEFAULT_BUDGET}", "generation.batch_size=2",
                                        f"layout={layout}", f"generation.eos_token_ids=[{eos}]", *assistant], nproc=2)
    assert result.returncode == 0, result.stderr
    records = read_outputs(out)
    assert [r["id"] for r in records] == [r["id"] for r in RECORDS]
    for record, prompt in zip(records, RECORDS):
        want = reference_greedy(tiny_model, tokenizer, prompt["prompt"], prompt.get("max_new_tokens", DEFAULT_BUDGET),
                                [eos])
        assert record["completion_token_ids"] == want, prompt["id"]
    ranks = read_stats(out)["ranks"]
    assert all(s["draft_proposed"] > 0 and 0 <= s["acceptance_rate"] <= 1 for s in ranks)
    assert "draft tokens accepted" in result.stdout
    steps = [s["forward_steps"] for s in ranks]
    assert steps[0] != steps[1], "the prompts should make the ranks finish at different steps"
    if layout != "replicate":  # one main forward per step on every rank: the one done first joins with dummies
        assert len({s["forward_steps"] + s["idle_steps"] for s in ranks}) == 1
        assert max(s["idle_steps"] for s in ranks) > 0
