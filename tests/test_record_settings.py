"""Per-record sampling settings and stop strings, decoded in one process."""
import dataclasses
import re

import pytest
import torch

from distgen.common.errors import ConfigError
from distgen.config import GenerationConfig
from distgen.engine import build_engine
from distgen.engine.request import Completion
from distgen.outputs.records import output_record
from distgen.parallel.feed import tokenize_checked
from distgen.parallel.loop import run_loop
from distgen.inputs.records import Prompt
from distgen.engine.stops import StopStrings
from tests.helpers import DEFAULT_BUDGET, PROMPTS, reference_greedy

CPU = torch.device("cpu")


def decode(model, tokenizer, prompts, cfg, batch_size=3, scheduler="continuous", stops=None):
    stops = stops or StopStrings(tokenizer)
    queue = [(p, tokenizer(p.text)["input_ids"]) for p in prompts]
    cfg = dataclasses.replace(cfg, batch_size=batch_size, scheduler=scheduler)
    engine = build_engine(model, queue, cfg, tokenizer.pad_token_id, [], CPU, stop_check=stops.hit)
    done = []
    with torch.no_grad():
        run_loop(engine, lockstep=False, idle_step=lambda: None, device=CPU, on_finished=done.extend)
    return {c.prompt.index: c for c in done}, stops


def test_stop_cut_drops_the_stop_string_and_its_tokens(tokenizer):
    ids = tokenizer("abcXYZdefXY")["input_ids"]
    text, kept = StopStrings(tokenizer).cut(Prompt(0, "0", "", stop=("XY", "de")), ids)
    assert (text, kept) == ("abc", ids[:3])


@pytest.mark.parametrize("min_tokens, text", [(None, "abc"), (3, "abc"), (4, "abc"), (5, "abcXYZdef"), (11, "abcXYZdefXY")])
def test_a_stop_string_counts_where_it_ends_past_the_first_min_tokens(min_tokens, text, tokenizer):
    """As vLLM's detokenizer (vllm-project/vllm#22014): with min_tokens a stop string ending within the first
    min_tokens tokens' text does not end the completion (one ending past it, straddling or not, does)."""
    ids = tokenizer("abcXYZdefXY")["input_ids"]  # a token per character
    prompt = Prompt(0, "0", "", stop=("XY",), min_tokens=min_tokens)
    stops = StopStrings(tokenizer)
    assert stops.cut(prompt, ids) == (text, ids[:len(text)])
    first_hit = next((k for k in range(1, len(ids) + 1) if stops.hit(prompt, ids[:k])), None)
    assert first_hit == (None if text == "abcXYZdefXY" else len(text) + 2)  # the token completing "XY"
    # generation.min_tokens holds for records without their own
    assert StopStrings(tokenizer, ("XY",), 5).cut(Prompt(0, "0", ""), ids) == ("abcXYZdef", ids[:9])


def test_min_tokens_holds_stop_strings_back_in_the_engine(tiny_model, tokenizer):
    """A stop string taken from the first tokens of each greedy completion: with min_tokens=4 the completion goes
    on to the string's first appearance ending past those tokens' text (or to its budget)."""
    budget = 12
    for i, p in enumerate(PROMPTS[:4]):
        greedy = reference_greedy(tiny_model, tokenizer, p["prompt"], budget, [])
        text = tokenizer.decode(greedy, skip_special_tokens=True)
        stop = text[1]
        prompts = [Prompt(0, "a", p["prompt"], max_new_tokens=budget, stop=(stop,), min_tokens=4),
                   Prompt(1, "b", p["prompt"], max_new_tokens=budget, stop=(stop,))]
        done, cutter = decode(tiny_model, tokenizer, prompts, GenerationConfig(max_new_tokens=budget))
        held = len(tokenizer.decode(greedy[:4], skip_special_tokens=True))
        at = text.find(stop, held - len(stop) + 1)
        kept_text, kept_ids = cutter.cut(done[0].prompt, done[0].token_ids)
        assert kept_text == (text if at < 0 else text[:at]), p["id"]
        assert done[0].finish_reason == ("length" if at < 0 else "stop") and kept_ids == greedy[:len(kept_ids)]
        assert cutter.cut(done[1].prompt, done[1].token_ids)[0] == text[:text.find(stop)]  # without: the first


