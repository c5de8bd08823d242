"""n samples per prompt (generation.n) and a shared prefix prefilled once (generation.prefix_sharing, issue 24
items 3 and 8): each sample draws from its own seed stream, sample 0 from the stream n=1 draws; a prompt is
prefilled once and its KV copied into its samples' slots; prompts sharing a long prefix copy it from a slot that
holds it. Greedy tokens equal `model.generate`; prompt tokens are counted (run or copied, never both)."""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from distgen.catalog import check_section
from distgen.catalog.load import load_config
from distgen.common.errors import ConfigError
from distgen.config import GenerationConfig, ModelConfig, RunConfig
from distgen.engine.prefix import BLOCK, PREFIX_SHARING, block_keys
from distgen.engine.sampling import sample_seed
from distgen.inputs.keys import record_key
from distgen.inputs.records import Prompt
from distgen.outputs.resume import job_settings
from distgen.outputs.samples import SampleTable
from distgen.run import main as run_in_process
from tests.helpers import (DEFAULT_BUDGET, PROMPTS, REPO, assert_matches_generate, crash_at_step, engine_for,
                           generate_samples, journaled, paced_env, read_outputs, read_stats, stop_pids, wait_until,
                           write_prompts)

SAMPLED = dict(do_sample=True, temperature=1.0, seed=11)
# A system prompt of 100 characters (the byte-level tokenizer: a token each, no BOS) and questions whose first
# letters differ: two prompts share exactly the system prompt.
SYSTEM = "You are a careful assistant. Answer in one short sentence, and say when you do not know the answer. "
QUESTIONS = ["What is the capital of France?", "Name a prime number.", "Explain why the sky is blue.",
             "How far is the moon?", "Tell me who wrote Hamlet.", "Define entropy.", "List three colours.",
             "Is zero even?", "Spell banana."]
SHARED = [{"id": f"q{i}", "prompt": SYSTEM + question, "max_new_tokens": 3 + i % 4}
          for i, question in enumerate(QUESTIONS)]


def prompt_lengths(tokenizer, records) -> list[int]:
    return [len(tokenizer(r["prompt"])["input_ids"]) for r in records]


def slot_cfg(**settings) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": DEFAULT_BUDGET, "batch_size": 4, "cache": "static",
                               "compile": "off", **settings})


# ---------------------------------------------------------------- n samples


def test_seeds_of_samples_keep_sample_0_and_differ_from_each_other():
    assert sample_seed(12345, 0) == 12345  # what n=1 draws
    seeds = {sample_seed(base, k) for base in range(50) for k in range(1, 20)}
    assert len(seeds) == 50 * 19 and not seeds & set(range(50)) and max(seeds) < 2**64


def test_sampled_n_draws_each_sample_from_its_own_stream_and_sample_0_is_the_n1_run(tiny_model, tokenizer):
    """Every (prompt, sample) once; sample 0 equals the n=1 job's tokens; the samples of one prompt differ; a
    prompt is prefilled once: its other samples copy all its tokens but the last (whose logits draw their own)."""
    single = generate_samples(engine_for(tiny_model, tokenizer, PROMPTS, slot_cfg(**SAMPLED)))
    engine = engine_for(tiny_model, tokenizer, PROMPTS, slot_cfg(n=3, **SAMPLED))
    got = generate_samples(engine)
    assert sorted(got) == sorted((r["id"], k) for r in PROMPTS for k in range(3))
    for record in PROMPTS:
        assert got[record["id"], 0].token_ids == single[record["id"], 0].token_ids, record["id"]
        samples = [tuple(got[record["id"], k].token_ids) for k in range(3)]
        assert len(set(samples)) == 3, (record["id"], samples)
    lengths = prompt_lengths(tokenizer, PROMPTS)
    assert engine.prefill_tokens == sum(lengths) + 2 * len(PROMPTS)
    assert engine.prefixes.shared_tokens == 2 * sum(n - 1 for n in lengths)
    # the samples are the same whatever else shares their forwards: one row, one sample at a time
    alone = generate_samples(engine_for(tiny_model, tokenizer, PROMPTS, slot_cfg(n=3, batch_size=1, **SAMPLED)))
    assert {key: c.token_ids for key, c in alone.items()} == {key: c.token_ids for key, c in got.items()}


@pytest.mark.parametrize("scheduler,kernels", [("continuous", "auto"), ("continuous", "torch"), ("chunked", "auto"),
                                               ("static", "auto")])  # "torch": transformers' forward + SDPA
