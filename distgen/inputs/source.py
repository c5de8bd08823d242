"""Open a dataset of prompts as an Arrow table (memory-mapped, via the `datasets` library)
and turn its records into `Prompt`s on demand, a batch of indices at a time.

Nothing here holds the whole dataset in Python objects: a rank reads only the records it
asks for. Every format gives the same prompts as the same records in JSON lines.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from distgen.config import DatasetConfig
from distgen.common.errors import ConfigError
from distgen.common.registry import Registry
from distgen.inputs.records import OVERRIDES, Prompt, RecordFields, check_utf8_line, parse_jsonl_record, record_to_prompt

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
        ("folder", None, "a local folder of data files")):
    DATASET_FORMATS.register(_name, None, _builder, doc=_doc)
TEXT_FORMATS = ("jsonl", "json", "txt", "csv")
TEXT_COLUMN = "text"
SAVED_MARKERS = ("state.json", "dataset_dict.json")
HASH_BATCH = 10_000


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
                          f"({', '.join(FILE_FORMATS)}) or a folder saved with datasets.save_to_disk")
    if p.suffix == ".py":
        raise ConfigError(f"dataset.path={cfg.path!r} is not allowed: dataset loading scripts are not supported "
                          "by the datasets library any more; give the data files or a save_to_disk folder")


def check_utf8(path: str) -> None:
    """A text prompts file is UTF-8 throughout, or the error names the first bad line and byte
    (streamed line by line, so any size; Arrow's readers would only raise a bare decode error)."""
    with open(path, "rb") as lines:
        for line_no, raw in enumerate(lines, start=1):
            check_utf8_line(raw, path, line_no)


def pick_split(loaded, split: str, path: str):
    from datasets import DatasetDict
    if not isinstance(loaded, DatasetDict):
        return loaded
    if split not in loaded:
        raise ConfigError(f"dataset.split={split!r} is not allowed: {path} has splits {', '.join(loaded)}")
    return loaded[split]


def jsonl_records(path: str, fields: RecordFields) -> Iterator[dict]:
    """Each line's record, checked and reduced to the fields distgen reads (stop always a list),
    so that records whose columns mix types still make one Arrow table."""
    with open(path, encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if line.strip():
                prompt = parse_jsonl_record(line, 0, f"{path}:{line_no}", fields, render=lambda m: "")
                record = json.loads(line)
                yield {"id": prompt.id if fields.id in record else None,
                       "prompt": record.get(fields.prompt) if not fields.messages else None,
                       "messages": json.dumps(record[fields.messages]) if fields.messages else None,
                       **{k: getattr(prompt, k) for k in OVERRIDES if k != "stop"},
                       "stop": list(prompt.stop) or None, "error": prompt.error}


def load_jsonl(path: str, cache_dir: str, fields: RecordFields):
    """Arrow's JSON reader; when the records' columns do not fit one schema (or a line is bad),
    the line-by-line reader, which names file:line for a bad record."""
    import datasets
    from pyarrow.lib import ArrowInvalid
    try:
        return datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache_dir), fields
    except (ArrowInvalid, datasets.exceptions.DatasetGenerationError, ValueError, TypeError):
        stat = os.stat(path)
        table = datasets.Dataset.from_generator(
            jsonl_records, gen_kwargs={"path": path, "fields": fields}, cache_dir=cache_dir,
            fingerprint=hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{fields}".encode()).hexdigest())
        normalized = RecordFields("prompt", "id", "messages" if fields.messages else None, error="error")
        return table, normalized


def load_table(cfg: DatasetConfig, fmt: str, cache_dir: str, fields: RecordFields):
    import datasets
    if fmt in ("jsonl", "json"):
        return load_jsonl(cfg.path, cache_dir, fields)
    if fmt == "saved":
        return pick_split(datasets.load_from_disk(cfg.path), cfg.split, cfg.path), fields
    if fmt == "folder":
        return pick_split(datasets.load_dataset(cfg.path, cache_dir=cache_dir), cfg.split, cfg.path), fields
    table = datasets.load_dataset(DATASET_FORMATS.get(fmt), data_files=cfg.path, split="train", cache_dir=cache_dir)
    if fmt == "txt":
        # Blank lines are not prompts.
        table = table.filter(lambda batch: [bool(t.strip()) for t in batch[TEXT_COLUMN]], batched=True)
        fields = RecordFields(TEXT_COLUMN, id="")
    return table, fields


def config_error_in(err: BaseException) -> Optional[ConfigError]:
    while err is not None and not isinstance(err, ConfigError):
        err = err.__cause__ or err.__context__
    return err


def check_columns(table, fields: RecordFields, path: str) -> None:
    needed = fields.messages or fields.prompt
    if needed not in table.column_names:
        key = "dataset.messages_field" if fields.messages else "dataset.prompt_field"
        raise ConfigError(f"{key}={needed!r} is not allowed: {path} has columns {', '.join(table.column_names)}")


def check_unique_ids(table, id_field: str, path: str) -> None:
    """Ids must be unique over the file, checked in Arrow without Python objects per record."""
    if id_field not in table.column_names:
        return
    import pyarrow as pa
    import pyarrow.compute as pc
    column = table.data.column(id_field).combine_chunks()
    if isinstance(column.type, pa.BaseExtensionType):  # e.g. JSON values of mixed types: compare their text
        column = column.storage
    counts = pc.value_counts(column)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0].as_py()
        raise ConfigError(f"{path}: id {first['values']!r} appears {first['counts']} times "
                          f"({len(repeated)} ids repeat); dataset.id_field={id_field!r} must be unique")


@dataclass
class PromptSource:
    """The job's records in dataset order: `len`, and `prompts(indices)` built on demand."""
    table: object  # datasets.Dataset, after shuffle_seed and limit
    fields: RecordFields
    path: str
    render: Optional[Callable[[list], str]] = None

    def __len__(self) -> int:
        return len(self.table)

    def prompts(self, indices: Sequence[int]) -> list[Prompt]:
        indices = [int(i) for i in indices]
        if not indices:
            return []
        columns = self.table[indices]
        keys = list(columns)
        return [self.prompt_of({k: columns[k][row] for k in keys}, index)
                for row, index in enumerate(indices)]

    def prompt_of(self, record: dict, index: int) -> Prompt:
        if self.fields.messages and isinstance(record.get(self.fields.messages), str):  # normalized JSON lines
            record = {**record, self.fields.messages: json.loads(record[self.fields.messages])}
        return record_to_prompt(record, index, f"{self.path}: record {index}", self.fields, self.render)

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
    if fmt in TEXT_FORMATS:
        check_utf8(cfg.path)
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
        raise ConfigError(f"dataset.path={cfg.path!r} could not be read as {fmt}: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}") from None
    check_columns(table, fields, cfg.path)
    check_unique_ids(table, fields.id, cfg.path)
    if cfg.shuffle_seed is not None:
        table = table.shuffle(seed=cfg.shuffle_seed, keep_in_memory=True)
    if cfg.limit is not None and cfg.limit < len(table):
        table = table.select(range(cfg.limit))
    if len(table) == 0:
        raise ConfigError(f"dataset.path={cfg.path!r} holds no prompts")
    render = chat_renderer(tokenizer, cfg.messages_field) if cfg.messages_field and tokenizer is not None else None
    if cfg.messages_field and tokenizer is None:
        render = lambda messages: ""  # noqa: E731 - checking records only
    return PromptSource(table, fields, cfg.path, render)
