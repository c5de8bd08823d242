"""A job that fails part way keeps every batch it finished on disk, and a restart skips them."""
import json

import pytest

from distgen.backends.cpu import kernels as cpu_kernels
from distgen.models.loading import ModelSource
from distgen.run import main as run_in_process
from distgen.outputs.folder import read_manifest
from distgen.outputs.shards import list_shards
from tests.helpers import crash_at_step, journaled, read_outputs, read_stats

ARGS = ["generation.batch_size=2", "generation.max_new_tokens=4"]


def test_failure_keeps_finished_batches_and_restart_skips_them(tiny_model_dir, prompts_file, tmp_path, monkeypatch,
                                                               capsys):
    args = [f"model={tiny_model_dir}", f"dataset={prompts_file}", *ARGS]
    complete = tmp_path / "complete"
    assert run_in_process([*args, f"output.dir={complete}"]) == 0
    want = read_outputs(complete)
    assert [p.name for p in list_shards(complete)] == ["part-00000-00000.jsonl"]
    total_steps = read_stats(complete)["ranks"][0]["forward_steps"]

    failed = tmp_path / "failed"
    with monkeypatch.context() as patch:
        crash_at_step(patch, total_steps - 1)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_in_process([*args, f"output.dir={failed}"])
    kept = journaled(failed)
    assert not (failed / "outputs.jsonl").exists()
    assert 2 <= len(kept) < len(want)
    assert all(record == want[record["index"]] for record in kept)

    assert run_in_process([*args, f"output.dir={failed}"]) == 0
    assert read_outputs(failed) == want
    stats = read_stats(failed)
    assert stats["summary"]["resumed"] == len(kept)
    assert stats["ranks"][0]["prompts"] == len(want) - len(kept)
    assert not any(p.name.endswith(".open.jsonl") for p in list_shards(failed))

    # all done: the job says so, loads no model and keeps its stats
    with monkeypatch.context() as patch:
        patch.setattr(ModelSource, "full", lambda self: pytest.fail("a finished job loaded the model"))
        assert run_in_process([*args, f"output.dir={failed}", "generation.batch_size=1"]) == 0
    assert "already finished: 7 prompts" in capsys.readouterr().out
    assert read_outputs(failed) == want and read_stats(failed) == stats


def test_changed_job_refuses_and_overwrite_moves_the_earlier_outputs_aside(tiny_model_dir, prompts_file, tmp_path,
                                                                            capsys):
    """Issue 21: a rerun with other settings no longer deletes the earlier outputs; it refuses naming what
    changed, and output.overwrite=true moves them aside."""
    out = tmp_path / "out"
    args = [f"model={tiny_model_dir}", f"dataset={prompts_file}", *ARGS, f"output.dir={out}"]
    assert run_in_process(args) == 0
    first = read_outputs(out)
    assert run_in_process([*args, "generation.max_new_tokens=3"]) == 2
    assert "generation.max_new_tokens: 4 -> 3" in capsys.readouterr().err
    assert read_outputs(out) == first
    assert run_in_process([*args, "generation.max_new_tokens=3", "output.overwrite=true"]) == 0
    stats = read_stats(out)
    assert stats["summary"]["resumed"] == 0 and stats["ranks"][0]["prompts"] == 7
    assert all(r["completion_tokens"] <= 3 for r in read_outputs(out) if r["id"] not in ("story", "code"))
    [previous] = out.glob("previous-*")
    assert read_outputs(previous) == first


def test_resume_off_needs_overwrite_then_regenerates(tiny_model_dir, prompts_file, tmp_path, capsys):
    """Issue 21: output.resume=false no longer deletes the earlier outputs: it refuses without overwrite=true."""
    args = [f"model={tiny_model_dir}", f"dataset={prompts_file}", *ARGS, f"output.dir={tmp_path}"]
    assert run_in_process(args) == 0
    assert run_in_process([*args, "output.resume=false"]) == 2
    assert "output.resume=false does not reuse them" in capsys.readouterr().err
    assert run_in_process([*args, "output.resume=false", "output.overwrite=true"]) == 0
    assert read_stats(tmp_path)["ranks"][0]["prompts"] == 7
    assert len(list(tmp_path.glob("previous-*"))) == 1