def test_greedy_n_gives_n_equal_completions_equal_to_generate(tiny_model, tokenizer, scheduler, kernels):
    """As vLLM does: greedy decoding has one answer, so n samples are n copies of it (documented). The other
    samples wait for the first's prefill (chunked: all its chunks), then run only the last prompt token."""
    engine = engine_for(tiny_model, tokenizer, PROMPTS, slot_cfg(n=2, cpu_kernels=kernels, scheduler=scheduler,
                                                                 prefill_chunk_tokens=16))
    got = generate_samples(engine)
    for sample in range(2):
        assert_matches_generate(tiny_model, tokenizer, {r["id"]: got[r["id"], sample] for r in PROMPTS})
    assert engine.prefill_tokens == sum(prompt_lengths(tokenizer, PROMPTS)) + len(PROMPTS)


def test_a_record_n_overrides_generation_n_and_caches_that_cannot_copy_prefill_each_sample(tiny_model, tokenizer):
    records = [dict(r, n=1 + i % 3) for i, r in enumerate(PROMPTS)]
    lengths = prompt_lengths(tokenizer, records)
    engine = engine_for(tiny_model, tokenizer, records, slot_cfg(cache="dynamic", n=5, **SAMPLED))
    assert engine.prefixes is None and "no prefix sharing (the DynamicKV cache does not copy KV between rows)" in engine.choice
    got = generate_samples(engine)
    assert sorted(got) == sorted((r["id"], k) for r in records for k in range(r["n"]))
    assert engine.prefill_tokens == sum(r["n"] * n for r, n in zip(records, lengths))  # each sample prefills it
    single = generate_samples(engine_for(tiny_model, tokenizer, PROMPTS, slot_cfg(cache="dynamic", **SAMPLED)))
    assert all(got[r["id"], 0].token_ids == single[r["id"], 0].token_ids for r in PROMPTS)


def test_n_and_a_record_n_are_checked_and_n1_keeps_record_keys():
    with pytest.raises(ConfigError, match=r"generation.n=0 is not allowed: must be an integer in \[1, 65536\]"):
        check_section("generation", GenerationConfig(n=0))
    with pytest.raises(ConfigError, match="generation.prefix_sharing='always' is not allowed: expected one of auto"):
        check_section("generation", GenerationConfig(prefix_sharing="always"))
    assert PREFIX_SHARING.names() == ("auto", "on", "off")
    # a record that sets no n keeps the key it had before records could set one (the value main computes), so
    # earlier runs' records are found
    plain = Prompt(3, "p3", "text", max_new_tokens=4)
    assert record_key(plain) == 2365278814521798467 and record_key(Prompt(3, "p3", "text", 4, n=2)) != record_key(plain)


def test_n_counts_in_the_job_settings_only_when_set_and_prefix_sharing_never():
    """n=1 jobs keep the fingerprint they had before generation.n existed; prefix sharing changes no token."""
    def settings(**gen):
        return job_settings(RunConfig(model=ModelConfig(source="tiny"), generation=GenerationConfig(**gen)))
    assert "generation.n" not in settings() and settings(n=2)["generation.n"] == 2
    assert settings(prefix_sharing="off") == settings() and "generation.prefix_sharing" not in settings()


@pytest.mark.parametrize("override,blocker", [
    ("generation.cache=dynamic", "generation.cache=dynamic is not a slot cache"),
    ("generation.cache=sliding_window", "generation.cache=sliding_window keeps a ring"),
    ("model.assistant=prompt_lookup", "model.assistant=prompt_lookup drafts from a cache of its own"),
])
def test_prefix_sharing_on_is_refused_where_no_prefix_can_be_copied(override, blocker):
    job = ["model=tiny", "dataset=p.jsonl", override]
    with pytest.raises(ConfigError, match=f"generation.prefix_sharing='on' is not allowed: {blocker}"):
        load_config([*job, "generation.prefix_sharing=on"])
    assert load_config(job).generation.prefix_sharing == "auto"  # auto: the engine line says why it does not share


def test_the_sample_table_places_every_record_once():
    table = SampleTable.of([1, 3, 2])
    assert table.total == 6 and [table.position(i, s) for i, s in ((0, 0), (1, 2), (2, 1))] == [0, 3, 5]
    assert table.position(1, 3) is None and table.position(3, 0) is None and table.position(0, -1) is None
    done = np.array([1, 0, 1, 1, 0, 1], dtype=bool)
    assert table.per_prompt(done).tolist() == [1, 2, 1] and table.left(done, 1) == [0] and table.left(done, 2) == [0]
    assert table.names(np.array([1, 4])) == [(1, 0), (2, 0)] and SampleTable.ones(3).names(np.array([2])) == [2]


