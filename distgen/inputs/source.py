"""Open a dataset of prompts as an Arrow table (memory-mapped, via the `datasets` library)
and turn its records into `Prompt`s on demand, a batch of indices at a time.

Nothing here holds the whole dataset in Python objects: a rank reads only the records it
asks for. Every format gives the same prompts as the same records in JSON lines.

A record's other columns (all of them, or those output.columns names; not its id, nor its prompt
field, which are `id` and `prompt`) go with its Prompt to its output record, as the reader typed them.
An OpenAI batch file (dataset.format=openai_batch, or a .jsonl whose first line has custom_id and body)
is read request by request (distgen/inputs/openai_batch.py).

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
import re
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from distgen.config import DatasetConfig
from distgen.common.errors import ConfigError
from distgen.common.hub import hub_name, names_hub_id, snapshot
from distgen.common.registry import Registry
from distgen.inputs.openai_batch import batch_request
from distgen.inputs.records import (BOM, CHAT_KWARGS, EXACT_FLOAT_INTS, GENERATED_ID_NOTE, ID_IS_INT, OVERRIDES,
                                    Prompt, RecordFields, Render, check_utf8_line, has_id, is_chat, json_array_records,
                                    json_value, parse_json_line, record_to_prompt)

# The datasets library never reaches the Hub: every input is a local file or folder (a hub dataset is first
# resolved to its snapshot folder in the HF cache by huggingface_hub: resolve_hub_dataset).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# A prompts file's suffix -> its format (catalog/load.py also reads a `dataset=<x.jsonl>` value as a path by them).
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
        ("folder", None, "a local folder of prompt files, every one read, in path order"),
        ("openai_batch", None, "an OpenAI batch file (JSON lines of custom_id, method, url, body); "
                               "outputs.jsonl then holds OpenAI batch output lines"),
        ("hub", None, "a Hugging Face hub dataset (dataset=org/name) from the local HF cache: its splits and "
                      "subsets as the hub lays them out (dataset.split, dataset.subset, dataset.revision)")):
    DATASET_FORMATS.register(_name, None, _builder, doc=_doc)
TEXT_FORMATS = ("jsonl", "json", "txt", "csv")
TEXT_COLUMN = "text"
SAVED_MARKERS = ("state.json", "dataset_dict.json")
HASH_BATCH = 10_000
READ_BATCH = 1024
# Bumped when the normalized records' columns change, so that no cached table of the old form is reused.
NORMALIZED_VERSION = 7
# Per-record settings whose normalized column holds another form than the Prompt's (the rest: as they are):
# stop, stop_token_ids and choice as lists, logit_bias as its JSON text (an Arrow struct would need one key set; a
# json_schema is its JSON text already).
COLUMN_FORMS: dict[str, Callable] = {
    "stop": lambda stops: list(stops) or None,
    "stop_token_ids": lambda ids: None if ids is None else list(ids),
    "choice": lambda choices: None if choices is None else list(choices),
    "logit_bias": lambda pairs: None if pairs is None else json.dumps({str(token): bias for token, bias in pairs}),
}
# Normalized columns read back as JSON text (PromptSource.prompt_of).
JSON_COLUMNS = ("logit_bias", CHAT_KWARGS, "json_schema")
# A normalized record's column: its other fields (the input columns it keeps), a JSON object as text.
COLUMNS = "columns"
# pandas' index, which it writes into parquet files: not a column of the data.
INDEX_COLUMN = re.compile(r"^__index_level_\d+__$")
# Where an OpenAI batch file keeps a request's fields, once normalized.
OPENAI_FIELDS = RecordFields("prompt", "id", "messages", mixed=True)


def first_line(path: str) -> str:
    """The first line that is not blank (read line by line), or ""; "" too when it cannot be read (checked later)."""
    try:
        with open(path, encoding="utf-8-sig") as lines:
            return next((line for line in lines if line.strip()), "")
    except (OSError, UnicodeDecodeError):
        return ""


def is_openai_batch(path: str) -> bool:
    """Whether a JSON-lines file's first record is an OpenAI batch request (custom_id and body)."""
    try:
        record = json.loads(first_line(path))
    except ValueError:
        return False
    return isinstance(record, dict) and "custom_id" in record and "body" in record


