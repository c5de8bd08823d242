"""Output shards: each rank appends its completions to its own shard files as they finish,
so no rank ever holds more than one shard, and nothing is gathered.

    output.dir/outputs/part-RRRRR-NNNNN.open.jsonl  a rank's shard while it fills (its journal)
    output.dir/outputs/part-RRRRR-NNNNN.jsonl       a full shard, sorted by prompt index
    output.dir/outputs/part-RRRRR-NNNNN.parquet     (output.format=parquet)
    output.dir/outputs/manifest.json                the job fingerprint, and once complete every shard
    output.dir/outputs.jsonl                        optional (output.merge): a streaming k-way merge

The manifest names the job (its fingerprint) from the start, so a restart of the same job
keeps the shards as finished work, and a different job clears them first.
"""
from __future__ import annotations

import errno
import heapq
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from distgen.common.errors import IncompleteOutputError, OutputSpaceError
from distgen.common.registry import Registry

OUTPUTS_DIR = "outputs"
MANIFEST_FILE = "manifest.json"
MERGED_FILE = "outputs.jsonl"
OPEN_SUFFIX = ".open.jsonl"
SHARD_PATTERN = re.compile(r"^part-(\d{5})-(\d{5})(\.open\.jsonl|\.jsonl|\.parquet)$")
READ_BATCH = 1024
# output.format -> the full shards' file suffix (an open shard is always JSON lines).
OUTPUT_FORMATS: Registry[str] = Registry("output.format", valued=True)
OUTPUT_FORMATS.register("jsonl", None, ".jsonl", doc="JSON lines")
OUTPUT_FORMATS.register("parquet", None, ".parquet", doc="parquet (pyarrow)")
# A full file system, or the user's quota on it.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def outputs_dir(out_dir: Path) -> Path:
    return Path(out_dir) / OUTPUTS_DIR


def shard_name(rank: int, number: int, suffix: str) -> str:
    return f"part-{rank:05d}-{number:05d}{suffix}"


def list_shards(out_dir: Path) -> list[Path]:
    """Every shard file (open or full), in rank then number order."""
    folder = outputs_dir(out_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if SHARD_PATTERN.match(p.name))


def next_number(out_dir: Path, rank: int) -> int:
    numbers = [int(m.group(2)) for p in list_shards(out_dir) if (m := SHARD_PATTERN.match(p.name))
               and int(m.group(1)) == rank]
    return max(numbers, default=-1) + 1