def test_stop_strings_end_completions_where_they_first_appear(tiny_model, tokenizer):
    greedy = {i: reference_greedy(tiny_model, tokenizer, p["prompt"], DEFAULT_BUDGET, [])
              for i, p in enumerate(PROMPTS)}
    texts = {i: tokenizer.decode(ids, skip_special_tokens=True) for i, ids in greedy.items()}
    # A stop string taken from the middle of each greedy completion, and one that never appears.
    stops = {i: (text[3:5], "\x00never\x00") for i, text in texts.items()}
    prompts = [Prompt(i, p["id"], p["prompt"], stop=stops[i]) for i, p in enumerate(PROMPTS)]
    done, cutter = decode(tiny_model, tokenizer, prompts, GenerationConfig(max_new_tokens=DEFAULT_BUDGET))
    for i, text in texts.items():
        completion = done[i]
        assert completion.finish_reason == "stop", PROMPTS[i]["id"]
        kept_text, kept_ids = cutter.cut(completion.prompt, completion.token_ids)
        assert kept_text == text[:text.find(stops[i][0])] and stops[i][0] not in kept_text
        assert kept_ids == greedy[i][:len(kept_ids)]
        # Generation stopped at the token that completed the stop string, not later.
        assert stops[i][0] in tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert stops[i][0] not in tokenizer.decode(completion.token_ids[:-1], skip_special_tokens=True)


def test_generation_stop_ends_records_without_their_own(tiny_model, tokenizer):
    """generation.stop applies to every record without a `stop` of its own; a record's own replaces it."""
    greedy = {i: reference_greedy(tiny_model, tokenizer, p["prompt"], DEFAULT_BUDGET, []) for i, p in
              enumerate(PROMPTS[:3])}
    texts = {i: tokenizer.decode(ids, skip_special_tokens=True) for i, ids in greedy.items()}
    job_stop, own_stop = texts[0][4:6], texts[1][2:4]
    prompts = [Prompt(0, "a", PROMPTS[0]["prompt"]), Prompt(1, "b", PROMPTS[1]["prompt"], stop=(own_stop,))]
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, stop=[job_stop])
    done, cutter = decode(tiny_model, tokenizer, prompts, cfg, stops=StopStrings(tokenizer, cfg.stop))
    assert done[0].finish_reason == "stop" and cutter.cut(done[0].prompt, done[0].token_ids)[0] == \
        texts[0][:texts[0].find(job_stop)]
    assert cutter.cut(done[1].prompt, done[1].token_ids)[0] == texts[1][:texts[1].find(own_stop)]
    with pytest.raises(ConfigError, match=re.escape("generation.stop=[''] is not allowed: must be a list of "
                                                    "non-empty strings")):
        GenerationConfig(stop=[""]).check()


@pytest.mark.parametrize("settings", [{"temperature": 0.0}, {"top_k": 1, "temperature": 5.0},
                                      {"top_p": 1e-6}], ids=["temperature-0", "top-k-1", "tiny-top-p"])
def test_per_record_settings_that_leave_one_choice_are_greedy(settings, tiny_model, tokenizer):
    sample = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    prompts = [Prompt(i, p["id"], p["prompt"], 6, **settings) for i, p in enumerate(PROMPTS[:4])]
    prompts.append(Prompt(4, "free", PROMPTS[4]["prompt"], 6))  # samples with generation.* in the same batch
    done, _ = decode(tiny_model, tokenizer, prompts, sample)
    for prompt in prompts[:4]:
        assert done[prompt.index].token_ids == reference_greedy(tiny_model, tokenizer, prompt.text, 6, [])
    assert done[4].token_ids != reference_greedy(tiny_model, tokenizer, prompts[4].text, 6, [])


