"""Open a dataset of prompts as an Arrow table (memory-mapped, via the `datasets` library)
and turn its records into `Prompt`s on demand, a batch of indices at a time.

Nothing here holds the whole dataset in Python objects: a rank reads only the records it
asks for. Every format gives the same prompts as the same records in JSON lines.

A plain folder (one not written by `datasets.save_to_disk`) is read whole: every prompts file
under it, in the order of their relative paths sorted as text, whatever mix of formats; names
starting with '.' are left out, and any other file is an error naming it (nothing is dropped
without a word). Its files are never sorted into splits: `dataset.split` is for save_to_disk folders.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from distgen.config import DatasetConfig
from distgen.common.errors import ConfigError
from distgen.common.registry import Registry
from distgen.inputs.records import (BOM, GENERATED_ID_NOTE, ID_IS_INT, OVERRIDES, Prompt, RecordFields, check_utf8_line,
                                    has_id, parse_json_line, record_to_prompt)

# Never reach the Hub: every input is a local file or folder.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FILE_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt", ".csv": "csv", ".parquet": "parquet"}
# dataset.format -> the `datasets.load_dataset` builder that reads it (None: a folder, read by load_table).
DATASET_FORMATS: Registry[Optional[str]] = Registry(
    "dataset.format", valued=True, also={"auto": "from the path: a file by its suffix, a folder by its contents"})
for _name, _builder, _doc in (
        ("jsonl", "json", "JSON lines (.jsonl; .json holding JSON lines or one array)"),
        ("json", "json", "a JSON array of records (or JSON lines)"),
        ("txt", "text", "one prompt per line, blank lines skipped"),
        ("csv", "csv", "a CSV file with a header row"),
        ("parquet", "parquet", "a parquet file"),
        ("saved", None, "a folder written by datasets.save_to_disk (dataset.split picks a split)"),
        ("folder", None, "a local folder of prompt files, every one read, in path order")):
    DATASET_FORMATS.register(_name, None, _builder, doc=_doc)
TEXT_FORMATS = ("jsonl", "json", "txt", "csv")
TEXT_COLUMN = "text"
SAVED_MARKERS = ("state.json", "dataset_dict.json")
HASH_BATCH = 10_000
READ_BATCH = 1024
# Bumped when the normalized records' columns change, so that no cached table of the old form is reused.
NORMALIZED_VERSION = 3
# Per-record settings whose normalized column holds another form than the Prompt's (the rest: as they are):
# stop and stop_token_ids as lists, logit_bias as its JSON text (an Arrow struct would need one key set).
COLUMN_FORMS: dict[str, Callable] = {
    "stop": lambda stops: list(stops) or None,
    "stop_token_ids": lambda ids: None if ids is None else list(ids),
    "logit_bias": lambda pairs: None if pairs is None else json.dumps({str(token): bias for token, bias in pairs}),
}
# Normalized columns read back as JSON text (PromptSource.prompt_of).
JSON_COLUMNS = ("logit_bias",)


def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_dir():
        return "saved" if any((p / marker).is_file() for marker in SAVED_MARKERS) else "folder"
    return FILE_FORMATS.get(p.suffix.lower(), "txt")


def check_path(cfg: DatasetConfig, fmt: str) -> None:
    p = Path(cfg.path)
    wants_dir = fmt in ("saved", "folder")
    if not p.exists() or p.is_dir() != wants_dir:
        what = "dataset folder" if wants_dir else "file"
        raise ConfigError(f"dataset.path={cfg.path!r} is not a {what}; give a prompts file "
                          f"({', '.join(FILE_FORMATS)}) or a folder of them (or one saved with datasets.save_to_disk)")
    if p.suffix == ".py":
        raise ConfigError(f"dataset.path={cfg.path!r} is not allowed: dataset loading scripts are not supported "
                          "by the datasets library any more; give the data files or a save_to_disk folder")
    if fmt == "folder" and cfg.split != "train":
        raise ConfigError(f"dataset.split={cfg.split!r} is not allowed: dataset.path={cfg.path!r} is a plain folder, "
                          "whose files are all read (no splits); give the folder or file of that split, or a folder "
                          "written by datasets.save_to_disk")


def unreadable(path: str, err: OSError) -> ConfigError:
    return ConfigError(f"dataset.path: {path} cannot be read ({err.strerror or err}); check that it is a file this "
                       "user may read")


def text_content(path: str) -> bool:
    """Whether a text prompts file has a line that is not blank. It must be UTF-8 throughout, or the error
    names the first bad line and byte (streamed line by line, so any size; Arrow's readers would only
    raise a bare decode error)."""
    found = False
    try:
        with open(path, "rb") as lines:
            for line_no, raw in enumerate(lines, start=1):
                check_utf8_line(raw, path, line_no)
                found = found or bool(raw.removeprefix(BOM.encode()).strip())
    except OSError as err:
        raise unreadable(path, err) from None
    return found


def has_content(path: str, fmt: str) -> bool:
    """Text files: a line that is not blank (checked as UTF-8); others: readable (their rows are counted later)."""
    if fmt in TEXT_FORMATS:
        return text_content(path)
    try:
        with open(path, "rb"):
            return True
    except OSError as err:
        raise unreadable(path, err) from None


def check_file(path: str, fmt: str) -> None:
    if not has_content(path, fmt):
        what = "is empty" if os.path.getsize(path) == 0 else "holds only blank lines"
        raise ConfigError(f"dataset.path={path!r} holds no prompts: the file {what}")


def pick_split(loaded, split: str, path: str):
    from datasets import DatasetDict
    if not isinstance(loaded, DatasetDict):
        return loaded
    if split not in loaded:
        raise ConfigError(f"dataset.split={split!r} is not allowed: {path} has splits {', '.join(loaded)}")
    return loaded[split]


def normalize(record: dict, where: str, fields: RecordFields) -> dict:
    """A record checked and reduced to the fields distgen reads, in the columns `normalized_fields` names (the id
    as text, whether it was an integer, stop always a list), so that records whose columns mix types, or files
    of several formats, still make one Arrow table."""
    prompt = record_to_prompt(record, 0, where, fields, render=lambda m: "")
    given = has_id(record, fields)
    return {"id": str(prompt.id) if given else None, ID_IS_INT: isinstance(prompt.id, int) if given else None,
            "prompt": record.get(fields.prompt) if not fields.messages else None,
            "messages": json.dumps(record[fields.messages]) if fields.messages else None,
            **{k: COLUMN_FORMS.get(k, lambda v: v)(getattr(prompt, k)) for k in OVERRIDES}, "error": prompt.error}


def normalized_features():
    from datasets import Features, List, Value
    return Features({"id": Value("string"), ID_IS_INT: Value("bool"), "prompt": Value("string"),
                     "messages": Value("string"), "max_new_tokens": Value("int64"), "temperature": Value("float64"),
                     "top_p": Value("float64"), "top_k": Value("int64"), "seed": Value("uint64"),
                     "stop": List(Value("string")), "repetition_penalty": Value("float64"),
                     "presence_penalty": Value("float64"), "frequency_penalty": Value("float64"),
                     "min_p": Value("float64"), "min_tokens": Value("int64"), "stop_token_ids": List(Value("int64")),
                     "logit_bias": Value("string"), "ignore_eos": Value("bool"), "logprobs": Value("int64"),
                     "error": Value("string")})


def normalized_fields(fields: RecordFields) -> RecordFields:
    return RecordFields("prompt", "id", "messages" if fields.messages else None, error="error")


def jsonl_records(path: str, fields: RecordFields) -> Iterator[dict]:
    """Each line's record, normalized (a bad line is named by file:line)."""
    with open(path, encoding="utf-8-sig") as lines:
        for line_no, line in enumerate(lines, start=1):
            if line.strip():
                where = f"{path}:{line_no}"
                yield normalize(parse_json_line(line, where), where, fields)


