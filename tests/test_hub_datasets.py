"""Datasets by hub id (issue 23 item 1): `dataset=org/name` reads the dataset's snapshot in the Hugging Face cache
through huggingface_hub's own resolution, with the hub's split and subset layout; nothing is downloaded unless
allowed; a missing id, split or subset is a clear error before any worker starts."""
import gzip
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distgen.common.errors import ConfigError
from distgen.config import DatasetConfig
from distgen.inputs.source import resolve_hub_dataset
from distgen.run import main as run_in_process

COMMIT = "d5" + "0" * 38
SPLITS = {"train": [{"id": f"t{i}", "prompt": f"train prompt {i}"} for i in range(3)],
          "test": [{"id": f"x{i}", "prompt": f"test prompt number {i}"} for i in range(2)]}
SUBSETS_README = """---
configs:
- config_name: easy
  data_files:
  - split: train
    path: easy/train-*.parquet
- config_name: hard
  data_files:
  - split: train
    path: hard/train-*.parquet
---
# two subsets
"""


def fake_dataset_cache(cache, repo_id: str, files: dict[str, list[dict] | str], commit: str = COMMIT):
    """`files` (relative path -> records written as parquet, or text) laid out as huggingface_hub caches a
    download of dataset `repo_id` at `commit` (refs/main)."""
    repo = cache / ("datasets--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        path = snapshot / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            pq.write_table(pa.Table.from_pylist(content), path)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_dataset_cache(cache, "acme/prompts", {f"data/{split}-00000-of-00001.parquet": records
                                               for split, records in SPLITS.items()})
    fake_dataset_cache(cache, "acme/levels", {"README.md": SUBSETS_README,
                                              "easy/train-00000-of-00001.parquet": SPLITS["train"][:1],
                                              "hard/train-00000-of-00001.parquet": SPLITS["test"]})
    return cache


def outputs(folder):
    return [json.loads(line) for line in (folder / "outputs.jsonl").read_text().splitlines()]


def test_a_hub_dataset_runs_its_split_and_subset_from_the_cache(tiny_model_dir, hub_cache, tmp_path):
    args = [f"model={tiny_model_dir}", "generation.max_new_tokens=3"]
    assert run_in_process([*args, "dataset=acme/prompts", "dataset.split=test", f"output.dir={tmp_path / 'test'}"]) == 0
    got = outputs(tmp_path / "test")
    assert [r["id"] for r in got] == ["x0", "x1"] and [r["prompt"] for r in got] == [
        r["prompt"] for r in SPLITS["test"]]
    # the same tokens as the parquet file itself gives
    local = hub_cache / "datasets--acme--prompts" / "snapshots" / COMMIT / "data" / "test-00000-of-00001.parquet"
    assert run_in_process([*args, f"dataset={local}", f"output.dir={tmp_path / 'local'}"]) == 0
    assert [r["completion_token_ids"] for r in outputs(tmp_path / "local")] == [r["completion_token_ids"] for r in got]
    # stats.json names the dataset, its commit and split
    run = json.loads((tmp_path / "test" / "stats.json").read_text())["run"]
    assert run["dataset"]["path"] == "acme/prompts" and run["dataset"]["commit"] == COMMIT
    assert (run["dataset"]["format"], run["dataset"]["split"]) == ("hub", "test")
    assert run_in_process([*args, "dataset=acme/levels", "dataset.subset=hard", f"output.dir={tmp_path / 'hard'}"]) == 0
    assert [r["id"] for r in outputs(tmp_path / "hard")] == ["x0", "x1"]


