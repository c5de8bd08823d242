import dataclasses

import torch

from distgen.engine.sampling import filter_logits


def test_top_k_keeps_the_k_best():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    kept = filter_logits(logits, top_k=2, top_p=1.0).isfinite()
    assert kept.tolist() == [[False, True, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p_and_always_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_logits(probs.log(), top_k=0, top_p=0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert filter_logits(probs.log(), top_k=0, top_p=0.1).isfinite().tolist() == [[True, False, False, False]]


def test_temperature_zero_is_greedy_in_the_config_and_in_a_record(tiny_model, tokenizer):
    from distgen.catalog import check_section
    from distgen.config import GenerationConfig
    from distgen.engine.sampling import row_sampling
    from distgen.inputs.records import Prompt
    from tests.helpers import DEFAULT_BUDGET, PROMPTS, assert_matches_generate, engine_for, generate_all

    cfg = check_section("generation", GenerationConfig(max_new_tokens=DEFAULT_BUDGET, do_sample=True, temperature=0.0,
                                                       compile="off"))
    assert not row_sampling(cfg, Prompt(0, "a", "x")).do_sample
    assert row_sampling(cfg, Prompt(0, "a", "x", temperature=0.7)).do_sample  # a record's own temperature decides
    assert not row_sampling(GenerationConfig(do_sample=True), Prompt(0, "a", "x", temperature=0.0)).do_sample
    assert_matches_generate(tiny_model, tokenizer, generate_all(engine_for(tiny_model, tokenizer, PROMPTS, cfg)))


# ---- vLLM's sampling knobs and logprobs (issue 24 items 5 and 2)

import re  # noqa: E402

import pytest  # noqa: E402

from distgen.config import GenerationConfig  # noqa: E402
from tests.helpers import (DEFAULT_BUDGET, PROMPTS, ReplayingCapturer, engine_for, generate_all,  # noqa: E402
                           reads_per_step, reference_generate, run_module)

# The engine paths a step's tokens take: the dynamic cache (row surgery), the slot cache with distgen's CPU kernels
# (synchronous), and rows addressed by slot id (pipelined: step N+1 launched before step N's tokens are read; decode
# steps padded to a bucket, and replayed as "graphs" by a CPU stand-in), chunked prefill among them.
PATHS = {
    "dynamic": (dict(cache="dynamic"), None),
    "slots": (dict(cache="static"), None),
    "pipelined-chunked": (dict(cache="static", scheduler="chunked", prefill_chunk_tokens=24, cpu_kernels="torch"),
                          "varlen_reference"),
    "pipelined-graphs": (dict(cache="static", cpu_kernels="torch"), "graphs"),
}


def path_engine(name, model, tokenizer, records, eos_ids=(), **settings):
    extra, attention = PATHS[name]
    cfg = GenerationConfig(**{**dict(max_new_tokens=DEFAULT_BUDGET, batch_size=3, compile="off"), **extra,
                              **settings}, attention="varlen_reference" if attention else "auto")
    engine = engine_for(model, tokenizer, records, cfg, eos_ids=eos_ids)
    assert engine.pipelined == (attention is not None)
    if attention == "graphs":
        engine.decoder.capture, engine.decoder.capturer = True, ReplayingCapturer()
    return engine


def budget_of(record) -> int:
    return record.get("max_new_tokens", DEFAULT_BUDGET)


@pytest.mark.parametrize("path", PATHS)
def test_greedy_repetition_penalty_equals_hf_generate(path, tiny_model, tokenizer):
    """HF's RepetitionPenaltyLogitsProcessor and vLLM's repetition penalty agree: prompt and completion tokens,
    a positive logit divided, a negative multiplied. fp32, greedy, token for token."""
    records = [dict(r, max_new_tokens=12) for r in PROMPTS]
    got = generate_all(path_engine(path, tiny_model, tokenizer, records, repetition_penalty=1.7))
    changed = 0
    for record in records:
        want = reference_generate(tiny_model, tokenizer, record["prompt"], 12, repetition_penalty=1.7)
        assert got[record["id"]].token_ids == want, record["id"]
        changed += want != reference_generate(tiny_model, tokenizer, record["prompt"], 12)
    assert changed >= 3  # the penalty changes most completions: the test can fail


def knob_records(eos: int, avoid: int) -> list[dict]:
    """One step's rows with different settings each: every knob a record can set (`avoid`: a token the biased
    row's greedy completion starts with)."""
    return [
        {"id": "repetition", "prompt": PROMPTS[1]["prompt"], "repetition_penalty": 1.3},
        {"id": "presence", "prompt": PROMPTS[2]["prompt"], "presence_penalty": 2.0, "max_new_tokens": 16},
        {"id": "frequency", "prompt": PROMPTS[4]["prompt"], "frequency_penalty": 1.2, "presence_penalty": -0.3,
         "max_new_tokens": 16},
        {"id": "bias", "prompt": PROMPTS[6]["prompt"], "logit_bias": {"70": 1.2, str(avoid): -3.0}},
        {"id": "min_tokens", "prompt": PROMPTS[1]["prompt"], "min_tokens": 6},
        {"id": "plain", "prompt": PROMPTS[1]["prompt"]},
        {"id": "everything", "prompt": PROMPTS[3]["prompt"], "repetition_penalty": 0.8, "frequency_penalty": 0.4,
         "logit_bias": {str(eos): -0.5, "80": 0.6}, "min_tokens": 3},
    ]


def hf_settings(record: dict) -> dict:
    """The same knobs as `reference_generate` spells them (HF generate's, and the reference penalties)."""
    settings = {}
    if "repetition_penalty" in record:
        settings["repetition_penalty"] = record["repetition_penalty"]
    if "logit_bias" in record:
        settings["sequence_bias"] = {(int(t),): b for t, b in record["logit_bias"].items()}
    if "min_tokens" in record:
        settings["min_new_tokens"] = record["min_tokens"]
    settings["presence"] = record.get("presence_penalty", 0.0)
    settings["frequency"] = record.get("frequency_penalty", 0.0)
    return settings


@pytest.mark.parametrize("path", PATHS)
def test_rows_with_different_knobs_in_one_step_each_equal_their_reference(path, tiny_model, tokenizer):
    """Per-record knobs, rows with different settings batched in every step: each equals greedy HF generate with
    the same knobs (repetition_penalty, sequence_bias for logit_bias, min_new_tokens for min_tokens, a plain
    reference of OpenAI's presence/frequency penalties)."""
    free = reference_generate(tiny_model, tokenizer, PROMPTS[1]["prompt"], DEFAULT_BUDGET)
    eos = free[2]  # greedy's third token of "france" is its EOS: min_tokens must hold it off
    records = knob_records(eos, reference_generate(tiny_model, tokenizer, PROMPTS[6]["prompt"], 1)[0])
    engine = path_engine(path, tiny_model, tokenizer, records, eos_ids=[eos], batch_size=4)
    got = generate_all(engine)
    for record in records:
        want = reference_generate(tiny_model, tokenizer, record["prompt"], budget_of(record), [eos],
                                  **hf_settings(record))
        assert got[record["id"]].token_ids == want, record["id"]
    assert got["plain"].token_ids == free[:3] and got["plain"].finish_reason == "eos"
    assert eos not in got["min_tokens"].token_ids[:6] and got["min_tokens"].token_ids != free[:3]
    for knob in ("presence", "frequency", "bias"):  # each knob changed its completion: the test can fail
        record = next(r for r in records if r["id"] == knob)
        assert got[knob].token_ids != reference_generate(tiny_model, tokenizer, record["prompt"], budget_of(record),
                                                         [eos]), knob
    if engine.pipelined:
        assert not engine.sampler.history.free or sorted(engine.sampler.history.free) == list(
            range(len(engine.sampler.history.counts)))  # every history row back


@pytest.mark.parametrize("path", ["slots", "pipelined-graphs"])
def test_stop_token_ids_end_with_stop_and_ignore_eos_runs_the_budget(path, tiny_model, tokenizer):
    free = reference_generate(tiny_model, tokenizer, PROMPTS[1]["prompt"], DEFAULT_BUDGET)
    eos = free[2]
    records = [{"id": "stop", "prompt": PROMPTS[1]["prompt"], "stop_token_ids": [free[1], 5]},
               {"id": "ignore", "prompt": PROMPTS[1]["prompt"], "ignore_eos": True},
               {"id": "ignore-but-stop", "prompt": PROMPTS[1]["prompt"], "ignore_eos": True,
                "stop_token_ids": [free[4]]},
               {"id": "eos", "prompt": PROMPTS[1]["prompt"]}]
    got = generate_all(path_engine(path, tiny_model, tokenizer, records, eos_ids=[eos]))
    assert (got["stop"].token_ids, got["stop"].finish_reason) == (free[:2], "stop")  # the stop token is kept
    assert (got["ignore"].token_ids, got["ignore"].finish_reason) == (free, "length")
    assert (got["ignore-but-stop"].token_ids, got["ignore-but-stop"].finish_reason) == (free[:5], "stop")
    assert (got["eos"].token_ids, got["eos"].finish_reason) == (free[:3], "eos")


def test_generation_knobs_apply_to_every_record_and_a_record_replaces_them(tiny_model, tokenizer):
    records = [dict(r, max_new_tokens=10) for r in PROMPTS[:3]] + [
        {"id": "own", "prompt": PROMPTS[4]["prompt"], "max_new_tokens": 10, "repetition_penalty": 1.0,
         "logit_bias": {}}]
    got = generate_all(path_engine("pipelined-chunked", tiny_model, tokenizer, records,
                                   repetition_penalty=1.4, logit_bias={75: 0.8}))
    for record in records[:3]:
        assert got[record["id"]].token_ids == reference_generate(tiny_model, tokenizer, record["prompt"], 10,
                                                                 repetition_penalty=1.4, sequence_bias={(75,): 0.8})
    assert got["own"].token_ids == reference_generate(tiny_model, tokenizer, records[3]["prompt"], 10)


def test_penalties_follow_vllms_formula():
    """One batch of rows, each with its own penalties, against vLLM's formula written out per token."""
    from distgen.engine.logits import PROCESSORS, TokenHistory, choose, plan_rows
    from distgen.engine.request import Request
    from distgen.engine.sampling import GREEDY
    from distgen.inputs.records import Prompt
    vocab, generator = 12, torch.Generator().manual_seed(0)
    logits = torch.randn((3, vocab), generator=generator) * 3
    settings = [dataclasses.replace(GREEDY, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
                dataclasses.replace(GREEDY, repetition_penalty=0.5),
                dataclasses.replace(GREEDY, frequency_penalty=-1.0, logit_bias=((3, 2.5), (7, -1.0)))]
    prompts, outputs = [[1, 2, 2], [4], [5, 6]], [[2, 3, 3, 9], [4, 4, 0], [6, 6, 6]]
    requests = [Request(Prompt(k, k, ""), prompts[k], 16, None, settings[k]) for k in range(3)]
    history = TokenHistory(torch.device("cpu"))
    # the completions so far, recorded as the engine records them: one token per row per step
    for step in range(4):
        rows = [k for k in range(3) if step < len(outputs[k])]
        batch = plan_rows([settings[k] for k in rows], [requests[k] for k in rows], [], vocab, history,
                          torch.device("cpu"))
        history.record(batch.penalties.rows, torch.tensor([outputs[k][step] for k in rows]))
    batch = plan_rows(settings, requests, [], vocab, history, torch.device("cpu"))
    want = logits.clone()
    for k, s in enumerate(settings):
        for token, bias in s.logit_bias:
            want[k, token] += bias
        for token in range(vocab):
            count = outputs[k].count(token)
            if token in prompts[k] or count:
                value = want[k, token]
                want[k, token] = value / s.repetition_penalty if value > 0 else value * s.repetition_penalty
            want[k, token] -= s.frequency_penalty * count + s.presence_penalty * (count > 0)
    got = logits.clone()
    for processor in PROCESSORS:
        got = processor(got, batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    tokens, _ = choose(logits.clone(), batch)  # chooses the argmax, and records it in the history
    assert torch.equal(tokens, want.argmax(-1))
    counts = history.counts[batch.penalties.rows]
    assert [counts[k, tokens[k]].item() for k in range(3)] == [outputs[k].count(tokens[k].item()) + 1 for k in range(3)]


def draw_rows(logits, settings, seeds, steps, vocab):
    from distgen.engine.logits import TokenHistory, choose, plan_rows
    from distgen.engine.request import Request
    from distgen.inputs.records import Prompt
    requests = [Request(Prompt(k, k, ""), [1], 1 << 20, seed, s) for k, (seed, s) in enumerate(zip(seeds, settings))]
    for request, step in zip(requests, steps):
        request.generated = [0] * step
    batch = plan_rows(settings, requests, [], vocab, TokenHistory(torch.device("cpu")), torch.device("cpu"))
    return choose(logits.clone(), batch)[0].tolist()


def test_rows_with_different_settings_draw_what_each_would_alone():
    """The logits path batches rows whose temperature, top_k and top_p differ (per-row tensors): each row draws
    exactly what it draws alone from the same seed at the same position (the draw depends on nothing else in its
    batch), with or without a top_k in every row (the candidates path), at every position."""
    from distgen.engine.sampling import RowSampling
    vocab = 50
    logits = torch.randn((5, vocab), generator=torch.Generator().manual_seed(1)) * 2
    mixed = [RowSampling(True, 0.7, 5, 1.0), RowSampling(True, 1.3, 0, 0.8), RowSampling(True, 1.0, 0, 1.0),
             RowSampling(True, 0.5, 60, 0.5), RowSampling(True, 2.0, 10, 0.9)]
    every_top_k = [RowSampling(True, 0.7, 5, 1.0), RowSampling(True, 1.3, 3, 0.8), RowSampling(True, 1.0, 12, 1.0),
                   RowSampling(True, 0.5, 2, 0.5, min_p=0.2), RowSampling(True, 2.0, 10, 0.9)]
    for settings in (mixed, every_top_k):
        for draw in range(3):
            seeds, steps = [2**64 - 1 - 10 * draw - k for k in range(5)], [draw * 7 + k for k in range(5)]
            alone = [draw_rows(logits[k:k + 1], settings[k:k + 1], seeds[k:k + 1], steps[k:k + 1], vocab)[0]
                     for k in range(5)]
            assert draw_rows(logits, settings, seeds, steps, vocab) == alone


def test_a_rows_settings_stay_values_once_read_every_step():
    """`processed` and `chooses` are read per row every step, so each settings object works them out once (kept in
    its __dict__): the settings stay equal, hashable and picklable as before, and `chooses` says whether a row
    needs more than the step's argmax (it samples, or takes the logits path)."""
    import pickle
    from distgen.engine.sampling import GREEDY, RowSampling
    plain = RowSampling(False, 1.0, 0, 1.0)
    cases = [(plain, False), (GREEDY, False), (RowSampling(True, 0.7, 5, 1.0), True),
             (RowSampling(False, 1.0, 0, 1.0, logprobs=2), True),
             (RowSampling(False, 1.0, 0, 1.0, repetition_penalty=1.2), True),
             (RowSampling(False, 1.0, 0, 1.0, min_p=0.5), False),  # min_p acts on draws only
             (RowSampling(True, 1.0, 0, 1.0, min_p=0.5), True),
             (RowSampling(False, 1.0, 0, 1.0, stop_token_ids=(5,), ignore_eos=True), False)]  # read on the host
    for settings, chooses in cases:
        fresh = dataclasses.replace(settings)
        assert (settings.chooses, settings.chooses) == (chooses, chooses)
        assert settings.processed is (chooses if not settings.do_sample else settings.min_p > 0)
        assert settings == fresh and hash(settings) == hash(fresh)
        assert dataclasses.astuple(settings) == dataclasses.astuple(fresh)
        assert pickle.loads(pickle.dumps(settings)) == settings
    assert plain == GREEDY and {plain: 1}[GREEDY] == 1


def test_the_top_k_candidates_draw_what_the_whole_vocabulary_draws():
    """With a top_k in every row the draw looks at the best max(top_k) + TIE_SLACK tokens only; a row whose top_k
    is off (0) in the same batch sends every row through the whole vocabulary: each row's token is the same."""
    from distgen.engine.sampling import RowSampling
    vocab = 200
    logits = torch.randn((6, vocab), generator=torch.Generator().manual_seed(3)) * 3
    settings = [RowSampling(True, 0.8, 50, 0.95), RowSampling(True, 1.0, 5, 1.0), RowSampling(True, 1.5, 20, 0.7),
                RowSampling(True, 0.6, 1, 1.0), RowSampling(True, 1.0, 40, 0.9, min_p=0.05),
                RowSampling(True, 1.2, 8, 0.99)]
    off = RowSampling(True, 1.0, 0, 1.0)
    for draw in range(20):
        seeds, steps = [1000 * draw + k for k in range(6)], [draw] * 6
        restricted = draw_rows(logits, settings, seeds, steps, vocab)
        whole = draw_rows(torch.cat([logits, logits[:1]]), [*settings, off], [*seeds, 7], [*steps, 0], vocab)[:6]
        assert restricted == whole
        assert restricted[3] == logits[3].argmax().item()  # top_k=1 is the argmax


def test_the_draw_follows_the_softmax():
    """Over many seeds one row's tokens are distributed as softmax(logits / temperature) (within 5 standard
    errors per token), after top_k (tokens past the k best never drawn), and each position draws afresh."""
    from distgen.engine.sampling import RowSampling
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    draws = 4000
    for setting, allowed in ((RowSampling(True, 0.9, 0, 1.0), 6), (RowSampling(True, 0.9, 3, 1.0), 3)):
        rows = logits.expand(draws, -1)
        tokens = draw_rows(rows, [setting] * draws, list(range(draws)), [5] * draws, 6)
        counts = torch.bincount(torch.tensor(tokens), minlength=6).double()
        want = torch.softmax(logits[0, :allowed] / 0.9, -1).double()
        want = torch.cat([want, torch.zeros(6 - allowed, dtype=torch.double)])
        tolerance = 5 * (want * (1 - want) / draws).sqrt() + 1e-9
        assert ((counts / draws - want).abs() <= tolerance).all(), (counts / draws, want)
        later = draw_rows(rows[:200], [setting] * 200, list(range(200)), [6] * 200, 6)
        assert later != tokens[:200]


def test_gumbel_noise_is_splitmix64_of_seed_position_and_token():
    """The noise's bits are splitmix64's, computed on int64 tensors (wrapping multiplication, logical shifts),
    for seeds across the whole 64-bit range."""
    import math
    from distgen.engine.sampling import GOLDEN, MIX1, MIX2, as_int64, gumbel_noise
    mask = 2**64 - 1

    def reference(seed: int, step: int, token: int) -> float:
        z = (seed + ((step << 32) + token + 1) * GOLDEN) & mask
        z = ((z ^ (z >> 30)) * MIX1) & mask
        z = ((z ^ (z >> 27)) * MIX2) & mask
        z ^= z >> 31
        u = ((z >> 40) + 0.5) / (1 << 24)
        return -math.log(-math.log(u))
    seeds, steps = [0, 1, 2**63 - 1, 2**63, 2**64 - 1], [0, 3, 1 << 20, 7, 123456]
    ids = torch.tensor([0, 1, 17, 151935])
    got = gumbel_noise(torch.tensor([[as_int64(s)] for s in seeds]), torch.tensor([[s] for s in steps]), ids)
    want = torch.tensor([[reference(seed, step, t) for t in ids.tolist()] for seed, step in zip(seeds, steps)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_min_p_keeps_tokens_near_the_best():
    from distgen.engine.logits import Draws, apply_min_p
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    none = torch.zeros(2, 1, dtype=torch.long)
    draws = Draws(torch.arange(2), none, none, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long),
                  torch.ones(2, 1), torch.tensor([[0.5], [0.9]]), 0, False, True)
    kept = apply_min_p(probs.log(), draws).isfinite()
    assert kept.tolist() == [[True, True, False, False], [True, True, True, True]]


def test_min_p_of_one_is_greedy_and_logprobs_leave_draws_unchanged(tiny_model, tokenizer):
    """min_p=1 keeps only the best token; asking for logprobs routes a sampled row through the logits path, whose
    draws are the plain path's, token for token."""
    sample = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.5, seed=3, batch_size=3, compile="off")
    records = [dict(r, max_new_tokens=6, min_p=1.0) for r in PROMPTS[:3]]
    got = generate_all(engine_for(tiny_model, tokenizer, records, sample))
    for record in records:
        assert got[record["id"]].token_ids == reference_generate(tiny_model, tokenizer, record["prompt"], 6)
    records = [dict(r, max_new_tokens=6) for r in PROMPTS]
    plain = generate_all(engine_for(tiny_model, tokenizer, records, sample))
    asking = generate_all(engine_for(tiny_model, tokenizer, [dict(r, logprobs=2) for r in records], sample))
    assert {k: c.token_ids for k, c in asking.items()} == {k: c.token_ids for k, c in plain.items()}
    assert all(len(c.logprobs) == len(c.token_ids) for c in asking.values())


def forward_logprobs(model, tokenizer, prompt: str, generated: list[int]) -> torch.Tensor:
    """log_softmax of HF's forward logits at each generated token's position: (len(generated), vocab)."""
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids + generated])).logits[0].float()
    return logits[len(ids) - 1:len(ids) - 1 + len(generated)].log_softmax(-1)


@pytest.mark.parametrize("path", PATHS)
def test_logprobs_are_the_raw_model_logprobs_of_the_chosen_token(path, tiny_model, tokenizer):
    """Greedy rows: each token's logprob is log_softmax of HF's forward logits at its position (1e-4, fp32), its
    top-K sorted best first with the chosen token at the top; K capped at the vocabulary; a penalized row reports
    the raw logprobs (before the penalty), as vLLM does; rows that do not ask carry none."""
    vocab = tiny_model.config.vocab_size
    records = [dict(PROMPTS[1], logprobs=3), dict(PROMPTS[2], logprobs=0), dict(PROMPTS[4], logprobs=10 ** 6),
               dict(PROMPTS[6], logprobs=2, repetition_penalty=1.8), dict(PROMPTS[3])]
    got = generate_all(path_engine(path, tiny_model, tokenizer, records, max_logprobs=-1))
    assert got[PROMPTS[3]["id"]].logprobs is None
    for record, k in zip(records[:4], (3, 0, vocab, 2)):
        completion = got[record["id"]]
        assert len(completion.logprobs) == len(completion.token_ids) == budget_of(record)
        reference = forward_logprobs(tiny_model, tokenizer, record["prompt"], completion.token_ids)
        for at, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            assert entry["token_id"] == token and len(entry["top"]) == k
            assert abs(entry["logprob"] - reference[at, token].item()) < 1e-4, (record["id"], at)
            values = [alt["logprob"] for alt in entry["top"]]
            assert values == sorted(values, reverse=True)
            best = torch.topk(reference[at], k)
            assert [alt["token_id"] for alt in entry["top"]] == best.indices.tolist() or k == vocab
            torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), best.values.double(), atol=1e-4,
                                       rtol=0)
            if k and "repetition_penalty" not in record:
                assert entry["top"][0]["token_id"] == token  # greedy: the chosen token is the best
    penalized = got[PROMPTS[6]["id"]]
    assert penalized.token_ids == reference_generate(tiny_model, tokenizer, PROMPTS[6]["prompt"],
                                                     budget_of(PROMPTS[6]), repetition_penalty=1.8)


