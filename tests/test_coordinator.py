import re
import socket

from distgen.catalog.load import config_to_dict, load_config
from distgen.engine.request import RequestFailed
from distgen.engine.stops import StopStrings
from distgen.common.hub import hub_commit
from distgen.common.files import write_atomic
from distgen.outputs.coordinator import format_table, summarize
from distgen.outputs.stats import RankStats
from distgen.run import main as run_in_process
from tests.helpers import fake_hub_cache, read_stats, write_prompts

def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "deep" / "out.jsonl"
    write_atomic(target, "old\n")
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n" and [p.name for p in target.parent.iterdir()] == ["out.jsonl"]


def test_summary_and_table():
    stats = [RankStats(r, "cpu", 2, 10, 40 * (r + 1), 5, 0, 1.0, 2.0 * (r + 1), 3.0, 250.0, 300.0, 0.0, 0.0)
             for r in range(2)]
    summary = summarize(stats, 4)
    assert summary["generated_tokens"] == 120 and summary["generate_seconds"] == 4.0
    assert summary["tokens_per_second"] == 30.0
    table = format_table(stats, summary).splitlines()
    assert table[0].split()[:3] == ["rank", "device", "prompts"] and len(table) == 4
    assert table[2].split()[:5] == ["1", "cpu", "2", "10", "80"]


def test_stats_and_report_say_what_produced_the_run_and_count_every_error(tiny_model_dir, tmp_path, monkeypatch):
    """Issue 23 item 7: the composed config, the model and its hub commit, the versions, device, host and date; the
    summary's errors count error records written while generating too, not only screening's."""
    commit = "c0ffee" + "0" * 34
    snapshot = fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", tiny_model_dir, commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    real_cut = StopStrings.cut

    def cut(self, prompt, token_ids):  # this record's tokens cannot be decoded: it fails while generated
        if prompt.id == "poison":
            raise RequestFailed("its tokens could not be decoded: boom")
        return real_cut(self, prompt, token_ids)

    monkeypatch.setattr(StopStrings, "cut", cut)
    prompts = [{"id": "ok", "prompt": "Hi"}, {"id": "poison", "prompt": "Hello"},
               {"id": "hot", "prompt": "x", "temperature": -1}, {"id": "cold", "prompt": "y", "temperature": -2}]
    out = tmp_path / "out"
    args = ["model=acme/tiny-llama", f"dataset={write_prompts(tmp_path / 'p.jsonl', prompts)}", f"output.dir={out}",
            "generation.max_new_tokens=2", "generation.eos_token_ids=[]", "output.print_table=false"]
    assert run_in_process(args) == 0
    stats = read_stats(out)
    summary, run = stats["summary"], stats["run"]
    assert summary["errors"] == 3 and summary["finish_reasons"] == {"error": 3, "length": 1}
    assert summary["commonest_errors"] == [
        {"count": 2, "message": "temperature=-1 is not allowed: must be 0 (greedy) or a finite number >= "
                                "1.1754943508222875e-38"},
        {"count": 1, "message": "its tokens could not be decoded: boom"}]
    assert run["config"] == config_to_dict(load_config(args))  # as --print-config prints it: the hub id
    assert run["config"]["model"]["path"] == "acme/tiny-llama"
    assert run["model"] == {"source": "pretrained", "path": "acme/tiny-llama", "folder": str(snapshot),
                            "commit": commit}
    assert set(run["versions"]) >= {"python", "distgen", "torch", "transformers"}
    assert run["hostname"] == socket.gethostname() and run["hosts"] == [socket.gethostname()]
    assert len(run["devices"]) == 1 and run["devices"][0].endswith("cores)")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", run["date"])
    page = (out / "report.html").read_text()
    for text in ("Records by finish reason", "Commonest errors", "its tokens could not be decoded: boom",
                 "model.commit", commit, "transformers version", "path: acme/tiny-llama", run["devices"][0]):
        assert text in page, text
    assert summary["prompts"] == 4


def test_hub_commit_is_read_from_a_cache_snapshot_folder(tmp_path):
    assert hub_commit(str(tmp_path / "models--a--b" / "snapshots" / "abc")) == "abc"
    assert hub_commit(str(tmp_path / "snapshots" / "abc")) is None and hub_commit(None) is None


def test_a_config_whose_text_holds_an_interpolation_sign_finishes_with_its_stats(tmp_path):
    """A stop string `${` (a JavaScript template literal) is text: the job writes stats.json and report.html with it,
    rather than generating everything and then failing at the end on OmegaConf's `no viable alternative at input
    '${'`."""
    out = tmp_path / "out"
    prompts = [{"id": k, "prompt": f"p{k}"} for k in range(3)]
    args = ["model=tiny", f"dataset={write_prompts(tmp_path / 'p.jsonl', prompts)}", f"output.dir={out}",
            "generation.max_new_tokens=2", "output.print_table=false", "generation.stop=['\\${','\\${x}']"]
    assert run_in_process(args) == 0
    stats = read_stats(out)
    assert stats["run"]["config"]["generation"]["stop"] == ["${", "${x}"] and stats["summary"]["records"] == 3
    assert "- \\${x}" in (out / "report.html").read_text()  # as --print-config prints it: a job file's text


def test_the_table_of_a_resumed_job_counts_the_runs_that_finished():
    stats = [RankStats(0, "cpu", 2, 10, 40, 5, 0, 1.0, 2.0, 3.0, 250.0, 300.0, 0.0, 0.0)]
    summary = {**summarize(stats, 2), "resumed": 4, "runs": 1}
    summary["this_run"] = {k: summary[k] for k in ("generated_tokens", "generate_seconds", "tokens_per_second")}
    assert "(4 done earlier; 1 run finished in all)" in format_table(stats, summary)
    assert "(4 done earlier; 2 runs finished in all)" in format_table(stats, {**summary, "runs": 2})
