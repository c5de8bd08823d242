"""Reading what a job wrote: outputs.jsonl, stats.json, the records journaled in its shards."""
from __future__ import annotations

import json
from pathlib import Path


def read_outputs(out_dir: Path) -> list[dict]:
    # "\n" only: splitlines() would also split a completion holding \x85 or \u2028.
    return [json.loads(line) for line in (out_dir / "outputs.jsonl").read_text(encoding="utf-8").split("\n") if line]


def read_stats(out_dir: Path) -> dict:
    return json.loads((out_dir / "stats.json").read_text())


def journaled(out_dir: Path) -> list[dict]:
    """Records a run left in its output shards (open or full)."""
    from distgen.outputs.shards import list_shards, read_shard
    return [record for path in list_shards(out_dir) for record in read_shard(path)]