def table_records(table, path: str, fields: RecordFields) -> Iterator[dict]:
    """Each row of a file's table, normalized (a bad row is named by file: record N, from 0)."""
    for start in range(0, len(table), READ_BATCH):
        batch = table[start:start + READ_BATCH]
        for k in range(len(next(iter(batch.values()), []))):
            yield normalize({key: values[k] for key, values in batch.items()}, f"{path}: record {start + k}", fields)


def files_fingerprint(paths: Sequence[str], fields: RecordFields) -> str:
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    return hashlib.sha256(f"{NORMALIZED_VERSION}:{stats}:{fields}".encode()).hexdigest()


def normalized_table(paths: Sequence[str], cache_dir: str, fields: RecordFields):
    """The files' records, normalized into one table (cached by the files' names, sizes and times)."""
    import datasets
    return datasets.Dataset.from_generator(
        folder_records, gen_kwargs={"paths": list(paths), "cache_dir": cache_dir, "fields": fields},
        features=normalized_features(), cache_dir=cache_dir,
        fingerprint=files_fingerprint(paths, fields)), normalized_fields(fields)


def folder_records(paths: Sequence[str], cache_dir: str, fields: RecordFields) -> Iterator[dict]:
    for path in paths:
        fmt = FILE_FORMATS[Path(path).suffix.lower()]
        if fmt == "jsonl":
            yield from jsonl_records(path, fields)
        else:
            table, file_fields = load_file(path, fmt, cache_dir, fields)
            yield from table_records(table, path, file_fields)


