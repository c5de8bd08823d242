"""Output shards: each rank appends its completions to its own shard files as they finish,
so no rank ever holds more than one shard, and nothing is gathered.

    output.dir/outputs/part-RRRRR-NNNNN.open.jsonl  a rank's shard while it fills (its journal)
    output.dir/outputs/part-RRRRR-NNNNN.jsonl       a full shard, sorted by prompt index
    output.dir/outputs/part-RRRRR-NNNNN.parquet     (output.format=parquet)
    output.dir/outputs/manifest.json                the job (distgen/outputs/folder.py), and once complete every shard
    output.dir/outputs/record-keys.npy              each prompt's record key as of the last start
    output.dir/outputs.jsonl                        optional (output.merge): a streaming k-way merge, as distgen
                                                    records or OpenAI batch output lines (output.merge_format)

A start (rank 0, holding the lock, before any rank writes) reads the shards a crashed or earlier
run left: a record is finished when the key its prompt had (record-keys.npy at its index) is the key of a
prompt of the dataset now (at that index, or another: it moves there), its sample_index is one of that
prompt's n (distgen/outputs/samples.py) and no other record holds that place; torn lines (a crash
mid-line) are dropped and redone, a second record of an (index, sample_index) is a duplicate (two jobs wrote), and records of changed or vanished prompts are set aside into
output.dir/previous-<time>/set-aside.jsonl, never deleted. The start says what it repaired.
"""
from __future__ import annotations

import errno
import hashlib
import heapq
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from distgen.common.errors import IncompleteOutputError, OutputSpaceError
from distgen.common.files import atomic_file, write_atomic
from distgen.common.registry import Registry
from distgen.outputs.openai_batch import batch_output_lines
from distgen.outputs.records import ERROR, OPTIONAL_FIELDS, OWN_FIELDS, MergeInfo, renamed_columns
from distgen.outputs.samples import SampleTable, record_order, sample_of
from distgen.outputs.stats import ErrorTally
from distgen.outputs.folder import (MANIFEST_VERSION, MERGED_FILE, claimed_files, outputs_dir, previous_folder,
                                    read_manifest, write_manifest)

KEYS_FILE = "record-keys.npy"
SET_ASIDE_FILE = "set-aside.jsonl"
OPEN_SUFFIX = ".open.jsonl"
SHARD_PATTERN = re.compile(r"^part-(\d{5})-(\d{5})(\.open\.jsonl|\.jsonl|\.parquet)$")
READ_BATCH = 1024
# output.format -> the full shards' file suffix (an open shard is always JSON lines).
OUTPUT_FORMATS: Registry[str] = Registry("output.format", valued=True)
OUTPUT_FORMATS.register("jsonl", None, ".jsonl", doc="JSON lines")
OUTPUT_FORMATS.register("parquet", None, ".parquet", doc="parquet (pyarrow)")
# output.merge_format -> outputs.jsonl's lines, made from the records in dataset order.
MERGE_FORMATS: Registry[Callable[[Iterable[dict], MergeInfo], Iterable[dict]]] = Registry(
    "output.merge_format", valued=True,
    also={"auto": "openai_batch when the dataset is an OpenAI batch file (dataset.format=openai_batch), else distgen"})
MERGE_FORMATS.register("distgen", None, lambda records, info: records, doc="distgen's records, as the shards hold them")
MERGE_FORMATS.register("openai_batch", None, batch_output_lines,
                       doc="OpenAI batch output lines (id, custom_id, response, error), one per request")
# A full file system, or the user's quota on it.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


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


def read_jsonl_lines(path: Path, torn: Optional[list[int]] = None) -> Iterator[dict]:
    """Records of a JSON-lines file, streamed; a line cut short by a crash (or two writers' lines run
    together) is skipped, and its line number appended to `torn`."""
    with path.open(encoding="utf-8", errors="replace", newline="\n") as lines:
        for line_no, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and type(record.get("index")) is int:
                yield record
            elif line.strip() and torn is not None:
                torn.append(line_no)