def test_one_host_read_per_step_with_logprobs_and_penalties(tiny_model, tokenizer):
    records = [dict(r, logprobs=2, frequency_penalty=0.5) if i % 2 else r for i, r in enumerate(PROMPTS)]
    engine = path_engine("pipelined-chunked", tiny_model, tokenizer, records)
    counts = reads_per_step(engine)
    got = generate_all(engine)
    assert max(counts) == 1 and engine.host_reads == sum(counts)
    assert all((c.logprobs is not None) == (i % 2 == 1) for i, c in enumerate(got[r["id"]] for r in PROMPTS))


# ---- the knobs as records and config keys, through a real job

KNOB_RECORDS = [
    {"id": "rep", "prompt": "The capital of France is", "repetition_penalty": 1.3, "logprobs": 2},
    {"id": "bias", "prompt": "Hello there", "logit_bias": {"70": 2.0, "71": -1.5}, "min_tokens": 3},
    {"id": "freq", "prompt": "x y z", "frequency_penalty": 0.5, "presence_penalty": -0.25, "min_p": 0.1,
     "temperature": 0.8, "seed": 4},
    {"id": 7, "prompt": "plain"},
    {"id": "stops", "prompt": "stop here", "stop_token_ids": [70, 71], "ignore_eos": True, "logprobs": 0},
]