def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_dir():
        return "saved" if any((p / marker).is_file() for marker in SAVED_MARKERS) else "folder"
    found = FILE_FORMATS.get(p.suffix.lower(), "txt")
    return "openai_batch" if found == "jsonl" and p.is_file() and is_openai_batch(path) else found


def resolve_hub_dataset(cfg: DatasetConfig) -> DatasetConfig:
    """dataset.path as a local path: a value that is not a file or folder here, has no prompts-file suffix and reads
    as a hub id (`org/name`) becomes its snapshot folder in the Hugging Face cache, read as format `hub`."""
    value = cfg.path
    local = None
    if not value or Path(value).exists():
        local = f"dataset.path={value!r} is a file or folder here"
    elif not names_hub_id(value) or Path(value).suffix.lower() in FILE_FORMATS:
        local = f"dataset.path={value!r} is not a hub id (org/name)"
    elif cfg.format not in ("auto", "hub"):
        local = f"dataset.format={cfg.format!r} reads a local file or folder"
    if local is not None:
        if cfg.revision is not None or cfg.subset is not None:
            key, given = ("dataset.revision", cfg.revision) if cfg.revision is not None else ("dataset.subset", cfg.subset)
            raise ConfigError(f"{key}={given!r} is not allowed: it picks a hub dataset's version or subset, and {local}")
        return cfg
    return replace(cfg, path=snapshot("dataset.path", value, cfg.revision, cfg.allow_download, "dataset"),
                   format="hub")


def check_path(cfg: DatasetConfig, fmt: str) -> None:
    p = Path(cfg.path)
    wants_dir = fmt in ("saved", "folder", "hub")
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


def text_content(path: str, needed: int = 1) -> bool:
    """Whether a text prompts file has `needed` lines that are not blank (a CSV: its header and a row). It must
    be UTF-8 throughout, or the error names the first bad line and byte (streamed line by line, so any size;
    Arrow's readers would only raise a bare decode error)."""
    found = 0
    try:
        with open(path, "rb") as lines:
            for line_no, raw in enumerate(lines, start=1):
                check_utf8_line(raw, path, line_no)
                found += bool(raw.removeprefix(BOM.encode()).strip())
    except OSError as err:
        raise unreadable(path, err) from None
    return found >= needed


def has_content(path: str, fmt: str) -> bool:
    """Text files: a line that is not blank (a CSV: a row below its header; checked as UTF-8); others: readable
    (their rows are counted later)."""
    if fmt in TEXT_FORMATS:
        return text_content(path, 2 if fmt == "csv" else 1)
    try:
        with open(path, "rb"):
            return True
    except OSError as err:
        raise unreadable(path, err) from None


def check_file(path: str, fmt: str) -> None:
    if not has_content(path, fmt):
        what = ("is empty" if os.path.getsize(path) == 0 else "holds only its header line" if fmt == "csv"
                and text_content(path) else "holds only blank lines")
        raise ConfigError(f"dataset.path={path!r} holds no prompts: the file {what}")


def pick_split(loaded, split: str, path: str):
    from datasets import DatasetDict
    if not isinstance(loaded, DatasetDict):
        return loaded
    if split not in loaded:
        raise ConfigError(f"dataset.split={split!r} is not allowed: {path} has splits {', '.join(loaded)}")
    return loaded[split]


def own_fields(record: dict, fields: RecordFields) -> set[str]:
    """The fields a record's id and prompt come from; the others are its columns (a chat record's messages too)."""
    return {fields.id} | (set() if is_chat(record, fields) else {fields.prompt})