def test_record_seed_and_temperature_are_honoured(tiny_model, tokenizer):
    text = PROMPTS[1]["prompt"]
    prompts = [Prompt(0, "a", text, 8, temperature=1.0, seed=5), Prompt(1, "b", text, 8, temperature=1.0, seed=5),
               Prompt(2, "c", text, 8, temperature=1.0, seed=6), Prompt(3, "d", text, 8)]
    done, _ = decode(tiny_model, tokenizer, prompts, GenerationConfig(max_new_tokens=8), batch_size=2)
    assert done[0].token_ids == done[1].token_ids, "the same seed samples the same tokens at any index"
    assert done[2].token_ids != done[0].token_ids
    # Under the greedy default, a record's temperature > 0 samples it; the record without one is greedy.
    assert done[0].token_ids != reference_greedy(tiny_model, tokenizer, text, 8, [])
    assert done[3].token_ids == reference_greedy(tiny_model, tokenizer, text, 8, [])


@pytest.mark.parametrize("scheduler", ["static", "continuous", "chunked"])
def test_a_request_that_cannot_be_made_fails_alone(scheduler, tiny_model, tokenizer):
    """Screening keeps such records out of a job; built directly, they reach the engine and fail there alone."""
    prompts = [Prompt(i, p["id"], p["prompt"], 4) for i, p in enumerate(PROMPTS[:5])]
    prompts[1] = dataclasses.replace(prompts[1], temperature=1.0, seed=2**70)  # torch cannot seed with it
    prompts[2] = dataclasses.replace(prompts[2], error="the prompt could not be tokenized: TypeError: x")
    prompts[4] = dataclasses.replace(prompts[4], temperature=1.0, seed=-2**64)
    done, _ = decode(tiny_model, tokenizer, prompts, GenerationConfig(max_new_tokens=4), batch_size=2,
                     scheduler=scheduler)
    assert sorted(done) == list(range(5))
    assert done[1].finish_reason == "error" and done[1].token_ids == []
    assert done[1].error.startswith(f"seed={2**70} cannot seed a sampler: ")
    assert done[2].error == "the prompt could not be tokenized: TypeError: x"
    assert done[4].finish_reason == "error"
    for k in (0, 3):
        assert done[k].error is None and done[k].token_ids == reference_greedy(tiny_model, tokenizer,
                                                                                 prompts[k].text, 4, [])
    record = output_record(done[1], StopStrings(tokenizer).cut)
    assert record["finish_reason"] == "error" and record["error"] == done[1].error and record["id"] == PROMPTS[1]["id"]


def test_a_queue_of_only_failing_requests_ends(tiny_model, tokenizer):
    prompts = [Prompt(i, i, "x", 2, error="bad") for i in range(3)]
    done, _ = decode(tiny_model, tokenizer, prompts, GenerationConfig(max_new_tokens=2))
    assert [done[i].finish_reason for i in range(3)] == ["error"] * 3


class DecodeFailsOn:
    """The real tokenizer, except that decoding a list holding `token` fails (as a sentencepiece tokenizer does
    on an id past its vocabulary, which a model with a larger embedding can sample)."""

    def __init__(self, tokenizer, token: int):
        self.tokenizer, self.token = tokenizer, token

    def decode(self, ids, **settings):
        if self.token in ids:
            raise IndexError("piece id is out of range")
        return self.tokenizer.decode(ids, **settings)


def test_a_completion_whose_tokens_cannot_be_decoded_fails_alone(tiny_model, tokenizer):
    greedy = [reference_greedy(tiny_model, tokenizer, p["prompt"], 6, []) for p in PROMPTS]
    others = {t for k, ids in enumerate(greedy) if k != 3 for t in ids}
    token = next(t for t in greedy[3] if t not in others)  # only prompt 3 generates it
    prompts = [Prompt(i, p["id"], p["prompt"], 6, stop=("\x00never\x00",)) for i, p in enumerate(PROMPTS)]
    stops = StopStrings(DecodeFailsOn(tokenizer, token))
    done, _ = decode(tiny_model, tokenizer, prompts, GenerationConfig(max_new_tokens=6), stops=stops)
    assert done[3].finish_reason == "error" and done[3].error == (
        "its tokens could not be decoded to look for its stop strings: IndexError: piece id is out of range")
    for k in set(range(len(PROMPTS))) - {3}:
        assert done[k].finish_reason == "length" and done[k].token_ids == greedy[k], k
    # Without stop strings the tokens are decoded only when the record is written: it fails alone there too.
    kept = Completion(Prompt(3, "code", PROMPTS[3]["prompt"]), 5, greedy[3], "length")
    assert output_record(kept, stops.cut)["error"].startswith("its tokens could not be decoded")