@pytest.mark.parametrize("record, message", [
    ({"repetition_penalty": 0}, "repetition_penalty=0 is not allowed: must be a finite number >= "),
    ({"presence_penalty": 2.5}, "presence_penalty=2.5 is not allowed: must be a number in [-2, 2]"),
    ({"frequency_penalty": "1"}, "frequency_penalty='1' is not allowed"),
    ({"min_p": -0.1}, "min_p=-0.1 is not allowed: must be a number in [0, 1]"),
    ({"min_tokens": 1.5}, "min_tokens=1.5 is not allowed: must be an integer >= 0"),
    ({"stop_token_ids": 5}, "stop_token_ids=5 is not allowed: must be a list of token ids >= 0"),
    ({"stop_token_ids": [1, -1]}, "stop_token_ids=[1, -1] is not allowed"),
    ({"logit_bias": {"x": 1}}, "logit_bias={'x': 1} is not allowed: must be an object {token_id: bias}"),
    ({"logit_bias": {"5": 101}}, "logit_bias={'5': 101} is not allowed"),
    ({"logit_bias": [5, 1]}, "logit_bias=[5, 1] is not allowed"),
    ({"ignore_eos": "yes"}, "ignore_eos='yes' is not allowed: must be true or false"),
    ({"logprobs": -1}, "logprobs=-1 is not allowed: must be an integer >= 0"),
    ({"logprobs": True}, "logprobs=True is not allowed"),
], ids=lambda value: str(value)[:30])
def test_a_bad_knob_makes_an_error_record_naming_it(record, message):
    from distgen.inputs.records import RecordFields, record_to_prompt
    prompt = record_to_prompt({"id": "r", "prompt": "p", **record}, 0, "f:1", RecordFields())
    assert prompt.error.startswith(message), prompt.error


