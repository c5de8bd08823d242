"""Output records, and each rank's journal of them: finished batches reach disk as they finish,
so a job that fails later loses no finished completion."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from distgen.decode import Completion

PARTS_DIR = "parts"


def completion_record(completion: Completion, text: str) -> dict:
    return {
        "index": completion.prompt.index,
        "id": completion.prompt.id,
        "prompt": completion.prompt.text,
        "completion": text,
        "prompt_tokens": completion.prompt_token_count,
        "completion_tokens": len(completion.token_ids),
        "finish_reason": completion.finish_reason,
        "completion_token_ids": completion.token_ids,
    }


def journal_path(out_dir: Path, rank: int) -> Path:
    return out_dir / PARTS_DIR / f"rank-{rank:05d}.jsonl"


class RecordJournal:
    """Append-only JSON lines for one rank, flushed to disk after every batch."""

    def __init__(self, out_dir: Path, rank: int):
        path = journal_path(out_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", encoding="utf-8")

    def append(self, records: Sequence[dict]) -> None:
        self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "RecordJournal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_journals(out_dir: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((out_dir / PARTS_DIR).glob("rank-*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def remove_journals(out_dir: Path) -> None:
    shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)