def load_jsonl(path: str, cache_dir: str, fields: RecordFields):
    """Arrow's JSON reader; when the records' columns do not fit one schema (or a line is bad),
    the line-by-line reader, which names file:line for a bad record."""
    import datasets
    from pyarrow.lib import ArrowInvalid
    try:
        return datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache_dir), fields
    except (ArrowInvalid, datasets.exceptions.DatasetGenerationError, ValueError, TypeError):
        return normalized_table([path], cache_dir, fields)


def load_file(path: str, fmt: str, cache_dir: str, fields: RecordFields):
    """One prompts file as (table, where its records keep their fields)."""
    import datasets
    if fmt in ("jsonl", "json"):
        return load_jsonl(path, cache_dir, fields)
    if fmt == "txt" and fields.messages:
        raise ConfigError(f"dataset.messages_field={fields.messages!r} is not allowed with {path}: a .txt file "
                          "holds plain prompts, one a line, not chat records")
    # A byte order mark is not part of the first prompt (the CSV reader drops it itself).
    options = {"encoding": "utf-8-sig"} if fmt == "txt" else {}
    table = datasets.load_dataset(DATASET_FORMATS.get(fmt), data_files=path, split="train", cache_dir=cache_dir, **options)
    if fmt == "txt":
        # Blank lines are not prompts.
        table = table.filter(lambda batch: [bool(t.strip()) for t in batch[TEXT_COLUMN]], batched=True)
        fields = RecordFields(TEXT_COLUMN, id="")
    return table, fields


def walk_files(root: Path) -> Iterator[Path]:
    """Every file under `root` (symlinks followed), leaving out names that start with '.'; a folder that
    cannot be listed is an error, never skipped."""
    def fail(err: OSError) -> None:
        raise unreadable(err.filename or str(root), err)
    for top, folders, names in os.walk(root, onerror=fail, followlinks=True):
        folders[:] = [f for f in folders if not f.startswith(".")]
        yield from (Path(top) / name for name in names if not name.startswith("."))


def folder_files(folder: str, cache_dir: str) -> list[Path]:
    """Every prompts file under `folder` (names starting with '.' left out), by relative path sorted as text;
    a ConfigError names the other files (they would be ignored) and the output folder inside it, if any."""
    root = Path(folder)
    if Path(cache_dir).absolute().is_relative_to(root.absolute()):
        raise ConfigError(f"dataset.path={folder!r} holds output.dir (whose outputs would be read as prompts on the "
                          "next run): put output.dir outside the dataset folder")
    visible = sorted(walk_files(root), key=lambda p: p.relative_to(root).as_posix())
    others = [p.relative_to(root).as_posix() for p in visible if p.suffix.lower() not in FILE_FORMATS]
    if others:
        more = f" and {len(others) - 10} more" if len(others) > 10 else ""
        raise ConfigError(f"dataset.path={folder!r} holds files that are not prompts files: {', '.join(others[:10])}"
                          f"{more}. Every file of a folder is read ({', '.join(FILE_FORMATS)}; names starting with "
                          "'.' are left out): move the others out, or give one file as dataset.path")
    files = [p for p in visible if has_content(str(p), FILE_FORMATS[p.suffix.lower()])]
    if not files:
        raise ConfigError(f"dataset.path={folder!r} holds no prompts: no non-empty file ({', '.join(FILE_FORMATS)}) "
                          "in it or its subfolders")
    return files


def same_columns(parts: list) -> bool:
    """Whether the files' tables can be concatenated as they are: the same fields in the same columns."""
    return len({(fields, repr(table.features)) for table, fields in parts}) == 1


def load_folder(folder: str, cache_dir: str, fields: RecordFields):
    """Every file of the folder in order, as one table: concatenated as read when they are all of one format
    with the same columns, else every record normalized (mixed formats, or columns that differ)."""
    import datasets
    paths = [str(p) for p in folder_files(folder, cache_dir)]
    formats = {FILE_FORMATS[Path(p).suffix.lower()] for p in paths}
    if len(formats) == 1:
        parts = [load_file(p, FILE_FORMATS[Path(p).suffix.lower()], cache_dir, fields) for p in paths]
        if same_columns(parts):
            return datasets.concatenate_datasets([table for table, _ in parts]), parts[0][1]
    return normalized_table(paths, cache_dir, fields)