def test_knob_fields_convert_and_key_the_record():
    from distgen.inputs.keys import record_key
    from distgen.inputs.records import RecordFields, record_to_prompt
    fields = RecordFields()
    record = {"prompt": "p", "logit_bias": {"9": 1, "3": -2.5, "4": None}, "stop_token_ids": [5, 5.0, 2],
              "min_tokens": 2.0, "ignore_eos": False}
    prompt = record_to_prompt(record, 0, "f:1", fields)
    assert prompt.error is None
    assert (prompt.logit_bias, prompt.stop_token_ids, prompt.min_tokens, prompt.ignore_eos) == (
        ((3, -2.5), (9, 1.0)), (5, 2), 2, False)
    plain = record_to_prompt({"prompt": "p"}, 0, "f:1", fields)
    keys = {record_key(plain)}
    for knob, value in [("repetition_penalty", 1.1), ("presence_penalty", 0.1), ("frequency_penalty", 0.1),
                        ("min_p", 0.1), ("min_tokens", 1), ("stop_token_ids", [1]), ("logit_bias", {"1": 1}),
                        ("ignore_eos", True), ("logprobs", 1)]:
        keys.add(record_key(record_to_prompt({"prompt": "p", knob: value}, 0, "f:1", fields)))
    assert len(keys) == 10  # each knob changes the record's resume key