def read_shard(path: Path, torn: Optional[list[int]] = None) -> Iterator[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH):
            # a column holds every record's value: an optional key (records.OPTIONAL_FIELDS) unset is left out again
            yield from ({k: v for k, v in row.items() if v is not None or k not in OPTIONAL_FIELDS}
                        for row in batch.to_pylist())
    else:
        yield from read_jsonl_lines(path, torn)


def merge_format(name: str, dataset_format: str) -> str:
    """output.merge_format, with auto resolved for this dataset's format."""
    if name != "auto":
        return name
    return "openai_batch" if dataset_format == "openai_batch" else "distgen"


SCALARS = (str, int, float, bool)


def one_scalar_type(values: Sequence[Any]) -> bool:
    """Whether the values (nulls aside) are all of one plain type, or all lists of ints (token ids): Arrow holds
    those as they are."""
    kinds = {type(v) for v in values if v is not None}
    if len(kinds) != 1:
        return not kinds
    kind = next(iter(kinds))
    return kind in SCALARS or kind is list and all(type(x) is int for v in values if v is not None for x in v)


def empty_struct(kind) -> bool:
    """Parquet cannot hold a struct without fields (the type of `{}`), at any depth."""
    import pyarrow as pa
    if pa.types.is_struct(kind):
        return kind.num_fields == 0 or any(empty_struct(kind.field(k).type) for k in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return empty_struct(kind.value_type)
    return False


def as_text(value: Any) -> Optional[str]:
    return value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def parquet_column(values: list):
    """One column of a parquet shard. A parquet column holds one type: values that have one (as Arrow reads them
    back unchanged) are stored as they are; a column whose values do not (strings and integers, as ids may mix;
    integers and floats; objects with other keys) holds each as text: a string as itself, any other value as its
    JSON."""
    import pyarrow as pa
    try:
        column = pa.array(values)
        if not empty_struct(column.type) and (one_scalar_type(values) or json.dumps(
                column.to_pylist(), sort_keys=True) == json.dumps(values, sort_keys=True)):
            return column
    except (pa.ArrowException, OverflowError, ValueError, TypeError):
        pass
    return pa.array([as_text(v) for v in values], pa.string())


def parquet_table(records: Sequence[dict]):
    """The records as one table: a column per field any record holds (null where one lacks it)."""
    import pyarrow as pa
    names = list(dict.fromkeys(name for record in records for name in record))
    return pa.table({name: parquet_column([record.get(name) for record in records]) for name in names})


def write_shard(records: Sequence[dict], path: Path) -> None:
    """Atomically: readers see no shard or the whole one."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        with atomic_file(path, "wb") as out:
            pq.write_table(parquet_table(records), out)
    else:
        write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def close_shard(open_path: Path, fmt: str) -> Path:
    """An open shard as a full one: its records sorted by index and sample (for the k-way merge), in `fmt`."""
    records = sorted(read_jsonl_lines(open_path), key=record_order)
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

    @contextmanager
    def saying_no_space(self) -> Iterator[None]:
        """Inside the block, a full disk is an OutputSpaceError naming the shard and what this rank kept."""
        try:
            yield
        except OSError as err:
            if err.errno not in NO_SPACE:
                raise
            raise writer_no_space(err, self) from err

    def append(self, records: Sequence[dict]) -> None:
        with self.saying_no_space():
            self.write(records)

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
            with self.saying_no_space():
                self.finish_shard()

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


def job_complete(out_dir: Path, job: str) -> bool:
    """Whether out_dir already holds the finished, checked outputs of this same job (settings and dataset), its
    outputs.jsonl (where it merged one) as the merge wrote it."""
    manifest = read_manifest(out_dir)
    return manifest.get("job") == job and bool(manifest.get("complete")) and merged_damage(out_dir, manifest) is None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def merged_damage(out_dir: Path, manifest: dict) -> Optional[str]:
    """How the merged outputs.jsonl differs from what the merge wrote (its size and sha256 in the manifest), or None
    (none merged; or a manifest of an earlier distgen, which kept neither: the file present)."""
    if not manifest.get("merged"):
        return None
    path = Path(out_dir) / MERGED_FILE
    if not path.is_file():
        return "missing"
    size, want = path.stat().st_size, manifest.get("merged_bytes")
    if want is not None and size != want:
        return f"{size} bytes, not the {want} the merge wrote"
    digest = manifest.get("merged_sha256")
    if digest is not None and file_sha256(path) != digest:
        return "not what the merge wrote (another sha256)"
    return None


def unapplied_output_settings(out_dir: Path, fmt: str, merge: bool, form: str) -> list[str]:
    """The output settings of this run that a finished job's outputs were not written with (`key: then -> now`):
    a finished job is not written again, so they do not apply."""
    manifest = read_manifest(out_dir)
    then = {"output.format": manifest.get("format", fmt), "output.merge": manifest.get("merged") is not None}
    now = {"output.format": fmt, "output.merge": merge}
    if merge and then["output.merge"]:
        then["output.merge_format"], now["output.merge_format"] = manifest.get("merge_format") or form, form
    said = lambda value: str(value).lower() if isinstance(value, bool) else value  # noqa: E731  (as YAML says it)
    return [f"{key}: {said(then[key])} -> {said(now[key])}" for key in now if then[key] != now[key]]


def read_keys(out_dir: Path) -> Optional[np.ndarray]:
    """The record keys the last start wrote (int64, one per prompt index), or None."""
    try:
        keys = np.load(outputs_dir(out_dir) / KEYS_FILE)
    except (OSError, ValueError):
        return None
    return keys if keys.ndim == 1 and keys.dtype == np.int64 else None


def write_keys(out_dir: Path, keys: np.ndarray) -> None:
    with atomic_file(outputs_dir(out_dir) / KEYS_FILE, "wb") as out:
        np.save(out, np.asarray(keys, dtype=np.int64))


class SetAside:
    """Records taken out of the job, each with why, appended to output.dir/previous-<time>/set-aside.jsonl
    (made on first use): nothing a run finished is deleted."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path: Optional[Path] = None
        self.file = None

    def add(self, record: dict, reason: str) -> None:
        if self.file is None:
            self.path = previous_folder(self.out_dir) / SET_ASIDE_FILE
            self.file = self.path.open("w", encoding="utf-8")
        self.file.write(json.dumps({**record, "set_aside": reason}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None


# Why a record found at a start is not part of the job (it is set aside).
# CHANGED: its index is in the dataset's range but holds another prompt, and no row has its prompt (record key): a
# key alone does not say whether that prompt changed (it runs again) or its row was deleted (rows after it moved up).
DUPLICATE, CHANGED, GONE, UNVERIFIED, EXTRA = ("duplicate", "prompt changed or row deleted",
                                               "prompt no longer in the dataset",
                                               "no record key to check it against", "sample_index beyond its n")


@dataclass
class Repairs:
    """What a start found in the shards: the finished records (a bool per (index, sample_index), placed by the
    job's SampleTable), and what it dropped or set aside."""
    finished: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    torn: int = 0  # lines cut short (a crash mid-line, or two writers' lines run together): redone
    aside: dict[str, int] = field(default_factory=dict)  # reason -> records set aside
    changed_ids: list[str] = field(default_factory=list)  # the first ids whose prompt changed
    moved: int = 0  # finished records whose prompt is now at another index (rows reordered, inserted, deleted)
    aside_path: Optional[Path] = None
    # how a finished job's outputs.jsonl differs from what its merge wrote (merged_damage), and whether this run
    # merges it again
    merged_damage: Optional[str] = None
    merges: bool = False

    def note(self, record: dict, reason: str) -> None:
        self.aside[reason] = self.aside.get(reason, 0) + 1
        if reason == CHANGED and len(self.changed_ids) < 5:
            self.changed_ids.append(str(record.get("id")))

    def messages(self) -> list[str]:
        lines = [f"repaired: {self.torn} torn line(s) dropped (those prompts run again)"] if self.torn else []
        if self.aside.get(DUPLICATE):
            lines.append(f"repaired: {self.aside[DUPLICATE]} duplicate record(s) of one index (two jobs wrote) "
                         "taken out of the job")
        if self.moved:
            lines.append(f"{self.moved} finished record(s) found at another row of the dataset (rows reordered, "
                         "inserted or deleted): kept, at their rows now")
        if self.aside.get(CHANGED):
            lines.append(f"{self.aside[CHANGED]} earlier record(s) match no prompt of the dataset now (ids "
                         f"{', '.join(map(repr, self.changed_ids))}{', ...' if self.aside[CHANGED] > 5 else ''}): "
                         "its prompt changed (text, per-record settings or kept columns: a changed prompt runs again) "
                         "or its row was deleted")
        if self.aside.get(GONE):
            lines.append(f"{self.aside[GONE]} record(s) of prompts no longer in the dataset are not part of the job")
        if self.aside.get(EXTRA):
            lines.append(f"{self.aside[EXTRA]} record(s) with a sample_index beyond their prompt's n are not part of "
                         "the job")
        if self.aside.get(UNVERIFIED):
            lines.append(f"{self.aside[UNVERIFIED]} record(s) without a record key to check them run again")
        if self.merged_damage is not None:
            lines.append(f"the finished job's {MERGED_FILE} is {self.merged_damage}: " + (
                "merging it again from the shards" if self.merges else
                "left as it is: this run does not merge (output.merge=false)"))
        if self.aside_path is not None:
            lines.append(f"set aside {sum(self.aside.values())} record(s) into {self.aside_path}")
        return lines


def verdict(record: dict, old_key: Optional[int], keys: np.ndarray, seen: np.ndarray,
            samples: SampleTable) -> Optional[str]:
    """None when the record is finished work of this job; else why it is not. `old_key`: the key its prompt had
    when it was written (None where the last start wrote none for its index)."""
    index = record["index"]
    if not 0 <= index < len(keys):
        return GONE
    if old_key is None:
        return UNVERIFIED
    if old_key != keys[index]:
        return CHANGED
    place = samples.position(index, sample_of(record))
    if place is None:
        return EXTRA
    return DUPLICATE if seen[place] else None


def keyed_positions(keys: np.ndarray) -> dict[int, int]:
    """Each record key of this dataset -> its index (a key is unique: it holds the record's id)."""
    return {int(key): index for index, key in enumerate(keys.tolist())}


def column_names(names: Sequence[str]) -> list[str]:
    """The output names of the input columns `names` (renamed where they clash: distgen/outputs/records.py)."""
    renamed = renamed_columns(names)
    return [renamed.get(name, name) for name in names]


def reshaped(record: dict, columns: Optional[Sequence[str]]) -> dict:
    """A kept record with the columns a record of the dataset now has (`columns`: their output names, in order; None:
    each record keeps its own fields), as a run now would write it: a column it lacks null (a JSON-lines file where
    one record gained a field gives every record that field, null), one the dataset no longer has left out where it
    is null (its record key counts no null column, so it is the same prompt); a value is never dropped."""
    if columns is None:
        return record
    own = {name: value for name, value in record.items() if name in OWN_FIELDS}
    others = {name: value for name, value in record.items() if name not in OWN_FIELDS and name not in columns
              and value is not None}
    return {**own, **{name: record.get(name) for name in columns}, **others}


def placed(record: dict, stored: Optional[np.ndarray], positions: dict[int, int]) -> tuple[dict, Optional[int]]:
    """The record at its prompt's index in this dataset, and the key it was written for: a prompt with the same key
    (same id, text and settings) at another index (rows reordered, inserted or deleted before it) keeps its record."""
    index = record["index"]
    if stored is None or not 0 <= index < len(stored):
        return record, None
    old_key = int(stored[index])
    now = positions.get(old_key, index)
    return ({**record, "index": now} if now != index else record), old_key


def repair_shard(path: Path, fmt: str, keys: np.ndarray, stored: Optional[np.ndarray], seen: np.ndarray,
                 repairs: Repairs, aside: SetAside, samples: SampleTable, positions: dict[int, int],
                 columns: Optional[Sequence[str]] = None) -> None:
    """Keep the shard's finished records (at their prompts' indices now, with the dataset's columns now:
    `reshaped`); an open shard (a crashed run's journal) is closed, and a full one rewritten only when it lost,
    moved or reshaped records."""
    torn: list[int] = []
    kept, dropped, moved, changed = [], 0, 0, 0
    for written in read_shard(path, torn):
        record, old_key = placed(written, stored, positions)
        reason = verdict(record, old_key, keys, seen, samples)
        if reason is None:
            seen[samples.position(record["index"], sample_of(record))] = True
            moved += record is not written
            shaped = reshaped(record, columns)
            changed += list(shaped.items()) != list(record.items())
            kept.append(shaped)
        else:
            repairs.note(written, reason)
            aside.add(written, reason)
            dropped += 1
    repairs.torn += len(torn)
    repairs.moved += moved
    is_open = path.name.endswith(OPEN_SUFFIX)
    if is_open or torn or dropped or moved or changed:
        target = path.with_name(path.name[: -len(OPEN_SUFFIX)] + f".{fmt}") if is_open else path
        if moved:  # its records' indices are the new keys' now: the old ones must not be read against them
            (path.parent / KEYS_FILE).unlink(missing_ok=True)  # (a start cut short: its records redone, not misfiled)
        if kept or not is_open:
            write_shard(sorted(kept, key=record_order), target)
        if is_open:
            path.unlink()


def start_outputs(out_dir: Path, job: dict, keys: np.ndarray, fmt: str = "jsonl",
                  samples: Optional[SampleTable] = None, columns: Optional[Sequence[str]] = None) -> Repairs:
    """Coordinator only, holding the lock, before any rank writes: the records already finished here (their
    keys match `keys`, this dataset's; `samples`: each prompt's n, default 1), with torn lines and duplicates
    repaired and records that are no longer part of the job set aside. `job` is the manifest's start: the job
    fingerprint, its settings and dataset digest, and the top-level files this run will write. `columns`: the
    input columns the dataset's records keep now (PromptSource.kept_names; None: each its own fields): a kept
    record gets them as a record written now would (`reshaped`), so a resumed job's records equal an
    uninterrupted run's."""
    out_dir = Path(out_dir)
    earlier = read_manifest(out_dir)
    stored = read_keys(out_dir)
    keys = np.asarray(keys, dtype=np.int64)
    samples = samples if samples is not None else SampleTable.ones(len(keys))
    repairs, aside = Repairs(), SetAside(out_dir)
    seen = np.zeros(samples.total, dtype=bool)
    positions = keyed_positions(keys)
    names = None if columns is None else column_names(columns)
    try:
        for path in list_shards(out_dir):
            repair_shard(path, fmt, keys, stored, seen, repairs, aside, samples, positions, names)
    finally:
        aside.close()
    repairs.finished, repairs.aside_path = seen, aside.path
    if earlier.get("complete") and earlier.get("job") == job.get("job"):
        repairs.merged_damage = merged_damage(out_dir, earlier)
        repairs.merges = MERGED_FILE in job.get("files", [])
    claimed = sorted(claimed_files(earlier) | set(job.get("files", [])))
    write_manifest(out_dir, {"distgen_manifest": MANIFEST_VERSION, **job, "files": claimed, "keys": KEYS_FILE,
                             "complete": False, "runs": earlier.get("runs", [])})
    write_keys(out_dir, keys)  # after the manifest: outputs/ never holds a file of ours without one
    return repairs


@dataclass
class Coverage:
    """What one streaming pass over the shards found: per-shard counts, the length histograms' data, the
    whole job's tokens as the ranks count them (completion records; error records generate nothing), its
    records by finish reason and its commonest errors."""
    shards: list[dict] = field(default_factory=list)
    prompt_tokens: list[np.ndarray] = field(default_factory=list)
    completion_tokens: list[np.ndarray] = field(default_factory=list)
    completion_prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    errors: ErrorTally = field(default_factory=ErrorTally)

    def count(self, record: dict) -> None:
        reason = str(record.get("finish_reason"))
        self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1
        if reason == ERROR:
            self.errors.add(str(record.get("error") or ""))
        else:
            self.completion_prompt_tokens += record.get("prompt_tokens", 0)
            self.generated_tokens += record.get("completion_tokens", 0)


def check_coverage(out_dir: Path, shards: Sequence[Path], prompt_count: int,
                   samples: Optional[SampleTable] = None) -> Coverage:
    """Raises unless every (prompt index, sample_index) appears exactly once over all shards (`samples`: each
    prompt's n, default 1); reads one record at a time."""
    samples = samples if samples is not None else SampleTable.ones(prompt_count)
    seen = np.zeros(samples.total, dtype=np.uint8)
    unknown: list = []
    coverage = Coverage()
    for path in shards:
        indices, prompt_tokens, completion_tokens = [], [], []
        for record in read_shard(path):
            indices.append(record["index"])
            place = samples.position(record["index"], sample_of(record))
            if place is None:
                if len(unknown) < 20:
                    unknown.append(record["index"] if samples.single else (record["index"], sample_of(record)))
            else:
                seen[place] += 1
            prompt_tokens.append(record.get("prompt_tokens", 0))
            completion_tokens.append(record.get("completion_tokens", 0))
            coverage.count(record)
        index = np.asarray(indices, dtype=np.int64)
        coverage.shards.append({"file": path.name, "records": len(indices),
                                "first_index": int(index.min()) if len(index) else None,
                                "last_index": int(index.max()) if len(index) else None})
        coverage.prompt_tokens.append(np.asarray(prompt_tokens, dtype=np.int32))
        coverage.completion_tokens.append(np.asarray(completion_tokens, dtype=np.int32))
    missing, repeated = np.flatnonzero(seen == 0), np.flatnonzero(seen > 1)
    if len(missing) or len(repeated) or unknown:
        what = f"{prompt_count} prompts once each" if samples.single else \
            f"{samples.total} records of {prompt_count} prompts once each (index, sample_index)"
        raise IncompleteOutputError(
            f"outputs do not cover the {what}: missing {samples.names(missing[:20])}, "
            f"repeated {samples.names(repeated[:20])}, out of range {unknown[:20]}")
    return coverage


def merge_shards(shards: Sequence[Path], target: Path, form: str = "distgen",
                 info: MergeInfo = MergeInfo()) -> tuple[int, str]:
    """outputs.jsonl in dataset order (a prompt's samples by sample_index), in `form` (MERGE_FORMATS): each shard
    is sorted so, so a k-way merge streams them with one record per shard in memory. Its size and sha256."""
    digest, size = hashlib.sha256(), 0
    with atomic_file(target, "wb") as out:
        records = heapq.merge(*(read_shard(p) for p in shards), key=record_order)
        for line in MERGE_FORMATS.get(form)(records, info):
            data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
            out.write(data)
            digest.update(data)
            size += len(data)
    return size, digest.hexdigest()


def finish_outputs(out_dir: Path, job: str, prompt_count: int, fmt: str, merge: bool,
                   world_size: int, run: Optional[dict] = None, form: str = "distgen",
                   info: MergeInfo = MergeInfo(), samples: Optional[SampleTable] = None) -> Coverage:
    """Coordinator only, once every rank closed its shards: close shards left open, check every
    (index, sample_index) is there once, write the manifest (with this run's figures `run` added to the
    earlier runs') and (optionally) merge, in `form` (output.merge_format, resolved)."""
    out_dir = Path(out_dir)
    samples = samples if samples is not None else SampleTable.ones(prompt_count)
    shards = [close_shard(p, fmt) if p.name.endswith(OPEN_SUFFIX) else p for p in list_shards(out_dir)]
    coverage = check_coverage(out_dir, shards, prompt_count, samples)
    started = read_manifest(out_dir)
    merged: Optional[str] = None
    written: dict[str, Any] = {"merged_bytes": None, "merged_sha256": None}
    if merge:
        written["merged_bytes"], written["merged_sha256"] = merge_shards(shards, out_dir / MERGED_FILE, form, info)
        merged = MERGED_FILE
    files = sorted(claimed_files(started) | ({MERGED_FILE} if merged else set()))
    write_manifest(out_dir, {**started, "job": job, "files": files, "complete": True, "format": fmt,
                             "records": samples.total, "world_size": world_size, "merged": merged,
                             "merge_format": form if merged else None,
                             **written,
                             "runs": started.get("runs", []) + ([run] if run else []), "shards": coverage.shards})
    return coverage