def other_columns(record: dict, fields: RecordFields) -> dict:
    """The record's fields besides its id and prompt (pandas' index column left out): its input columns."""
    skip = own_fields(record, fields)
    return {key: value for key, value in record.items() if key not in skip and not INDEX_COLUMN.match(key)}


def json_columns(columns: dict, where: str) -> str:
    return json.dumps({key: json_value(value, where, key) for key, value in columns.items()})


def normalize(record: dict, where: str, fields: RecordFields, columns: Optional[dict] = None,
              error: Optional[str] = None) -> dict:
    """A record checked and reduced to the fields distgen reads, in the columns `normalized_fields` names (the id
    as text, whether it was an integer, stop always a list, the record's other fields as JSON text), so that records
    whose columns mix types, or files of several formats, still make one Arrow table. `columns`: the record's
    columns (default: its other fields); `error`: why it cannot run, found before (an OpenAI batch request)."""
    prompt = record_to_prompt(record, 0, where, fields, render=lambda messages, kwargs: "")
    given, chat = has_id(record, fields), is_chat(record, fields)
    if columns is None:
        columns = other_columns(record, fields)
    kwargs = record.get(CHAT_KWARGS) if chat else None
    return {"id": str(prompt.id) if given else None, ID_IS_INT: isinstance(prompt.id, int) if given else None,
            "prompt": record.get(fields.prompt) if not chat else None,
            "messages": json.dumps(record[fields.messages]) if chat else None,
            CHAT_KWARGS: json.dumps(kwargs) if isinstance(kwargs, dict) else None,
            **{k: COLUMN_FORMS.get(k, lambda v: v)(getattr(prompt, k)) for k in OVERRIDES},
            "error": error or prompt.error, COLUMNS: json_columns(columns, where)}


def normalized_features():
    from datasets import Features, List, Value
    return Features({"id": Value("string"), ID_IS_INT: Value("bool"), "prompt": Value("string"),
                     "messages": Value("string"), CHAT_KWARGS: Value("string"), "max_new_tokens": Value("int64"),
                     "temperature": Value("float64"), "top_p": Value("float64"), "top_k": Value("int64"),
                     "seed": Value("uint64"), "n": Value("int64"), "stop": List(Value("string")),
                     "repetition_penalty": Value("float64"), "presence_penalty": Value("float64"),
                     "frequency_penalty": Value("float64"), "min_p": Value("float64"), "min_tokens": Value("int64"),
                     "stop_token_ids": List(Value("int64")), "logit_bias": Value("string"),
                     "ignore_eos": Value("bool"), "logprobs": Value("int64"),
                     "prompt_logprobs": Value("int64"), "lora": Value("string"),
                     "json_schema": Value("string"), "regex": Value("string"), "choice": List(Value("string")),
                     "error": Value("string"), COLUMNS: Value("string")})


def normalized_fields(fields: RecordFields) -> RecordFields:
    return RecordFields("prompt", "id", "messages" if fields.messages else None, error="error", mixed=fields.mixed)


def jsonl_records(path: str, fields: RecordFields) -> Iterator[dict]:
    """Each record, normalized, a bad one named by file:line: a line of JSON lines, or an element of a file that
    holds one JSON array (read whole: Arrow could not); compressed where its name says so (train.jsonl.gz)."""
    with open_text(path) as lines:
        first = next((line for line in lines if line.strip()), "")
        if first.lstrip().startswith("["):
            lines.seek(0)
            for line_no, element in json_array_records(lines.read(), path):
                yield normalize(element, f"{path}:{line_no}", fields)
            return
        lines.seek(0)
        for line_no, line in enumerate(lines, start=1):
            if line.strip():
                where = f"{path}:{line_no}"
                yield normalize(parse_json_line(line, where), where, fields)