def test_knob_fields_survive_every_table_form(tmp_path):
    """Arrow's JSON reader (a logit_bias column becomes a struct holding every record's keys; a column whose types
    clash, JSON values) and the normalized table of a folder of mixed formats (logit_bias kept as JSON text) give
    the prompts the records give."""
    from distgen.config import DatasetConfig
    from distgen.inputs.records import RecordFields, record_to_prompt
    from distgen.inputs.source import open_prompts
    from tests.helpers import write_prompts
    records = KNOB_RECORDS + [{"id": "clash", "prompt": "q", "stop_token_ids": "3", "logit_bias": "x"}]
    want = [record_to_prompt(r, i, "x", RecordFields()) for i, r in enumerate(records)]
    assert want[-1].error.startswith("stop_token_ids='3' is not allowed")
    folder = tmp_path / "folder"
    folder.mkdir()
    write_prompts(folder / "a.jsonl", records)
    (folder / "b.csv").write_text("id,prompt\nlast,z\n")
    for name, path in [("arrow", write_prompts(tmp_path / "knobs.jsonl", records)), ("normalized", folder)]:
        source = open_prompts(DatasetConfig(path=str(path)), str(tmp_path / f"cache-{name}"))
        assert (source.fields.error is not None) == (name == "normalized")
        # Columns (output.columns) are the table's, tested in test_formats; the settings are what this is about.
        got = [dataclasses.replace(p, columns={}) for p in source.prompts(range(len(source)))]
        assert got[:len(want) - 1] == want[:-1], name
        assert got[len(records) - 1].error.startswith("stop_token_ids="), name


