"""Output shards, the streaming every-index-once check, the k-way merge and the report."""
import json
from html.parser import HTMLParser
from xml.etree import ElementTree

import numpy as np
import pytest

from distgen.common.errors import IncompleteOutputError
from distgen.outputs import shards
from distgen.outputs.records import MergeInfo
from distgen.outputs.report import render_report
from distgen.outputs.shards import (MERGE_FORMATS, ShardWriter, as_text, finish_outputs, list_shards, parquet_column,
                                    read_manifest, read_shard, start_outputs, write_shard)


def record(index):
    return {"index": index, "id": f"p{index}", "prompt_tokens": 3 + index % 4, "completion_tokens": 1 + index % 2}


def keys(count, changed=()):
    """Record keys for `count` prompts; those at `changed` differ (their prompt changed)."""
    return np.array([i + 1000 * (i in changed) for i in range(count)], dtype=np.int64)


def write_ranks(out, per_rank, fmt="jsonl", shard_size=3):
    for rank, indices in enumerate(per_rank):
        with ShardWriter(out, rank, fmt, shard_size) as writer:
            for index in indices:
                writer.append([record(index)])


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_shards_roll_over_sorted_and_merge_in_dataset_order(fmt, tmp_path):
    start_outputs(tmp_path, {"job": "job1"}, keys(10))
    write_ranks(tmp_path, [[6, 0, 4, 2, 9], [5, 1, 8, 3, 7]], fmt)
    names = [p.name for p in list_shards(tmp_path)]
    assert names == [f"part-0000{r}-0000{n}.{fmt}" for r in (0, 1) for n in (0, 1)]
    assert [r["index"] for r in read_shard(list_shards(tmp_path)[0])] == [0, 4, 6]
    coverage = finish_outputs(tmp_path, "job1", 10, fmt, merge=True, world_size=2)
    merged = [json.loads(line) for line in (tmp_path / "outputs.jsonl").read_text().splitlines()]
    assert merged == [record(i) for i in range(10)]
    manifest = read_manifest(tmp_path)
    assert manifest["complete"] and manifest["job"] == "job1" and sum(s["records"] for s in manifest["shards"]) == 10
    lengths = np.concatenate(coverage.prompt_tokens).tolist()
    assert sorted(lengths) == sorted(record(i)["prompt_tokens"] for i in range(10))


@pytest.mark.parametrize("per_rank, message", [
    ([[0], []], r"missing \[1\]"),
    ([[0, 1], [1]], r"repeated \[1\]"),
    ([[0, 1, 5]], r"out of range \[5\]"),
])
def test_missing_or_repeated_outputs_are_an_error(per_rank, message, tmp_path):
    start_outputs(tmp_path, {"job": "job"}, keys(2))
    write_ranks(tmp_path, per_rank)
    with pytest.raises(IncompleteOutputError, match=message):
        finish_outputs(tmp_path, "job", 2, "jsonl", merge=False, world_size=len(per_rank))


def test_restart_reads_open_shards_and_sets_changed_records_aside(tmp_path):
    """Issue 21: records whose prompt changed are set aside (previous-<time>/set-aside.jsonl), never removed."""
    start_outputs(tmp_path, {"job": "job"}, keys(3))
    writer = ShardWriter(tmp_path, 0, "jsonl", 10)
    writer.append([record(0), record(1)])
    writer.file.write('{"index": 2, "id": "p')  # a crash cut this line short
    writer.file.close()
    repairs = start_outputs(tmp_path, {"job": "job"}, keys(3))
    assert set(np.flatnonzero(repairs.finished)) == {0, 1} and repairs.torn == 1
    write_ranks(tmp_path, [[2]])  # the restart writes the next shard number
    assert finish_outputs(tmp_path, "job", 3, "jsonl", merge=False, world_size=1).shards[0]["records"] == 2
    repairs = start_outputs(tmp_path, {"job": "job"}, keys(3, changed=[1]))
    assert set(np.flatnonzero(repairs.finished)) == {0, 2} and repairs.aside == {"prompt changed or row deleted": 1}
    [aside] = tmp_path.glob("previous-*/set-aside.jsonl")
    assert [json.loads(line) for line in aside.read_text().splitlines()] == [
        {**record(1), "set_aside": "prompt changed or row deleted"}]


def test_report_is_valid_html_with_svg_charts():
    timeline = [{"t": t, "rss_mib": 300 + t, "cuda_mib": 0.0, "prompts": 10 * t, "generated_tokens": 40 * t,
                 "forward_steps": 5 * t, "idle_steps": 0} for t in range(5)]
    ranks = [{"rank": r, "forward_steps": 20, "idle_steps": 3 * r} for r in range(2)]
    page = render_report({"prompts": 40, "job": "<abc>"}, ranks, [timeline, timeline],
                         np.array([3, 5, 5, 9], np.int32), np.array([1, 2, 2, 2], np.int32))
    svgs = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "svg":
                svgs.append(tag)

    Collect().feed(page)
    assert len(svgs) == 5 and "&lt;abc&gt;" in page
    for chunk in page.split("<svg")[1:]:  # each chart is well-formed SVG
        ElementTree.fromstring("<svg" + chunk.split("</svg>")[0] + "</svg>")
    assert "Resident memory per rank" in page and "Completion length" in page