def open_text(path: str):
    """A text file, decompressed where its name ends in a compression's suffix (.gz, .bz2, .xz, .zst), as the
    datasets JSON builder reads a hub dataset's files."""
    import fsspec
    return fsspec.open(path, "rt", encoding="utf-8-sig", compression="infer")


def json_records(paths: Sequence[str], cache_dir: str, fields: RecordFields) -> Iterator[dict]:
    """Each record of JSON or JSON-lines files whatever their suffix (a hub dataset's split: train.jsonl.gz)."""
    for path in paths:
        yield from jsonl_records(path, fields)


def table_records(table, path: str, fields: RecordFields) -> Iterator[dict]:
    """Each row of a file's table, normalized (a bad row is named by file: record N, from 0)."""
    for start in range(0, len(table), READ_BATCH):
        batch = table[start:start + READ_BATCH]
        for k in range(len(next(iter(batch.values()), []))):
            yield normalize({key: values[k] for key, values in batch.items()}, f"{path}: record {start + k}", fields)


def openai_records(paths: Sequence[str], cache_dir: str, fields: RecordFields) -> Iterator[dict]:
    """Each request of an OpenAI batch file as a normalized record (a request distgen cannot run as asked: an
    error record for its custom_id; a line that is not a request: a ConfigError naming file:line)."""
    for path in paths:
        with open(path, encoding="utf-8-sig") as lines:
            for line_no, line in enumerate(lines, start=1):
                if line.strip():
                    where = f"{path}:{line_no}"
                    record, columns, error = batch_request(parse_json_line(line, where), where)
                    yield normalize(record, where, fields, columns, error)


def files_fingerprint(paths: Sequence[str], fields: RecordFields, reader: str = "") -> str:
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    return hashlib.sha256(f"{NORMALIZED_VERSION}:{stats}:{fields}:{reader}".encode()).hexdigest()


def normalized_table(paths: Sequence[str], cache_dir: str, fields: RecordFields, reader: Optional[Callable] = None):
    """The files' records, normalized into one table (cached by the files' names, sizes and times); `reader`
    (default folder_records) yields them."""
    import datasets
    reader = reader or folder_records
    return datasets.Dataset.from_generator(
        reader, gen_kwargs={"paths": list(paths), "cache_dir": cache_dir, "fields": fields},
        features=normalized_features(), cache_dir=cache_dir,
        fingerprint=files_fingerprint(paths, fields, reader.__name__)), normalized_fields(fields)


def folder_records(paths: Sequence[str], cache_dir: str, fields: RecordFields) -> Iterator[dict]:
    for path in paths:
        fmt = FILE_FORMATS[Path(path).suffix.lower()]
        if fmt == "jsonl":
            yield from jsonl_records(path, fields)
        else:
            table, file_fields = load_file(path, fmt, cache_dir, fields)
            yield from table_records(table, path, file_fields)


def settings_need_lines(table) -> bool:
    """Whether a per-record setting that holds numbers (or booleans) came out of Arrow's JSON reader as text or
    JSON (a number beside a string in one column, where the reader turns Infinity and NaN into nulls), or as
    floats with a NaN in them (written in the file: JSON has null for a gap): the line-by-line reader keeps each
    value, and a NaN, as written, gets its record an error record."""
    import pyarrow.compute as pc
    from datasets import Value
    wanted = normalized_features()
    for key in OVERRIDES:
        if not (isinstance(wanted[key], Value) and wanted[key].dtype != "string" and key in table.features):
            continue
        got = table.features[key]
        if not (isinstance(got, Value) and got.dtype != "string"):
            return True
        if got.dtype.startswith("float") and pc.any(pc.is_nan(table.data.column(key))).as_py():
            return True
    return False