def test_a_job_with_per_record_knobs_and_logprobs(tiny_model_dir, tmp_path):
    """A real run (distgen.run.main) with per-record knobs: every id exactly once, a bad knob an error record
    naming it, logprobs only where asked, and a record without knobs byte-identical to a job without any."""
    import json
    from distgen.run import main as run_in_process
    from tests.helpers import read_outputs, write_prompts
    records = KNOB_RECORDS + [{"id": "bad", "prompt": "q", "min_p": 2}, {"id": "too-few", "prompt": "q",
                                                                         "max_new_tokens": 2, "min_tokens": 3}]
    dataset = write_prompts(tmp_path / "knobs.jsonl", records)
    args = [f"model={tiny_model_dir}", f"dataset={dataset}", "generation.max_new_tokens=6", "generation.batch_size=3"]
    assert run_in_process([*args, f"output.dir={tmp_path / 'knobs'}"]) == 0
    out = read_outputs(tmp_path / "knobs")
    assert [r["id"] for r in out] == [r["id"] for r in records]
    by_id = {r["id"]: r for r in out}
    bad = by_id["bad"]["error"]  # min_p=2 or 2.0, as Arrow read the column
    assert bad.startswith("min_p=2") and "is not allowed: must be a number in [0, 1]" in bad
    assert by_id["too-few"]["error"] == "min_tokens=3 is not allowed: must be at most its max_new_tokens=2"
    assert [len(e["top"]) for e in by_id["rep"]["logprobs"]] == [2] * by_id["rep"]["completion_tokens"]
    assert [e["top"] for e in by_id["stops"]["logprobs"]] == [[]] * by_id["stops"]["completion_tokens"]
    assert [r["id"] for r in out if "logprobs" in r] == ["rep", "stops"]
    # parquet shards (a column per key of every record: the first record has no logprobs, error records the
    # only `error`) merge into the same records (ids as text: a parquet column holds one type)
    records = [{"id": "first", "prompt": "q", "max_new_tokens": 2}, *records]
    assert run_in_process([*args, f"dataset={write_prompts(tmp_path / 'first.jsonl', records)}", "output.format=parquet",
                           f"output.dir={tmp_path / 'parquet'}"]) == 0
    assert read_outputs(tmp_path / "parquet")[1:] == [dict(r, index=r["index"] + 1, id=str(r["id"])) for r in out]
    plain = write_prompts(tmp_path / "plain.jsonl", [KNOB_RECORDS[3]])
    assert run_in_process([*args, f"dataset={plain}", f"output.dir={tmp_path / 'plain'}"]) == 0
    line = (tmp_path / "plain" / "outputs.jsonl").read_text().splitlines()[0]
    # the knobs job's table gives record 7 a null for every column another record has (docs/inputs.md)
    alone = {k: v for k, v in by_id[7].items() if v is not None or k in json.loads(line)}
    assert json.dumps({**alone, "index": 0}, ensure_ascii=False) == line

    # generation.* knobs for every record, a mapping given whole on the command line
    assert run_in_process([f"model={tiny_model_dir}", f"dataset={plain}", "generation.max_new_tokens=6",
                           "generation.logit_bias={70:100}", "generation.logprobs=1",
                           f"output.dir={tmp_path / 'config'}"]) == 0
    [record] = read_outputs(tmp_path / "config")
    assert record["completion_token_ids"] == [70] * 6 and len(record["logprobs"]) == 6


