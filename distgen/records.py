"""Output records, and each rank's journal of them: completions reach disk as they finish,
so a job that fails later loses no finished completion."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from distgen.engine.request import Completion
from distgen.prompts import Prompt

PARTS_DIR = "parts"
ERROR = "error"


@dataclass(frozen=True)
class OutputRecord:
    """One line of outputs.jsonl: a completion, or an error record for a prompt that could not run."""
    # which prompt
    index: int
    id: str
    prompt: str
    # what was generated
    completion: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "eos", "length" or "error"
    completion_token_ids: list[int] = field(default_factory=list)
    # why an error record has no completion; absent from other records' JSON
    error: Optional[str] = None

    def as_json(self) -> dict:
        record = asdict(self)
        if self.error is None:
            del record["error"]
        return record


def completion_record(completion: Completion, text: str) -> dict:
    return OutputRecord(completion.prompt.index, completion.prompt.id, completion.prompt.text, text,
                        completion.prompt_token_count, len(completion.token_ids), completion.finish_reason,
                        completion.token_ids).as_json()


def error_record(prompt: Prompt, reason: str, prompt_tokens: int = 0) -> dict:
    return OutputRecord(prompt.index, prompt.id, prompt.text, "", prompt_tokens, 0, ERROR, error=reason).as_json()


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
    # split on "\n" only: str.splitlines() also splits inside a completion at \x85 or \u2028,
    # which json.dumps(ensure_ascii=False) leaves unescaped.
    for line in path.read_text(encoding="utf-8").split("\n"):
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