# ---------------------------------------------------------------- a shared prefix


@pytest.mark.parametrize("scheduler,kernels", [("continuous", "auto"), ("continuous", "torch"), ("chunked", "auto"),
                                               ("static", "auto")])
def test_a_shared_prefix_is_prefilled_once_and_the_tokens_are_generates(tiny_model, tokenizer, scheduler, kernels):
    """Prompts of one system prompt: the first prefills it, the others copy its columns from a slot that holds it
    (a running prompt's, or a freed slot reused in place) and prefill only their question. Same tokens as
    generate (positions and rotary of the suffix right), fewer prompt tokens run; with prefix_sharing=off every
    prompt runs all of its own."""
    settings = dict(scheduler=scheduler, cpu_kernels=kernels, prefill_chunk_tokens=48)
    lengths, prefix = prompt_lengths(tokenizer, SHARED), len(tokenizer(SYSTEM)["input_ids"])
    engine = engine_for(tiny_model, tokenizer, SHARED, slot_cfg(**settings))
    assert "prefix sharing: a prompt admitted while a slot holds >= 64 of its first tokens" in engine.choice
    got = generate_samples(engine)
    assert_matches_generate(tiny_model, tokenizer, {key: c for (key, _), c in got.items()}, SHARED)
    shared = engine.prefixes.shared_tokens
    assert engine.prefill_tokens == sum(lengths) - shared
    if scheduler == "chunked":  # a prompt admitted while the first is part way (48 of 100) does not wait for less
        assert prefix * (len(SHARED) - 2) < shared <= prefix * (len(SHARED) - 1)  # than 64 more: it prefills those
    else:
        assert shared == prefix * (len(SHARED) - 1)
    off = engine_for(tiny_model, tokenizer, SHARED, slot_cfg(prefix_sharing="off", **settings))
    assert "prefix sharing off" in off.choice
    assert {key: c.token_ids for key, c in generate_samples(off).items()} == {k: c.token_ids for k, c in got.items()}
    assert off.prefill_tokens == sum(lengths) and off.prefixes.shared_tokens == 0


def test_prefix_sharing_and_samples_in_the_pipelined_engine(tiny_model, tokenizer):
    """Rows addressed by slot id, step N+1 launched before step N lands: a slot freed when step N lands still
    holds its prompt, and copies are made before the forward that reads them."""
    records = [dict(r, n=1 + i % 2) for i, r in enumerate(SHARED)]
    engine = engine_for(tiny_model, tokenizer, records, slot_cfg(batch_size=3, cpu_kernels="torch",
                                                                 attention="varlen_reference"))
    assert engine.pipelined
    got = generate_samples(engine)
    assert sorted(got) == sorted((r["id"], k) for r in records for k in range(r["n"]))
    for sample in range(2):
        have = {key: c for (key, k), c in got.items() if k == sample}
        assert_matches_generate(tiny_model, tokenizer, have, [r for r in records if r["id"] in have])
    lengths = prompt_lengths(tokenizer, records)
    assert engine.prefill_tokens + engine.prefixes.shared_tokens == sum(r["n"] * n for r, n in zip(records, lengths))
    assert engine.prefill_tokens < sum(lengths) - len(SYSTEM) * (len(records) - 2)


def test_short_or_unshared_prefixes_are_not_copied_and_a_ring_does_not_copy(tiny_model, sliding_model, tokenizer):
    engine = engine_for(tiny_model, tokenizer, PROMPTS, slot_cfg())  # they share at most BOS and a few letters
    generate_samples(engine)
    assert engine.prefixes.shared_tokens == 0
    ring = engine_for(sliding_model, tokenizer, PROMPTS[:2], slot_cfg(cache="sliding_window", n=2))
    assert ring.prefixes is None and "no prefix sharing" in ring.choice
    with pytest.raises(ConfigError, match="generation.prefix_sharing=on is not possible: the sliding-window ring"):
        engine_for(sliding_model, tokenizer, PROMPTS[:2], slot_cfg(cache="sliding_window", prefix_sharing="on"))
    ids = list(range(40))
    assert len(block_keys(ids)) == 40 // BLOCK and block_keys(ids)[1] != block_keys([0] + ids[1:])[0]
    assert block_keys(ids)[:2] == block_keys(ids[:32] + [99] * 8)[:2]


# ---------------------------------------------------------------- a real job, killed and resumed


SAMPLED_ARGS = ["generation.n=3", "generation.do_sample=true", "generation.seed=5", "generation.batch_size=2",
                "generation.max_new_tokens=4", "output.print_table=false"]