@pytest.mark.parametrize("settings, message", [
    (["dataset=acme/not-cached"], r"dataset.path='acme/not-cached' is neither a file or folder here \(.*\) nor a "
                                  r"dataset in the Hugging Face cache \(.*hub\), and HF_HUB_OFFLINE is set; fetch it "
                                  r"with `hf download acme/not-cached --repo-type dataset`"),
    (["dataset=acme/prompts", "dataset.split=validation"],
     r"dataset.split='validation' is not allowed: acme/prompts has splits (train, test|test, train)"),
    (["dataset=acme/levels"], r"dataset.subset=None is not allowed: .* has subsets easy, hard; give dataset.subset="),
    (["dataset=acme/levels", "dataset.subset=medium"],
     r"dataset.subset='medium' is not allowed: acme/levels has subsets easy, hard"),
    (["dataset=acme/prompts", "dataset.subset=medium"],
     r"dataset.subset='medium' is not allowed: acme/prompts has no subsets \(give no dataset.subset\)"),
])
def test_hub_dataset_problems_stop_before_anything_starts(settings, message, tiny_model_dir, hub_cache, tmp_path,
                                                          capsys):
    out = tmp_path / "out"
    assert run_in_process([f"model={tiny_model_dir}", *settings, f"output.dir={out}"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not out.exists()


def test_hub_settings_on_a_local_file_are_refused(tmp_path):
    local = tmp_path / "p.jsonl"
    local.write_text('{"prompt": "hi"}\n')
    with pytest.raises(ConfigError, match=r"dataset.revision='v2' is not allowed: .* is a file or folder here"):
        resolve_hub_dataset(DatasetConfig(path=str(local), revision="v2"))
    with pytest.raises(ConfigError, match=r"dataset.subset='a' is not allowed: .* dataset.format='jsonl' reads a local"):
        resolve_hub_dataset(DatasetConfig(path="acme/prompts", format="jsonl", subset="a"))
    # a missing prompts file is not taken for a hub id: its own error comes later, naming the file
    assert resolve_hub_dataset(DatasetConfig(path="missing.jsonl")).path == "missing.jsonl"


def test_a_hub_datasets_json_text_that_reads_as_a_date_stays_its_text(tiny_model_dir, hub_cache, tmp_path):
    """A hub dataset of JSON-lines files is read by the datasets library's JSON builder, which made timestamps of
    ISO-looking text ("2024-01-02" came back "2024-01-02T00:00:00"): its split is then read line by line."""
    rows = [{"id": "2024-01-02", "prompt": "a", "day": "2024-01-02", "meta": {"at": "2024-01-02T03:04:05Z"}},
            {"id": "2024-01-03", "prompt": "b", "day": "2024-01-03", "meta": {"at": "x"}}]
    fake_dataset_cache(hub_cache, "acme/dated", {"train.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
                                                 "test.jsonl": json.dumps(rows[0]) + "\n"})
    out = tmp_path / "out"
    assert run_in_process([f"model={tiny_model_dir}", "generation.max_new_tokens=2", "dataset=acme/dated",
                           f"output.dir={out}"]) == 0
    assert [{k: r[k] for k in ("id", "day", "meta")} for r in outputs(out)] == [
        {k: row[k] for k in ("id", "day", "meta")} for row in rows]


def test_a_hub_datasets_compressed_json_text_that_reads_as_a_date_stays_its_text(tiny_model_dir, hub_cache,
                                                                                 tmp_path):
    """The JSON builder reads a hub dataset's compressed files too (train.jsonl.gz); read line by line for its
    date-looking text, they are decompressed as well (the line reader took .gz for an unknown format: 'could not
    be read as hub', where the same files without a date ran)."""
    rows = [{"id": "a", "prompt": "a", "day": "2024-01-02"}, {"id": "b", "prompt": "b", "day": "2024-01-03"}]
    snapshot = fake_dataset_cache(hub_cache, "acme/packed", {"README.md": "# one split, compressed\n"})
    (snapshot / "train.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    out = tmp_path / "out"
    assert run_in_process([f"model={tiny_model_dir}", "generation.max_new_tokens=2", "dataset=acme/packed",
                           f"output.dir={out}"]) == 0
    assert [(r["id"], r["day"]) for r in outputs(out)] == [("a", "2024-01-02"), ("b", "2024-01-03")]