def load_table(cfg: DatasetConfig, fmt: str, cache_dir: str, fields: RecordFields):
    import datasets
    if fmt == "saved":
        return pick_split(datasets.load_from_disk(cfg.path), cfg.split, cfg.path), fields
    if fmt == "folder":
        return load_folder(cfg.path, cache_dir, fields)
    check_file(cfg.path, fmt)
    return load_file(cfg.path, fmt, cache_dir, fields)


def config_error_in(err: BaseException) -> Optional[ConfigError]:
    while err is not None and not isinstance(err, ConfigError):
        err = err.__cause__ or err.__context__
    return err


def no_space_in(err: BaseException) -> Optional[OSError]:
    """A full disk (or quota) among the causes of `err` (the datasets library wraps what it raises)."""
    while err is not None and not (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)):
        err = err.__cause__ or err.__context__
    return err


def check_columns(table, fields: RecordFields, path: str) -> None:
    needed = fields.messages or fields.prompt
    if needed not in table.column_names:
        key = "dataset.messages_field" if fields.messages else "dataset.prompt_field"
        raise ConfigError(f"{key}={needed!r} is not allowed: {path} has columns {', '.join(table.column_names)}")


def bad_id(path: str, row: int, value, id_field: str) -> ConfigError:
    return ConfigError(f"{path}: record {row}: id {value!r} is not allowed: an id (dataset.id_field={id_field!r}) "
                       "is a string or an integer")


def first_false(mask) -> Optional[int]:
    """The first row where an Arrow boolean array is false (nulls are not), or None."""
    import pyarrow.compute as pc
    found = pc.index(pc.fill_null(mask, True), False).as_py()
    return None if found < 0 else found


def id_text(column, path: str, id_field: str):
    """The ids as text (null where a record has none): ids are unique by their text, so 3 and "3" are the same id.
    A value that is neither a string nor an integer is an error naming its row."""
    import pyarrow as pa
    import pyarrow.compute as pc
    kind = column.type
    if isinstance(kind, pa.BaseExtensionType):  # JSON values of mixed types: their JSON text
        text = column.storage
        row = first_false(pc.or_(pc.starts_with(text, '"'), pc.match_substring_regex(text, r"^-?[0-9]+$")))
        if row is not None:
            raise bad_id(path, row, json.loads(text[row].as_py()), id_field)
        return pc.if_else(pc.starts_with(text, '"'), pc.utf8_slice_codeunits(text, 1, -1), text)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return column
    if pa.types.is_floating(kind):  # integers in a column with gaps (CSV); NaN is a gap too
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, kind), column)
        row = first_false(pc.equal(pc.floor(column), column))
        if row is not None:
            raise bad_id(path, row, column[row].as_py(), id_field)
        return pc.cast(pc.cast(column, pa.int64()), pa.string())
    if pa.types.is_integer(kind):
        return pc.cast(column, pa.string())
    raise ConfigError(f"{path}: dataset.id_field={id_field!r} holds values of type {kind}: an id is a string or an "
                      "integer")


def check_unique_ids(table, fields: RecordFields, path: str) -> None:
    """Ids must be unique over the dataset, those records without one get (their row) included, checked
    in Arrow without Python objects per record."""
    if not fields.id or fields.id not in table.column_names:
        return  # every record gets its row
    import pyarrow as pa
    import pyarrow.compute as pc
    text = id_text(table.data.column(fields.id).combine_chunks(), path, fields.id)
    missing = pc.is_null(text)
    if text.null_count:
        rows = pc.cast(pa.array(np.arange(len(text), dtype=np.int64)), pa.string())
        text = pc.if_else(missing, rows, text)
    counts = pc.value_counts(text)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0].as_py()
        rows = np.flatnonzero(pc.equal(text, first["values"]).to_numpy(zero_copy_only=False))
        generated = any(missing[int(r)].as_py() for r in rows)
        raise ConfigError(f"{path}: id {first['values']!r} appears {first['counts']} times (records "
                          f"{', '.join(map(str, rows[:5]))}; {len(repeated)} ids repeat); dataset.id_field="
                          f"{fields.id!r} must be unique" + (f" ({GENERATED_ID_NOTE})" if generated else ""))


