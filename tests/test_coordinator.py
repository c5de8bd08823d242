from distgen.common.files import write_atomic
from distgen.outputs.coordinator import format_table, summarize
from distgen.outputs.stats import RankStats


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