def load_jsonl(path: str, cache_dir: str, fields: RecordFields):
    """Arrow's JSON reader; when the records' columns do not fit one schema (or a line is bad, or a numeric
    setting's column mixes types), the line-by-line reader, which keeps each value and names file:line for a
    bad record."""
    import datasets
    from pyarrow.lib import ArrowInvalid
    try:
        table = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache_dir)
    except (ArrowInvalid, datasets.exceptions.DatasetGenerationError, ValueError, TypeError):
        return normalized_table([path], cache_dir, fields)
    lines = settings_need_lines(table) or times_inferred(table.data.schema)
    return normalized_table([path], cache_dir, fields) if lines else (table, fields)


def times_inferred(schema) -> bool:
    """Whether Arrow's JSON reader made a date or time of some text, at any depth (JSON has no such type: the text
    "2024-01-02" would come back "2024-01-02T00:00:00", a zone dropped): the line-by-line reader keeps the text."""
    import pyarrow as pa

    def holds_time(kind) -> bool:
        if pa.types.is_timestamp(kind) or pa.types.is_date(kind) or pa.types.is_time(kind):
            return True
        if pa.types.is_struct(kind):
            return any(holds_time(kind.field(k).type) for k in range(kind.num_fields))
        return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and holds_time(kind.value_type)
    return any(holds_time(field.type) for field in schema)


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
    if fmt == "hub":
        table, builder = load_hub(cfg, cache_dir)
        if builder.name == "json" and times_inferred(table.data.schema):  # its JSON files' text, line by line
            return normalized_table([str(p) for p in builder.config.data_files[cfg.split]], cache_dir, fields,
                                    json_records)
        return table, fields
    if fmt == "folder":
        return load_folder(cfg.path, cache_dir, fields)
    if fmt == "openai_batch":
        check_file(cfg.path, "jsonl")
        return normalized_table([cfg.path], cache_dir, OPENAI_FIELDS, openai_records)
    check_file(cfg.path, fmt)
    return load_file(cfg.path, fmt, cache_dir, fields)


def load_hub(cfg: DatasetConfig, cache_dir: str):
    """A hub dataset's snapshot folder as the datasets library reads a hub repository (its README's configs, or
    its files' split names), dataset.subset and dataset.split picked by name: the builder resolved once (again
    only to name the subsets when it cannot be built with dataset.subset). (the split's table, the builder)"""
    import datasets
    from datasets.utils.info_utils import is_small_dataset
    name = hub_name(cfg.path) or cfg.path  # the id the user gave, not the snapshot folder
    try:
        builder = datasets.load_dataset_builder(cfg.path, cfg.subset, cache_dir=cache_dir)
        subsets = list(builder.builder_configs) or [builder.config.name]
    except ValueError:  # a subset it does not have, or none where it has several: the checks below say which
        builder, subsets = None, hub_subsets(cfg.path)
    named = [s for s in subsets if s != "default"]
    if cfg.subset is not None and cfg.subset not in subsets:
        has = f"has subsets {', '.join(subsets)}" if named else "has no subsets (give no dataset.subset)"
        raise ConfigError(f"dataset.subset={cfg.subset!r} is not allowed: {name} {has}")
    if cfg.subset is None and len(subsets) > 1 and "default" not in subsets:
        raise ConfigError(f"dataset.subset=None is not allowed: {name} has subsets {', '.join(subsets)}; "
                          "give dataset.subset=<one of them>")
    if builder is None:
        builder = datasets.load_dataset_builder(cfg.path, cfg.subset, cache_dir=cache_dir)
    # The README's split list, else the data files' (what the builder's split generators read).
    splits = list(builder.info.splits or builder.config.data_files or {})
    if cfg.split not in splits:
        raise ConfigError(f"dataset.split={cfg.split!r} is not allowed: {name} has splits {', '.join(splits)}")
    builder.download_and_prepare()  # as datasets.load_dataset does with this builder
    return builder.as_dataset(split=cfg.split, in_memory=is_small_dataset(builder.info.dataset_size)), builder