def test_a_job_whose_records_are_all_written_closes_without_loading_the_model(tiny_model_dir, prompts_file, tmp_path,
                                                                             capsys):
    """Every record in the shards but the manifest not closed (a crash between the last record and the merge):
    the rerun loads no model and generates nothing; it checks, merges and reports the job as it was."""
    from distgen.outputs.folder import write_manifest
    args = [f"model={tiny_model_dir}", f"dataset={prompts_file}", *ARGS, f"output.dir={tmp_path}"]
    assert run_in_process(args) == 0
    first = read_outputs(tmp_path)
    write_manifest(tmp_path, {**read_manifest(tmp_path), "complete": False})
    (tmp_path / "outputs.jsonl").unlink()
    capsys.readouterr()
    assert run_in_process(args) == 0
    said = capsys.readouterr()
    assert "engine:" not in said.out + said.err and "resuming: 7 of 7" in said.out + said.err
    assert read_outputs(tmp_path) == first
    stats = read_stats(tmp_path)
    assert stats["ranks"][0]["generated_tokens"] == 0 and stats["ranks"][0]["load_seconds"] == 0
    assert stats["summary"]["prompts"] == 7 and read_manifest(tmp_path)["complete"]


def test_journal_lines_split_only_on_newlines(tmp_path):
    """A completion holding U+2028 or U+0085 (left unescaped with ensure_ascii=False) is one record."""
    from distgen.outputs.shards import read_jsonl_lines

    records = [{"index": 0, "completion": "a\u2028b\x85c"}, {"index": 1, "completion": "d"}]
    path = tmp_path / "j.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + '{"index": 2, "cut', "utf-8")
    assert list(read_jsonl_lines(path)) == records


@pytest.mark.parametrize("kernels,sampled", [("torch", True), ("torch", False), ("auto", True)])
def test_a_resumed_sampled_job_says_when_its_draws_may_differ(tiny_model_dir, prompts_file, tmp_path, monkeypatch,
                                                             capsys, kernels, sampled):
    """Issue 21 item 8: on torch's kernels (generation.cpu_kernels=torch) a row's logits depend on the rows sharing
    its forward, so a sampled job resumed after a crash says once that its records are valid draws, not
    necessarily an uninterrupted run's tokens; a greedy one does not (argmax holds), nor one on distgen's CPU
    kernels, whose rows are batch-invariant: its records equal an uninterrupted run's."""
    if kernels == "auto" and cpu_kernels.load_kernel()[0] is None:
        pytest.skip(f"distgen's CPU kernels cannot be built here: {cpu_kernels.load_kernel()[1]}")
    args = [f"model={tiny_model_dir}", f"dataset={prompts_file}", *ARGS, f"generation.cpu_kernels={kernels}"]
    if sampled:
        args += ["generation.do_sample=true", "generation.temperature=0.9", "generation.seed=3"]
    note = "not necessarily the tokens an uninterrupted run would have drawn"
    assert run_in_process([*args, f"output.dir={tmp_path / 'whole'}"]) == 0
    with monkeypatch.context() as patch:
        crash_at_step(patch, read_stats(tmp_path / "whole")["ranks"][0]["forward_steps"] - 1)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_in_process([*args, f"output.dir={tmp_path / 'resumed'}"])
    capsys.readouterr()
    assert run_in_process([*args, f"output.dir={tmp_path / 'resumed'}"]) == 0
    said = capsys.readouterr().out
    stats = read_stats(tmp_path / "resumed")
    [rank] = stats["ranks"]
    invariant = kernels == "auto"
    assert stats["summary"]["resumed"] > 0 and rank["batch_invariant"] is invariant
    assert rank["engine"]["batch_invariant"]["value"] is invariant
    assert (rank["sampled_completions"] == rank["prompts"]) if sampled else rank["sampled_completions"] == 0
    assert read_manifest(tmp_path / "resumed")["runs"][-1]["batch_invariant"] is invariant
    assert said.count(note) == (1 if sampled and not invariant else 0)
    if invariant:
        assert read_outputs(tmp_path / "resumed") == read_outputs(tmp_path / "whole")