def test_a_prompt_the_tokenizer_fails_on_is_found_alone(tokenizer):
    prompts = [Prompt(0, 0, "fine"), Prompt(1, 1, "half \ud800 a pair"), Prompt(2, 2, "also fine")]
    ids, failed = tokenize_checked(tokenizer, prompts)
    assert ids == [tokenizer("fine")["input_ids"], [], tokenizer("also fine")["input_ids"]]
    assert list(failed) == [1] and failed[1].startswith("the prompt could not be tokenized: TypeError")


def test_a_record_the_engine_fails_is_said_as_a_warning(tiny_model_dir, tmp_path, capsys):
    """A record whose settings only the engine can judge (a logit_bias token past the model's vocabulary) gets an
    error record and a warning line naming it, as a record screening fails does; the others run."""
    import json
    from distgen.run import main as run_in_process
    from tests.helpers import write_prompts
    prompts = write_prompts(tmp_path / "p.jsonl", [{"id": "fine", "prompt": "Hello"},
                                                   {"id": "far", "prompt": "Hello", "logit_bias": {"99999": 5}}])
    assert run_in_process([f"model={tiny_model_dir}", f"dataset={prompts}", "generation.max_new_tokens=3",
                           f"output.dir={tmp_path / 'out'}"]) == 0
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "outputs.jsonl").read_text().splitlines())}
    assert records["fine"]["finish_reason"] == "length" and records["far"]["finish_reason"] == "error"
    err = capsys.readouterr().err
    assert "record 'far' (index 1): logit_bias token id 99999 is not allowed" in err
    assert "it gets an error record" in err and "'fine'" not in err


def test_logprobs_past_max_logprobs_fail_their_record_and_the_config(tiny_model, tokenizer):
    """vLLM's max_logprobs (20): a record asking for more alternatives gets an error record, the others run;
    generation.* asking for more is a config error; -1 lifts the cap (the vocabulary still caps it)."""
    from distgen.catalog import check_section
    prompts = [Prompt(i, p["id"], p["prompt"], 3) for i, p in enumerate(PROMPTS[:3])]
    prompts[0] = dataclasses.replace(prompts[0], logprobs=21)
    prompts[1] = dataclasses.replace(prompts[1], prompt_logprobs=100)
    prompts[2] = dataclasses.replace(prompts[2], logprobs=20)
    done, _ = decode(tiny_model, tokenizer, prompts, GenerationConfig(max_new_tokens=3))
    assert done[0].error == "logprobs=21 is not allowed: must be at most generation.max_logprobs=20"
    assert done[1].error == "prompt_logprobs=100 is not allowed: must be at most generation.max_logprobs=20"
    assert done[2].error is None and len(done[2].logprobs) == 3 and len(done[2].logprobs[0]["top"]) == 20
    assert done[2].token_ids == reference_greedy(tiny_model, tokenizer, prompts[2].text, 3, [])
    uncapped, _ = decode(tiny_model, tokenizer, prompts[:2], GenerationConfig(max_new_tokens=3, max_logprobs=-1))
    assert [uncapped[i].error for i in (0, 1)] == [None, None] and len(uncapped[0].logprobs[0]["top"]) == 21
    for bad in (dict(logprobs=21), dict(prompt_logprobs=5, max_logprobs=4), dict(max_logprobs=-2)):
        with pytest.raises(ConfigError, match=r"generation\.(logprobs|prompt_logprobs|max_logprobs)=.* is not allowed"):
            check_section("generation", GenerationConfig(**bad))
    check_section("generation", GenerationConfig(logprobs=50, max_logprobs=-1))
