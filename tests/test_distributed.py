"""Two gloo ranks under torchrun, checked against single-process `model.generate`."""
import re

import pytest

from distgen.engine.backoff import INJECT_ENV
from distgen.run import main as run_in_process
from tests.helpers import (DEFAULT_BUDGET, PROMPTS, assert_prompts_greedy, crash_at_step, job_args, journaled,
                           read_outputs, read_stats, reference_greedy, run_module, write_prompts)


@pytest.mark.parametrize("layout,engine", [
    ("replicate", []), ("fsdp", ["generation.cache=dynamic"]),
    ("replicate", ["generation.cache=dynamic", "generation.scheduler=static"]),
    ("fsdp", ["generation.scheduler=chunked", "generation.prefill_chunk_tokens=8"])],
    ids=["replicate-slots", "fsdp-dynamic", "replicate-dynamic-static", "fsdp-slots-chunked"])
def test_two_ranks_equal_single_process_greedy(layout, engine, tiny_model_dir, tiny_model, tokenizer, prompts_file,
                                               tmp_path):
    eos = reference_greedy(tiny_model, tokenizer, "The capital of France is", DEFAULT_BUDGET, [])[2]
    out = tmp_path / "out"
    result = run_module("distgen.run", job_args(tiny_model_dir, prompts_file, out, f"layout={layout}",
                                                f"generation.eos_token_ids=[{eos}]", *engine), nproc=2)
    assert result.returncode == 0, result.stderr

    records = read_outputs(out)
    assert [r["id"] for r in records] == [p["id"] for p in PROMPTS]
    assert [r["index"] for r in records] == list(range(len(PROMPTS)))
    for record, prompt in zip(records, PROMPTS):
        want = reference_greedy(tiny_model, tokenizer, prompt["prompt"], prompt.get("max_new_tokens", DEFAULT_BUDGET),
                                [eos])
        assert record["completion_token_ids"] == want, prompt["id"]
        assert record["completion"] == tokenizer.decode(want, skip_special_tokens=True)
    assert records[1]["finish_reason"] == "eos"

    ranks = read_stats(out)["ranks"]
    assert [s["rank"] for s in ranks] == [0, 1]
    assert all(s["prompts"] > 0 for s in ranks) and sum(s["prompts"] for s in ranks) == len(PROMPTS)
    steps = [s["forward_steps"] for s in ranks]
    assert steps[0] != steps[1], "the prompts should make the ranks finish at different steps"
    if layout == "fsdp":  # the rank done first keeps joining forwards until its peer is done
        assert [s["forward_steps"] + s["idle_steps"] for s in ranks] == [max(steps)] * 2
        assert max(s["idle_steps"] for s in ranks) > 0
    else:
        assert all(s["idle_steps"] == 0 for s in ranks)
    assert "total: 7 prompts" in result.stdout


def test_rank_without_prompts_does_not_hang(tiny_model_dir, tiny_model, tokenizer, tmp_path):
    prompts = write_prompts(tmp_path / "one.jsonl", [{"id": "only", "prompt": "The quick brown fox"}])
    out = tmp_path / "out"
    result = run_module("distgen.run", job_args(tiny_model_dir, prompts, out, "layout=fsdp"), nproc=2, timeout=120)
    assert result.returncode == 0, result.stderr
    [record] = read_outputs(out)
    assert record["completion_token_ids"] == reference_greedy(tiny_model, tokenizer, "The quick brown fox",
                                                              DEFAULT_BUDGET, [tokenizer.eos_token_id])
    ranks = read_stats(out)["ranks"]
    assert ranks[1]["prompts"] == 0 and ranks[1]["forward_steps"] == 0
    assert ranks[1]["idle_steps"] == ranks[0]["forward_steps"] > 0


