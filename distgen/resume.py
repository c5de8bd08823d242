"""What an earlier run of the same job already finished, so a restart skips it.

A job is identified by a fingerprint of everything that decides its completions: the model
settings, the generation settings and the prompts themselves. Layout and launcher are left
out: they must not change a completion.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch.distributed as dist

from distgen.config import RunConfig
from distgen.coordinator import OUTPUTS_FILE, STATS_FILE
from distgen.prompts import Prompt
from distgen.records import read_journals, read_jsonl_lenient


def job_fingerprint(cfg: RunConfig, prompts: Sequence[Prompt]) -> str:
    content = {"model": asdict(cfg.model), "generation": asdict(cfg.generation),
               "prompts": [(p.id, p.text, p.max_new_tokens) for p in prompts]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def finished_outputs(out_dir: Path, fingerprint: str) -> list[dict]:
    """The records of a completed run of this same job in out_dir, if there is one."""
    try:
        stats = json.loads((out_dir / STATS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    if stats.get("summary", {}).get("job") != fingerprint or not (out_dir / OUTPUTS_FILE).is_file():
        return []
    return read_jsonl_lenient(out_dir / OUTPUTS_FILE)


def shared_skip(finished: dict[int, dict], is_coordinator: bool) -> frozenset[int]:
    """Rank 0's finished prompts, on every rank: all ranks must plan the same work even when
    their output folders are not one shared folder."""
    box = [sorted(finished) if is_coordinator else None]
    dist.broadcast_object_list(box, src=0)
    return frozenset(box[0])


def load_finished(out_dir: Path, fingerprint: str, prompts: Sequence[Prompt]) -> dict[int, dict]:
    """Finished records by prompt index, from a completed run's outputs and from journals."""
    found = [*finished_outputs(out_dir, fingerprint), *read_journals(out_dir, fingerprint)]
    return {r["index"]: r for r in found
            if isinstance(r.get("index"), int) and 0 <= r["index"] < len(prompts)
            and r.get("id") == prompts[r["index"]].id}
