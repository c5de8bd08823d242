"""A job that fails part way keeps every batch it finished on disk."""
import pytest

from conftest import read_outputs, read_stats
from distgen.decode import BatchDecoder
from distgen.records import PARTS_DIR, read_journals
from distgen.run import main as run_in_process


def test_failure_mid_job_keeps_finished_batches(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    args = [f"model={tiny_model_dir}", f"dataset={prompts_file}", "generation.batch_size=2",
            "generation.max_new_tokens=4"]
    complete = tmp_path / "complete"
    assert run_in_process([*args, f"output.dir={complete}"]) == 0
    want = {r["id"]: r for r in read_outputs(complete)}
    assert not (complete / PARTS_DIR).exists()
    total_steps = read_stats(complete)["ranks"][0]["forward_steps"]

    real_step, steps = BatchDecoder.step, []

    def step_then_fail(self, model):
        if len(steps) == total_steps - 1:
            raise RuntimeError("simulated crash")
        steps.append(1)
        real_step(self, model)

    monkeypatch.setattr(BatchDecoder, "step", step_then_fail)
    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_in_process([*args, f"output.dir={failed}"])
    kept = read_journals(failed)
    assert not (failed / "outputs.jsonl").exists()
    assert 2 <= len(kept) < len(want)
    assert all(record == want[record["id"]] for record in kept)