@pytest.mark.parametrize("values, kind", [
    (["a", None, "b"], "string"), ([1, 2], "int64"), ([1, "a"], "text"), ([1, 2.5], "text"),
    ([{"a": 1}, {"a": 2}], "struct<a: int64>"), ([{"a": 1}, {"b": 2}], "text"), ([{}, {}], "text"),
    ([[1, 2], [], None], "list<item: int64>"), ([[1, "x"]], "text"), ([None, None], "null"),
])
def test_a_parquet_column_holds_one_type_or_its_values_as_text(values, kind, tmp_path):
    records = [{"index": k, "value": v} for k, v in enumerate(values)]
    write_shard(records, tmp_path / "part-00000-00000.parquet")
    got = [r["value"] for r in read_shard(tmp_path / "part-00000-00000.parquet")]
    column = parquet_column(values)
    if kind == "text":
        assert str(column.type) == "string" and got == [as_text(v) for v in values]
        assert [json.loads(g) if g is not None and not isinstance(v, str) else g for g, v in zip(got, values)] == values
    else:
        assert str(column.type) == kind and json.dumps(got) == json.dumps(values)  # unchanged, types too


def test_coverage_counts_finish_reasons_and_the_commonest_errors(tmp_path):
    start_outputs(tmp_path, {"job": "job"}, keys(6))
    reasons = ["eos", "length", "error", "error", "error", "stop"]
    messages = {2: "prompt of 149 tokens exceeds the context of 128", 3: "prompt of 150 tokens exceeds the context of "
                                                                         "128", 4: "template failed"}
    with ShardWriter(tmp_path, 0, "jsonl", 10) as writer:
        writer.append([{**record(k), "finish_reason": r, **({"error": messages[k]} if k in messages else {})}
                       for k, r in enumerate(reasons)])
    coverage = finish_outputs(tmp_path, "job", 6, "jsonl", merge=False, world_size=1)
    assert coverage.finish_reasons == {"eos": 1, "length": 1, "error": 3, "stop": 1}
    assert coverage.errors.commonest() == [{"count": 2, "message": messages[2]}, {"count": 1, "message": messages[4]}]
    assert coverage.generated_tokens == sum(record(k)["completion_tokens"] for k in (0, 1, 5))


def test_merged_openai_lines_group_samples_of_one_request(tmp_path):
    records = [{"index": 0, "id": "a", "url": "/v1/completions", "completion": "x", "prompt_tokens": 3,
                "completion_tokens": 1, "finish_reason": "eos"},
               {"index": 1, "id": 2, "completion": "y", "prompt_tokens": 4, "completion_tokens": 2,
                "finish_reason": "length", "sample_index": 1},
               {"index": 1, "id": 2, "completion": "z", "prompt_tokens": 4, "completion_tokens": 1,
                "finish_reason": "stop", "sample_index": 0}]
    lines = list(MERGE_FORMATS.get("openai_batch")(iter(records), MergeInfo(model="m", job="j", chat=True, created=5)))
    assert [line["custom_id"] for line in lines] == ["a", "2"]
    text, chat = (line["response"]["body"] for line in lines)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "x"
    assert text["choices"][0]["finish_reason"] == "stop" and text["created"] == 5 and text["model"] == "m"
    assert chat["object"] == "chat.completion"
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in chat["choices"]] == [
        (0, "z", "stop"), (1, "y", "length")]
    assert chat["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


def test_a_start_cut_short_while_moving_records_never_files_one_under_another_prompt(tmp_path, monkeypatch):
    """Rows reordered: a start moves each finished record to its prompt's row, shard by shard, and writes the new
    keys last. Cut short between (a kill, a full disk), the next start read moved records against the old keys and
    filed them under the prompt now at their new row (p0's completion kept as p3's). Now their records are
    redone (set aside, never lost), and every record kept is its own prompt's."""
    start_outputs(tmp_path, {"job": "job"}, keys(4))
    write_ranks(tmp_path, [[0, 1], [2, 3]])
    reversed_keys = keys(4)[::-1].copy()  # the prompt of key k is now at row 3 - k
    real_write, written = shards.write_shard, []

    def cut_short(records, path):
        if written:
            raise OSError("killed")
        written.append(path)
        real_write(records, path)
    monkeypatch.setattr(shards, "write_shard", cut_short)
    with pytest.raises(OSError, match="killed"):
        start_outputs(tmp_path, {"job": "job"}, reversed_keys)
    monkeypatch.setattr(shards, "write_shard", real_write)
    repairs = start_outputs(tmp_path, {"job": "job"}, reversed_keys)
    kept = [r for path in list_shards(tmp_path) for r in read_shard(path)]
    assert all(r["id"] == f"p{3 - r['index']}" for r in kept), kept
    assert sorted(np.flatnonzero(repairs.finished).tolist()) == sorted(r["index"] for r in kept)
    aside = [json.loads(line)["id"] for path in tmp_path.glob("previous-*/set-aside.jsonl")
             for line in path.read_text().splitlines()]
    assert sorted([r["id"] for r in kept] + aside) == ["p0", "p1", "p2", "p3"]  # each finished record kept or aside