def hub_subsets(path: str) -> list[str]:
    """The hub dataset's subsets (README configs), none where it names none."""
    import datasets
    try:
        return datasets.get_dataset_config_names(path)
    except Exception:  # no README configs: one default subset
        return []


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
        hint = ("; a column of chat messages: give dataset.messages_field=messages"
                if not fields.messages and "messages" in table.column_names else "")
        raise ConfigError(f"{key}={needed!r} is not allowed: {path} has columns {', '.join(table.column_names)}"
                          f"{hint}")


def bad_id(path: str, row: int, value, id_field: str) -> ConfigError:
    return ConfigError(f"{path}: record {row}: id {value!r} is not allowed: an id (dataset.id_field={id_field!r}) "
                       "is a string or an integer (one read as a float, as in a column with gaps, below 2**53)")


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
        exact = pc.less(pc.abs(column), pa.scalar(float(EXACT_FLOAT_INTS), kind))  # past it, not the file's integer
        row = first_false(pc.and_(pc.equal(pc.floor(column), column), exact))
        if row is not None:
            raise bad_id(path, row, column[row].as_py(), id_field)
        return pc.cast(pc.cast(column, pa.int64()), pa.string())
    if pa.types.is_integer(kind):
        return pc.cast(column, pa.string())
    raise ConfigError(f"{path}: dataset.id_field={id_field!r} holds values of type {kind}: an id is a string or an "
                      "integer")


def check_unique_ids(table, fields: RecordFields, path: str, key: str = "") -> None:
    """Ids must be unique over the dataset, those records without one get (their row) included, checked
    in Arrow without Python objects per record. `key`: what the ids are, for the message."""
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
                          f"{', '.join(map(str, rows[:5]))}; {len(repeated)} ids repeat); "
                          f"{key or f'dataset.id_field={fields.id!r}'} must be unique"
                          + (f" ({GENERATED_ID_NOTE})" if generated else ""))


def json_type(kind) -> bool:
    """Whether an Arrow type's values read as JSON values (strings, numbers, booleans, null, lists and structs of
    them, JSON text the datasets library decodes)."""
    import pyarrow as pa
    if isinstance(kind, pa.BaseExtensionType):
        return "json" in str(kind)
    if pa.types.is_dictionary(kind):
        return json_type(kind.value_type)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return json_type(kind.value_type)
    if pa.types.is_struct(kind):
        return all(json_type(kind.field(k).type) for k in range(kind.num_fields))
    return any(test(kind) for test in (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer,
                                       pa.types.is_floating, pa.types.is_boolean, pa.types.is_null))


@dataclass
class PromptSource:
    """The job's records in dataset order: `len`, and `prompts(indices)` built on demand."""
    table: object  # datasets.Dataset, after shuffle_seed and limit
    fields: RecordFields
    path: str
    render: Optional[Render] = None
    # Each index's row in the dataset before dataset.shuffle_seed (a record without an id gets its row);
    # None: the same as the index.
    rows: Optional[np.ndarray] = None
    # The input columns each record keeps for its output record (output.columns); None: all of them.
    keep: Optional[tuple[str, ...]] = None
    # The dataset's format, as detected (dataset.format=auto).
    format: str = "jsonl"

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
        where = f"{self.path}: record {index}"
        return record_to_prompt(record, index, where, self.fields, self.render, row=self.row_of(index),
                                columns=self.columns_of(record, where))

    def kept_names(self) -> Optional[list[str]]:
        """The input columns the records keep, where the table names them (a normalized table's records each
        keep their own fields: None)."""
        if self.keep is not None:
            return list(self.keep)
        if self.fields.error is not None:
            return None
        return list(other_columns(dict.fromkeys(self.table.column_names), self.fields))

    def columns_of(self, record: dict, where: str) -> dict:
        """The record's input columns it keeps, as JSON values (a column a record lacks: null)."""
        if self.fields.error is not None:  # normalized: its other fields, as JSON text (JSON values already)
            found = json.loads(record.get(COLUMNS) or "{}")
        else:
            found = other_columns(record, self.fields)
        if self.keep is not None:
            found = {name: found.get(name) for name in self.keep}
        if self.fields.error is None:
            found.update({key: json_value(found[key], where, key) for key in self.not_json & found.keys()})
        return found

    @cached_property
    def not_json(self) -> frozenset[str]:
        """The table's columns whose values JSON does not hold as they are (dates, decimals, bytes, ...); Arrow's
        strings are UTF-8, so the others are JSON values already."""
        schema = self.table.data.schema
        return frozenset(name for name in schema.names if not json_type(schema.field(name).type))

    def digest(self) -> str:
        """A hash of the records' content (not of file names or times), read a batch at a time."""
        digest = hashlib.sha256(json.dumps([self.fields.prompt, self.fields.id, self.fields.messages]).encode())
        arrow = self.table.with_format("arrow")
        for start in range(0, len(self), HASH_BATCH):
            batch = arrow[start:start + HASH_BATCH]
            digest.update(json.dumps(batch.to_pydict(), sort_keys=True, default=str).encode())
        return digest.hexdigest()[:16]


