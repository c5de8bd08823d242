"""100k short prompts on two ranks: every id exactly once, and rank memory stays flat while
the completions stream to the shards (nothing per prompt is kept in a rank)."""
import json

from conftest import journaled, read_stats, run_module

PROMPT_COUNT = 100_000
# How much higher a rank's resident memory may peak in the second half of its work than in the
# first (batches make it swing up and down by tens of MiB): a rank that kept its records, or
# held its whole share of prompts, would climb steadily instead.
GROWTH_LIMIT_MIB = 32


def test_100k_prompts_every_id_once_with_flat_rank_memory(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    with prompts.open("w") as out:
        for i in range(PROMPT_COUNT):
            out.write(json.dumps({"id": f"q{i}", "prompt": f"{i}" + "." * (i % 3)}) + "\n")
    out = tmp_path / "out"
    result = run_module("distgen.run", [f"model={tiny_model_dir}", f"dataset={prompts}", f"output.dir={out}",
                                        "generation.max_new_tokens=1", "generation.batch_size=1024",
                                        "output.merge=false", "output.sample_every_s=0.5",
                                        "output.shard_size=20000"], nproc=2, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    ids = [r["id"] for r in journaled(out)]
    assert len(ids) == PROMPT_COUNT and set(ids) == {f"q{i}" for i in range(PROMPT_COUNT)}
    assert not (out / "outputs.jsonl").exists()
    stats = read_stats(out)
    assert [s["prompts"] for s in stats["ranks"]] == [PROMPT_COUNT // 2] * 2
    for rank, timeline in enumerate(stats["timelines"]):
        working = [s["rss_mib"] for s in timeline if 0 < s["prompts"] < PROMPT_COUNT // 2]
        assert len(working) >= 4, timeline
        half = len(working) // 2
        growth = max(working[half:]) - max(working[:half])
        print(f"rank {rank}: rss first half max {max(working[:half]):.0f} MiB, second half max "
              f"{max(working[half:]):.0f} MiB, peak {stats['ranks'][rank]['peak_rss_mib']:.0f} MiB, "
              f"after load {stats['ranks'][rank]['load_peak_rss_mib']:.0f} MiB")
        assert growth < GROWTH_LIMIT_MIB, f"rank {rank} grew {growth:.0f} MiB: {working}"
    assert (out / "report.html").read_text().count("<svg") == 5