def read_jsonl_lines(path: Path) -> Iterator[dict]:
    """Records of a JSON-lines file, streamed; a line cut short by a crash is skipped."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def read_shard(path: Path) -> Iterator[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH):
            yield from batch.to_pylist()
    else:
        yield from read_jsonl_lines(path)


def parquet_records(records: Sequence[dict]) -> list[dict]:
    """A parquet column holds one type: a shard whose ids mix strings and integers holds them as text."""
    if len({type(r.get("id")) for r in records}) > 1:
        return [{**r, "id": str(r["id"])} for r in records]
    return list(records)


def write_shard(records: Sequence[dict], path: Path) -> None:
    """Atomically: readers see no shard or the whole one."""
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(parquet_records(records)), tmp)
    else:
        with tmp.open("w", encoding="utf-8") as out:
            out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            out.flush()
            os.fsync(out.fileno())
    os.replace(tmp, path)


def close_shard(open_path: Path, fmt: str) -> Path:
    """An open shard as a full one: its records sorted by index (for the k-way merge), in `fmt`."""
    records = sorted(read_jsonl_lines(open_path), key=lambda r: r["index"])
    final = open_path.with_name(open_path.name[: -len(OPEN_SUFFIX)] + OUTPUT_FORMATS.get(fmt))
    write_shard(records, final)
    open_path.unlink()
    return final


def no_space(err: OSError, out_dir: Path, doing: str, kept: str) -> OutputSpaceError:
    """A full disk (`err.errno` in NO_SPACE) as an error naming output.dir, what was being written and what is kept."""
    return OutputSpaceError(err.errno, f"output.dir={str(out_dir)!r}: {os.strerror(err.errno).lower()} while "
                            f"{doing}. Kept: {kept}, in {outputs_dir(out_dir)} (a record the full disk cut short is "
                            "dropped). Free space (or quota) there and run the same command again: it resumes from "
                            "what is kept")


@contextmanager
def saying_no_space(out_dir: Path, doing: str, kept: str) -> Iterator[None]:
    """Inside the block, a full disk is an OutputSpaceError naming output.dir, what was being done and what is kept."""
    try:
        yield
    except OSError as err:
        if err.errno not in NO_SPACE or isinstance(err, OutputSpaceError):
            raise
        raise no_space(err, out_dir, doing, kept) from err


def writer_no_space(err: OSError, writer: "ShardWriter") -> OutputSpaceError:
    return no_space(err, writer.out_dir, f"rank {writer.rank} wrote {writer.open_path.name}",
                    f"what this rank wrote before (at least {writer.kept} records of this run) and earlier runs' records")


class ShardWriter:
    """One rank's completions, appended to its open shard as they finish. Every append is
    flushed to the OS (a crashed process loses nothing); fsync runs at most every
    `fsync_every_s`. A shard holding `shard_size` records is closed and the next one opened.
    A full disk is an `OutputSpaceError` saying what was kept."""

    def __init__(self, out_dir: Path, rank: int, fmt: str, shard_size: int, fsync_every_s: float = 1.0):
        self.out_dir, self.rank, self.fmt, self.shard_size = Path(out_dir), rank, fmt, shard_size
        outputs_dir(self.out_dir).mkdir(parents=True, exist_ok=True)
        self.number = next_number(self.out_dir, rank)
        self.fsync_every_s = fsync_every_s
        self.last_fsync = time.monotonic()
        self.file = None
        self.count = 0
        self.kept = 0  # records of this run flushed to the OS
        self.closed: list[Path] = []

    @property
    def open_path(self) -> Path:
        return outputs_dir(self.out_dir) / shard_name(self.rank, self.number, OPEN_SUFFIX)

    def append(self, records: Sequence[dict]) -> None:
        try:
            self.write(records)
        except OSError as err:
            if err.errno not in NO_SPACE:
                raise
            raise writer_no_space(err, self) from err

    def write(self, records: Sequence[dict]) -> None:
        for record in records:
            if self.file is None:
                self.file = self.open_path.open("a", encoding="utf-8")
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.count += 1
            if self.count >= self.shard_size:
                self.finish_shard()
        if self.file is not None:
            self.file.flush()
            if time.monotonic() - self.last_fsync >= self.fsync_every_s:
                self.sync()
        self.kept += len(records)

    def sync(self) -> None:
        os.fsync(self.file.fileno())
        self.last_fsync = time.monotonic()

    def finish_shard(self) -> None:
        self.file.flush()
        self.sync()
        self.file.close()
        self.closed.append(close_shard(self.open_path, self.fmt))
        self.file, self.count = None, 0
        self.number += 1

    def close(self) -> None:
        if self.file is not None:
            try:
                self.finish_shard()
            except OSError as err:
                if err.errno not in NO_SPACE:
                    raise
                raise writer_no_space(err, self) from err

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self.file is not None:  # a failed run leaves its open shard as the journal a restart reads
            try:
                self.sync()
                self.file.close()
            except OSError:  # a full disk: what could be written is there; the error in flight says so
                pass


def read_manifest(out_dir: Path) -> dict:
    try:
        return json.loads((outputs_dir(out_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def write_manifest(out_dir: Path, manifest: dict) -> None:
    from distgen.outputs.coordinator import write_atomic
    write_atomic(outputs_dir(out_dir) / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def job_complete(out_dir: Path, job: str) -> bool:
    """Whether out_dir already holds the finished, checked outputs of this same job."""
    manifest = read_manifest(out_dir)
    return manifest.get("job") == job and bool(manifest.get("complete"))


def start_outputs(out_dir: Path, job: str, resume: bool) -> set[int]:
    """Coordinator only, before any rank writes: the prompt indices this job already finished
    here (when resuming); shards of another job (or of this one, without resume) are removed."""
    out_dir = Path(out_dir)
    if not (resume and read_manifest(out_dir).get("job") == job):
        shutil.rmtree(outputs_dir(out_dir), ignore_errors=True)
        (out_dir / MERGED_FILE).unlink(missing_ok=True)
    outputs_dir(out_dir).mkdir(parents=True, exist_ok=True)
    finished = {r["index"] for path in list_shards(out_dir) for r in read_shard(path)
                if isinstance(r.get("index"), int)}
    write_manifest(out_dir, {"job": job, "complete": False})
    return finished


@dataclass
class Coverage:
    """What one streaming pass over the shards found: per-shard counts and the length histograms' data."""
    shards: list[dict] = field(default_factory=list)
    prompt_tokens: list[np.ndarray] = field(default_factory=list)
    completion_tokens: list[np.ndarray] = field(default_factory=list)