def chat_template_text(value: str, tokenizer) -> str:
    """dataset.chat_template as apply_chat_template takes it: a file's template (its text, or a chat_template.json's
    "chat_template"), the template itself (it holds Jinja's {{ }} or {% %}), or one of the tokenizer's named
    templates by name. Anything else, or a template Jinja cannot parse, is a ConfigError."""
    path = Path(value)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"dataset.chat_template={value!r} cannot be read as UTF-8 text ({err})") from None
        if path.suffix == ".json":
            try:
                text = json.loads(text)["chat_template"]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"dataset.chat_template={value!r} is a .json file without a \"chat_template\" "
                                  "string (as transformers saves chat_template.json)") from None
    elif "{{" in value or "{%" in value:
        text = value
    elif isinstance(tokenizer.chat_template, dict) and value in tokenizer.chat_template:
        return value  # apply_chat_template picks the tokenizer's template of that name
    else:
        named = sorted(tokenizer.chat_template) if isinstance(tokenizer.chat_template, dict) else []
        raise ConfigError(f"dataset.chat_template={value!r} is not allowed: not a file, not a template (Jinja: "
                          "{{ ... }} or {% ... %}), and not one of the tokenizer's templates"
                          + (f" ({', '.join(named)})" if named else " (it has no named ones)"))
    check_template(text, value)
    return text


def check_template(text: str, value: str) -> None:
    """A template Jinja cannot parse is refused before any record is rendered (not one error record per record)."""
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"dataset.chat_template={value[:80]!r}: the template is not valid Jinja: line {err.lineno}: "
                          f"{err.message}") from None


def chat_renderer(tokenizer, cfg: DatasetConfig) -> Render:
    """Chat records' text as transformers' apply_chat_template renders it: dataset.chat_template (else the
    tokenizer's), dataset.chat_template_kwargs and the record's own variables on top, and either the generation
    prompt or (dataset.continue_final_message) the last message left open."""
    template = chat_template_text(cfg.chat_template, tokenizer) if cfg.chat_template is not None else None
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"dataset.messages_field={cfg.messages_field!r} is not allowed: the tokenizer has no chat "
                          "template; give dataset.chat_template=<template file>, use dataset.prompt_field with plain "
                          "prompts, or a model whose tokenizer has one")
    given = dict(cfg.chat_template_kwargs or {})
    ending = dict(add_generation_prompt=not cfg.continue_final_message,
                  continue_final_message=cfg.continue_final_message)

    def render(messages: list, kwargs: dict) -> str:
        return tokenizer.apply_chat_template([{k: v for k, v in m.items() if v is not None} for m in messages],
                                             tokenize=False, chat_template=template, **ending, **{**given, **kwargs})
    return render


