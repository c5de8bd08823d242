"""Output records, and each rank's journal of them: completions reach disk as they finish,
so a job that fails later loses no finished completion."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from distgen.engine.request import Completion

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


def journal_dir(out_dir: Path, job: str) -> Path:
    """One folder per job fingerprint, so runs of different jobs never mix their records."""
    return out_dir / PARTS_DIR / job


class RecordJournal:
    """Append-only JSON lines for one rank. Every append is flushed to the OS (a crashed process
    loses nothing); fsync, which guards against a crashed machine, runs at most every
    `fsync_every_s` so that it stays off the decode loop's critical path. Appending (not
    truncating) keeps what earlier attempts of the same job finished."""

    def __init__(self, out_dir: Path, job: str, rank: int, fsync_every_s: float = 1.0):
        path = journal_dir(out_dir, job) / f"rank-{rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")
        self.fsync_every_s = fsync_every_s
        self.last_fsync = time.monotonic()

    def append(self, records: Sequence[dict]) -> None:
        self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.file.flush()
        if time.monotonic() - self.last_fsync >= self.fsync_every_s:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.file.fileno())
        self.last_fsync = time.monotonic()

    def close(self) -> None:
        self.sync()
        self.file.close()

    def __enter__(self) -> "RecordJournal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl_lenient(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a line cut short by a crash is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_journals(out_dir: Path, job: str) -> list[dict]:
    return [record for path in sorted(journal_dir(out_dir, job).glob("rank-*.jsonl"))
            for record in read_jsonl_lenient(path)]


def remove_journals(out_dir: Path) -> None:
    shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)