def check_coverage(out_dir: Path, shards: Sequence[Path], prompt_count: int) -> Coverage:
    """Raises unless every prompt index appears exactly once over all shards; reads one record at a time."""
    seen = np.zeros(prompt_count, dtype=np.uint8)
    unknown: list[int] = []
    coverage = Coverage()
    for path in shards:
        indices, prompt_tokens, completion_tokens = [], [], []
        for record in read_shard(path):
            indices.append(record["index"])
            prompt_tokens.append(record.get("prompt_tokens", 0))
            completion_tokens.append(record.get("completion_tokens", 0))
        index = np.asarray(indices, dtype=np.int64)
        inside = (index >= 0) & (index < prompt_count)
        unknown.extend(index[~inside][:20].tolist())
        np.add.at(seen, index[inside], 1)
        coverage.shards.append({"file": path.name, "records": len(indices),
                                "first_index": int(index.min()) if len(index) else None,
                                "last_index": int(index.max()) if len(index) else None})
        coverage.prompt_tokens.append(np.asarray(prompt_tokens, dtype=np.int32))
        coverage.completion_tokens.append(np.asarray(completion_tokens, dtype=np.int32))
    missing, repeated = np.flatnonzero(seen == 0), np.flatnonzero(seen > 1)
    if len(missing) or len(repeated) or unknown:
        raise IncompleteOutputError(
            f"outputs do not cover the {prompt_count} prompts once each: missing {missing[:20].tolist()}, "
            f"repeated {repeated[:20].tolist()}, out of range {unknown[:20]}")
    return coverage


def merge_shards(shards: Sequence[Path], target: Path) -> None:
    """outputs.jsonl in dataset order: each shard is sorted by index, so a k-way merge streams
    them with one record per shard in memory."""
    tmp = target.with_name(f".{target.name}.tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for record in heapq.merge(*(read_shard(p) for p in shards), key=lambda r: r["index"]):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)


def finish_outputs(out_dir: Path, job: str, prompt_count: int, fmt: str, merge: bool,
                   world_size: int) -> Coverage:
    """Coordinator only, once every rank closed its shards: close shards a crashed earlier run
    left open, check every index is there once, write the manifest and (optionally) merge."""
    out_dir = Path(out_dir)
    shards = [close_shard(p, fmt) if p.name.endswith(OPEN_SUFFIX) else p for p in list_shards(out_dir)]
    coverage = check_coverage(out_dir, shards, prompt_count)
    merged: Optional[str] = None
    if merge:
        merge_shards(shards, out_dir / MERGED_FILE)
        merged = MERGED_FILE
    write_manifest(out_dir, {"job": job, "complete": True, "format": fmt, "records": prompt_count,
                             "world_size": world_size, "merged": merged, "shards": coverage.shards})
    return coverage


def iter_outputs(out_dir: Path) -> Iterable[dict]:
    """Every record of a finished job, shard by shard (dataset order within a shard)."""
    for entry in read_manifest(out_dir).get("shards", []):
        yield from read_shard(outputs_dir(out_dir) / entry["file"])