def column_names(table, fields: RecordFields, names: Sequence[str]) -> set[str]:
    """Which of `names` are columns of the table (of a normalized one: a field of some record)."""
    if fields.error is None:
        return set(names) & set(table.column_names)
    import pyarrow.compute as pc
    text = table.data.column(COLUMNS)
    return {name for name in names if pc.any(pc.match_substring(text, json.dumps(name) + ": ")).as_py()}


def check_kept(table, given: RecordFields, fields: RecordFields, keep: Optional[Sequence[str]], path: str) -> None:
    """output.columns names columns of the dataset, neither its id nor its prompt field (`id` and `prompt` of
    every record). `given`: the fields as configured; `fields`: where the loaded table keeps them."""
    if not keep:
        return
    own = {given.id: "dataset.id_field, every record's `id`"}
    prompt = "every record's `prompt` (output.keep_prompt=false leaves it out)"
    if not given.messages:
        own[given.prompt] = f"dataset.prompt_field, {prompt}"
    if fields.error is None and not fields.messages:
        own.setdefault(fields.prompt, f"the prompt, {prompt}")  # a text file's lines
    for name in keep:
        if name in own:
            raise ConfigError(f"output.columns: {name!r} is not allowed: it is {own[name]}")
    missing = [name for name in keep if name not in column_names(table, fields, keep)]
    if missing:
        found = ", ".join(table.column_names) if fields.error is None else "see its records"
        raise ConfigError(f"output.columns={list(keep)!r} is not allowed: {path} has no column {missing[0]!r} "
                          f"(its columns: {found})")


def has_chat(table, fields: RecordFields) -> bool:
    import pyarrow.compute as pc
    return bool(pc.any(pc.is_valid(table.data.column(fields.messages))).as_py())


def renderer(cfg: DatasetConfig, table, fields: RecordFields, tokenizer) -> Optional[Render]:
    """How the dataset's chat records become prompt text (None: it has none)."""
    if not fields.messages or fields.mixed and not has_chat(table, fields):
        return None
    if tokenizer is None:
        return lambda messages, kwargs: ""  # checking records only
    if fields.mixed and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"dataset.path={cfg.path!r} holds /v1/chat/completions requests, which are rendered "
                          "with the tokenizer's chat template, and the model's tokenizer has none: use a model "
                          "whose tokenizer has one (or /v1/completions requests)")
    return chat_renderer(tokenizer, cfg)


def open_prompts(cfg: DatasetConfig, cache_dir: str, tokenizer=None,
                 keep: Optional[Sequence[str]] = None) -> PromptSource:
    """The dataset as a PromptSource; `tokenizer` (for chat templates) may be None when only checking; `keep`
    (output.columns): the input columns each record keeps (None: all)."""
    fmt = detect_format(cfg.path, cfg.format)
    check_path(cfg, fmt)
    import datasets
    datasets.disable_progress_bars()
    # Its errors become ours below (naming file:line); its own ERROR lines would come first on stderr,
    # e.g. the JSON builder's log before the line-by-line reader takes over.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    given = fields = RecordFields(cfg.prompt_field, cfg.id_field, cfg.messages_field)
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
    check_unique_ids(table, fields, cfg.path, "custom_id" if fmt == "openai_batch" else "")
    check_kept(table, given, fields, keep, cfg.path)
    rows = None
    if cfg.shuffle_seed is not None:
        rows = np.random.default_rng(cfg.shuffle_seed).permutation(len(table))  # the order Dataset.shuffle takes
        table = table.select(rows, keep_in_memory=True)
    if cfg.limit is not None and cfg.limit < len(table):
        table = table.select(range(cfg.limit))
        rows = None if rows is None else rows[:cfg.limit]
    if len(table) == 0:
        raise ConfigError(f"dataset.path={cfg.path!r} holds no prompts")
    return PromptSource(table, fields, cfg.path, renderer(cfg, table, fields, tokenizer), rows,
                        None if keep is None else tuple(keep), fmt)