def job_args(model_dir, prompts, out, *extra) -> list[str]:
    return [f"model={model_dir}", f"dataset={prompts}", f"output.dir={out}", *SAMPLED_ARGS, *extra]


def pairs(records) -> list:
    return [(r["id"], r["sample_index"]) for r in records]


@pytest.fixture(scope="module")
def sample_prompts(tmp_path_factory):
    records = [dict(r, n=2) if r["id"] == "code" else r for r in PROMPTS]  # one record with n of its own
    records.append({"id": "bad", "prompt": "A record that cannot run", "top_p": 2})  # an error record per sample
    return records, write_prompts(tmp_path_factory.mktemp("samples") / "p.jsonl", records)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, sample_prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples-whole")
    assert run_in_process(job_args(tiny_model_dir, sample_prompts[1], out)) == 0
    return read_outputs(out), read_stats(out)


def test_a_job_writes_each_id_and_sample_once_in_order(sample_prompts, uninterrupted, tiny_model_dir, tmp_path):
    records, _ = sample_prompts
    outputs, stats = uninterrupted
    want = [(r["id"], k) for r in records for k in range(r.get("n", 3))]
    assert pairs(outputs) == want  # dataset order, then sample_index
    assert [r["finish_reason"] for r in outputs if r["id"] == "bad"] == ["error"] * 3
    assert stats["summary"]["records"] == len(want) and stats["summary"]["prompts"] == len(records)
    assert stats["summary"]["errors"] == 3
    rank = stats["ranks"][0]
    assert rank["shared_prefix_tokens"] > 0 and rank["prefill_tokens"] + rank["shared_prefix_tokens"] == \
        sum(r["prompt_tokens"] for r in outputs if r["finish_reason"] != "error")
    single = tmp_path / "single"  # sample 0 is what the same job with n=1 writes
    assert run_in_process(job_args(tiny_model_dir, sample_prompts[1], single, "generation.n=1")) == 0
    first = {(r["id"], r["sample_index"]): r["completion_token_ids"] for r in outputs if r["sample_index"] == 0
             or r["id"] == "code"}  # "code" has n=2 of its own in both jobs
    assert {(r["id"], r["sample_index"]): r["completion_token_ids"] for r in read_outputs(single)} == first


def test_a_crashed_job_resumes_per_sample(sample_prompts, uninterrupted, tiny_model_dir, tmp_path, monkeypatch):
    """Two rows and three samples: a prompt's third sample runs after its first two, so the crash leaves prompts
    with some samples done; the rerun runs exactly the missing (index, sample_index), drawing the same tokens."""
    want, stats = uninterrupted
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        crash_at_step(patch, stats["ranks"][0]["forward_steps"] // 2)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_in_process(job_args(tiny_model_dir, sample_prompts[1], out))
    kept = journaled(out)
    per_prompt = {}
    for record in kept:
        per_prompt.setdefault(record["id"], []).append(record["sample_index"])
    assert any(0 < len(samples) < 3 for key, samples in per_prompt.items() if key not in ("code", "bad")), per_prompt
    assert run_in_process(job_args(tiny_model_dir, sample_prompts[1], out)) == 0
    assert read_outputs(out) == want
    resumed = read_stats(out)
    assert resumed["summary"]["resumed"] == len(kept) and resumed["ranks"][0]["prompts"] == len(want) - len(kept)


def test_a_killed_job_resumes_each_id_and_sample_once(sample_prompts, uninterrupted, tiny_model_dir, tmp_path):
    """SIGKILL part way (records journaled as they finish), then the same command: every (id, sample_index)
    exactly once, the tokens of the uninterrupted job."""
    want, _ = uninterrupted
    out = tmp_path / "out"
    job = subprocess.Popen([sys.executable, "-m", "distgen.run", *job_args(tiny_model_dir, sample_prompts[1], out)],
                           cwd=REPO, env={**paced_env(0.5), "RANK": "0"}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(journaled(out)) >= 4 or job.poll() is not None, 300, "4 journaled records")
        assert job.poll() is None, job.communicate()
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        stop_pids([job.pid], grace_s=0)
    kept = journaled(out)
    assert 4 <= len(kept) < len(want) and len(set(pairs(kept))) == len(kept)
    assert run_in_process(job_args(tiny_model_dir, sample_prompts[1], out)) == 0
    got = read_outputs(out)
    assert got == want and len(set(pairs(got))) == len(got)
    manifest = json.loads((out / "outputs" / "manifest.json").read_text())
    assert manifest["records"] == len(want) and read_stats(out)["summary"]["resumed"] == len(kept)