@dataclass
class PromptSource:
    """The job's records in dataset order: `len`, and `prompts(indices)` built on demand."""
    table: object  # datasets.Dataset, after shuffle_seed and limit
    fields: RecordFields
    path: str
    render: Optional[Callable[[list], str]] = None
    # Each index's row in the dataset before dataset.shuffle_seed (a record without an id gets its row);
    # None: the same as the index.
    rows: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.table)

    def row_of(self, index: int) -> int:
        return index if self.rows is None else int(self.rows[index])

    def prompts(self, indices: Sequence[int]) -> list[Prompt]:
        indices = [int(i) for i in indices]
        if not indices:
            return []
        columns = self.table[indices]
        keys = list(columns)
        return [self.prompt_of({k: columns[k][row] for k in keys}, index)
                for row, index in enumerate(indices)]

    def prompt_of(self, record: dict, index: int) -> Prompt:
        if self.fields.messages and isinstance(record.get(self.fields.messages), str):  # normalized records
            record = {**record, self.fields.messages: json.loads(record[self.fields.messages])}
        if self.fields.error is not None:  # normalized: settings kept as JSON text
            record = {**record, **{k: json.loads(record[k]) for k in JSON_COLUMNS if isinstance(record.get(k), str)}}
        return record_to_prompt(record, index, f"{self.path}: record {index}", self.fields, self.render,
                                row=self.row_of(index))

    def digest(self) -> str:
        """A hash of the records' content (not of file names or times), read a batch at a time."""
        digest = hashlib.sha256(json.dumps([self.fields.prompt, self.fields.id, self.fields.messages]).encode())
        arrow = self.table.with_format("arrow")
        for start in range(0, len(self), HASH_BATCH):
            batch = arrow[start:start + HASH_BATCH]
            digest.update(json.dumps(batch.to_pydict(), sort_keys=True, default=str).encode())
        return digest.hexdigest()[:16]


def chat_renderer(tokenizer, field: str) -> Callable[[list], str]:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"dataset.messages_field={field!r} is not allowed: the tokenizer has no chat template; "
                          "use dataset.prompt_field with plain prompts or a model whose tokenizer has one")

    def render(messages: list) -> str:
        return tokenizer.apply_chat_template([{k: v for k, v in m.items() if v is not None} for m in messages],
                                             tokenize=False, add_generation_prompt=True)
    return render


def open_prompts(cfg: DatasetConfig, cache_dir: str, tokenizer=None) -> PromptSource:
    """The dataset as a PromptSource; `tokenizer` (for chat templates) may be None when only checking."""
    fmt = detect_format(cfg.path, cfg.format)
    check_path(cfg, fmt)
    import datasets
    datasets.disable_progress_bars()
    # Its errors become ours below (naming file:line); its own ERROR lines would come first on stderr,
    # e.g. the JSON builder's log before the line-by-line reader takes over.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    fields = RecordFields(cfg.prompt_field, cfg.id_field, cfg.messages_field)
    try:
        table, fields = load_table(cfg, fmt, cache_dir, fields)
    except Exception as err:  # the datasets library raises many kinds (and wraps ours); name the input
        cause = config_error_in(err)
        if cause is not None:
            raise cause from None
        full = no_space_in(err)
        if full is not None:
            raise ConfigError(f"dataset.path={cfg.path!r}: its Arrow cache cannot be written to {cache_dir} "
                              f"({full.strerror}); free space under output.dir or give another output.dir") from None
        raise ConfigError(f"dataset.path={cfg.path!r} could not be read as {fmt}: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}") from None
    check_columns(table, fields, cfg.path)
    check_unique_ids(table, fields, cfg.path)
    rows = None
    if cfg.shuffle_seed is not None:
        rows = np.random.default_rng(cfg.shuffle_seed).permutation(len(table))  # the order Dataset.shuffle takes
        table = table.select(rows, keep_in_memory=True)
    if cfg.limit is not None and cfg.limit < len(table):
        table = table.select(range(cfg.limit))
        rows = None if rows is None else rows[:cfg.limit]
    if len(table) == 0:
        raise ConfigError(f"dataset.path={cfg.path!r} holds no prompts")
    render = chat_renderer(tokenizer, cfg.messages_field) if cfg.messages_field and tokenizer is not None else None
    if cfg.messages_field and tokenizer is None:
        render = lambda messages: ""  # noqa: E731 - checking records only
    return PromptSource(table, fields, cfg.path, render, rows)