def test_knobs_are_config_keys_checked_before_anything_runs(tmp_path):
    from distgen.catalog.load import load_config
    from distgen.common.errors import ConfigError
    cfg = load_config(["model=tiny", "dataset=demo", "generation.logit_bias={4:1.5,9:-2}", "generation.min_p=0.05",
                       "generation.stop_token_ids=[3]", "generation.logprobs=5", "generation.ignore_eos=true"])
    assert (cfg.generation.logit_bias, cfg.generation.stop_token_ids, cfg.generation.logprobs) == (
        {4: 1.5, 9: -2.0}, [3], 5)
    for override, message in [("generation.logit_bias={4:200}", "generation.logit_bias={4: 200.0} is not allowed"),
                              ("generation.min_tokens=40", "generation.min_tokens=40 is not allowed: must be an "
                                                           "integer in [0, generation.max_new_tokens=32]"),
                              ("generation.frequency_penalty=-3", "generation.frequency_penalty=-3.0 is not allowed"),
                              ("generation.repetition_penalty=0", "generation.repetition_penalty=0.0 is not allowed")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(["model=tiny", "dataset=demo", override])
    # a job file's mapping, then the command line's: the last one given replaces it whole
    job = tmp_path / "job.yaml"
    job.write_text("generation:\n  logit_bias: {4: 1.5, 9: -2}\n  stop_token_ids: [3]\n")
    assert load_config(["model=tiny", "dataset=demo"], job_file=job).generation.logit_bias == {4: 1.5, 9: -2.0}
    assert load_config(["model=tiny", "dataset=demo", "generation.logit_bias={5:1}"],
                       job_file=job).generation.logit_bias == {5: 1.0}
    with pytest.raises(ConfigError, match=re.escape("generation.repetition_penalty=1.2 is not allowed: "
                                                    "model.assistant=prompt_lookup verifies drafts")):
        load_config(["model=tiny", "dataset=demo", "generation.repetition_penalty=1.2",
                     "model.assistant=prompt_lookup"])


def test_a_job_logit_bias_past_the_vocabulary_is_refused_before_anything_runs(tmp_path):
    """The model's vocabulary is known from its config: a job's logit_bias on a token past it is one config error
    (rc 2) before output.dir exists, not an error record per record."""
    out = tmp_path / "out"
    result = run_module("distgen.launch", ["model=tiny", "dataset=demo", f"output.dir={out}", "launcher=none",
                                           "generation.logit_bias={999999:5}"])
    assert result.returncode == 2, result.stderr
    assert "vocabulary size 259 (not 999999)" in result.stderr and not out.exists()


def test_repetition_penalty_is_hfs_bit_for_bit():
    """logits.repetition_penalty (no select by sign) against HF's RepetitionPenaltyLogitsProcessor: every row its
    own penalty, above and below 1, on logits holding -inf, zeros, tiny and huge values."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    from distgen.engine.logits import repetition_penalty
    generator = torch.Generator().manual_seed(0)
    penalties = [0.3, 0.5, 0.9, 1.0, 1.3, 2.0, 7.5]
    logits = torch.randn((len(penalties), 500), generator=generator) * 10
    logits[0, :5], logits[1, :5], logits[2, :3], logits[3, :3], logits[4, :3] = float("-inf"), 0.0, 1e-30, -1e-30, 3e38
    ids = torch.randint(0, 500, (len(penalties), 60), generator=generator)
    want = torch.cat([RepetitionPenaltyLogitsProcessor(p)(ids[k:k + 1], logits[k:k + 1].clone())
                      for k, p in enumerate(penalties)])
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, True)
    factor = torch.tensor(penalties)[:, None]
    got = repetition_penalty(logits, torch.where(seen, factor, 1.0), torch.where(factor < 1, -1.0, 1.0))
    assert torch.equal(got, want)
    assert torch.equal(repetition_penalty(logits[3:], torch.where(seen[3:], factor[3:], 1.0), None), want[3:])


def test_an_assisted_engine_refuses_a_records_logits_knobs_alone(tiny_model, tokenizer):
    """Drafts are verified against plain logits: a record with a logits knob gets an error record; the others run,
    a record's stop_token_ids and ignore_eos (read on the host) included."""
    from distgen.engine.assist import AssistantSpec
    free = reference_generate(tiny_model, tokenizer, PROMPTS[1]["prompt"], DEFAULT_BUDGET)
    records = [dict(PROMPTS[1], id="penalized", repetition_penalty=1.3), dict(PROMPTS[1], id="logprobs", logprobs=1),
               dict(PROMPTS[1], id="stops", stop_token_ids=[free[1]]), dict(PROMPTS[1], id="plain")]
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=2, compile="off", cache="static")
    got = generate_all(engine_for(tiny_model, tokenizer, records, cfg, assistant=AssistantSpec("prompt_lookup")))
    for name in ("penalized", "logprobs"):
        assert got[name].finish_reason == "error" and "not allowed with model.assistant" in got[name].error
    assert (got["stops"].token_ids, got["stops"].finish_reason) == (free[:2], "stop")
    assert got["plain"].token_ids == free