def test_seeded_sampling_same_on_two_ranks_via_launcher_as_on_one(tiny_model_dir, prompts_file, tmp_path):
    sample = ["generation=sample", "generation.max_new_tokens=6", "generation.seed=11"]
    two, one = tmp_path / "two", tmp_path / "one"
    result = run_module("distgen.launch", job_args(tiny_model_dir, prompts_file, two, *sample, "launcher=torchrun",
                                                   "launcher.nproc_per_node=2", "generation.max_new_tokens=6"))
    assert result.returncode == 0, result.stderr
    assert "launching" in result.stdout and "--nproc-per-node=2" in result.stdout
    assert run_in_process(job_args(tiny_model_dir, prompts_file, one, *sample, "generation.max_new_tokens=6")) == 0
    assert read_outputs(two) == read_outputs(one)
    assert len(read_stats(two)["ranks"]) == 2 and len(read_stats(one)["ranks"]) == 1


def test_every_line_a_rank_prints_names_its_rank(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "out"
    # batch_size=auto: each rank says what it picked (info); an injected out-of-memory error: each rank backs off
    # (a warning, on stderr).
    result = run_module("distgen.launch", job_args(tiny_model_dir, prompts_file, out, "launcher=torchrun",
                                                   "launcher.nproc_per_node=2", "generation.batch_size=auto",
                                                   "output.progress_every_s=0.001"), env={INJECT_ENV: "2"})
    assert result.returncode == 0, result.stderr
    lines = {"stdout": result.stdout.splitlines(), "stderr": result.stderr.splitlines()}
    ours = {stream: [line for line in found if line.startswith("distgen")] for stream, found in lines.items()}
    # The launcher's own line says `distgen: `; every other line of distgen's names its rank, on its stream.
    assert [line for line in ours["stdout"] if line.startswith("distgen: ")] == [
        line for line in ours["stdout"] if line.startswith("distgen: launching ")] != []
    named = {stream: [line for line in found if not line.startswith("distgen: launching ")]
             for stream, found in ours.items()}
    assert all(re.match(r"distgen\[rank [01]\]: ", line) for found in named.values() for line in found), named
    for rank in (0, 1):
        assert any(line.startswith(f"distgen[rank {rank}]: generation.batch_size=auto picked ")
                   for line in named["stdout"]), named
        assert any(line.startswith(f"distgen[rank {rank}]: ") and "backing off to generation.batch_size=" in line
                   for line in named["stderr"]), named
    # Rank 0's progress, engine, table (each of its lines) and closing line.
    for said in ("7/7 prompts (100.0%)", "engine: ", "total: 7 prompts", f"wrote 7 records to {out}"):
        assert any(line.startswith(f"distgen[rank 0]: {said}") for line in named["stdout"]), (said, named)
    assert sum(bool(re.match(r"distgen\[rank 0\]: +[01] +cpu ", line)) for line in named["stdout"]) == 2  # table rows
    # None of distgen's words on a line without its prefix (torchrun's and torch's own lines aside).
    assert not [line for found in lines.values() for line in found if not line.startswith("distgen")
                and re.search(r"prompts|records|engine:|backing off|batch_size", line)], lines


def test_restart_on_two_fsdp_ranks_finishes_a_crashed_one_rank_job(tiny_model_dir, tiny_model, tokenizer,
                                                                   prompts_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = job_args(tiny_model_dir, prompts_file, out)
    with monkeypatch.context() as patch:
        crash_at_step(patch, 16)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_in_process(args)
    kept = len(journaled(out))
    assert 0 < kept < len(PROMPTS)

    result = run_module("distgen.run", [*args, "layout=fsdp"], nproc=2)
    assert result.returncode == 0, result.stderr
    assert f"resuming: {kept} of {len(PROMPTS)} prompts already done" in result.stdout
    assert_prompts_greedy(read_outputs(out), tiny_model, tokenizer)
    assert sum(s["prompts"] for s in read_stats(out)["ranks"]) == len(PROMPTS) - kept