def test_logprobs_follow_a_completion_cut_at_a_stop_string(tokenizer):
    from distgen.engine.request import Completion
    from distgen.engine.stops import StopStrings
    from distgen.inputs.records import Prompt
    from distgen.outputs.records import output_record
    ids = tokenizer("abcXYZdef")["input_ids"]
    entries = [{"token_id": t, "logprob": -1.0, "top": []} for t in ids]
    prompt = Prompt(0, "r", "p", stop=("XY",), logprobs=0)
    record = output_record(Completion(prompt, 1, ids, "stop", logprobs=entries), StopStrings(tokenizer).cut)
    assert record["completion"] == "abc" and record["logprobs"] == entries[:len(record["completion_token_ids"])]
    plain = output_record(Completion(Prompt(0, "r", "p"), 1, ids, "length"), StopStrings(tokenizer).cut)
    assert "logprobs" not in plain and list(plain) == ["index", "id", "sample_index", "prompt", "completion",
                                                      "prompt_tokens", "completion_tokens", "finish_reason",
                                                      "completion_token_ids"]


def test_the_job_fingerprint_covers_every_knob():
    from distgen.config import ModelConfig, RunConfig
    from distgen.outputs.resume import job_settings, settings_changes
    tiny = ModelConfig(source="tiny")
    base = job_settings(RunConfig(model=tiny))
    for knob, value in [("repetition_penalty", 1.1), ("presence_penalty", 0.1), ("frequency_penalty", 0.1),
                        ("min_p", 0.1), ("min_tokens", 1), ("stop_token_ids", [1]), ("logit_bias", {1: 1.0}),
                        ("ignore_eos", True), ("logprobs", 1)]:
        changed = job_settings(RunConfig(model=tiny, generation=GenerationConfig(**{knob: value})))
        assert [line.split(":")[0] for line in settings_changes(base, changed)] in (
            [f"generation.{knob}"], [f"generation.{knob}.1"]), knob
