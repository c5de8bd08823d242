"""Prompt records, and the per-record check that turns one input record into a `Prompt`.

`record_to_prompt` is the one place a record is validated, whatever the input format (JSON
lines or a JSON array read line by line, or rows of an Arrow dataset, see distgen/inputs/source.py).
Whatever makes the whole file unusable (bytes that are not UTF-8, malformed JSON, a missing
field, a repeated id, no prompts at all) is a `ConfigError` naming the file and its 1-based line.
A bad per-record setting only marks that record (`Prompt.error`): it gets an error record and
the job goes on.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from distgen.common.errors import ConfigError

JSON_ARRAY_HINT = "a .json file holds one JSON array of records ([{\"prompt\": ...}, ...]) or JSON lines"


@dataclass(frozen=True)
class Prompt:
    index: int
    id: str
    text: str
    # Per-record settings from the dataset; None means the generation.* setting.
    max_new_tokens: Optional[int] = None
    # Why this record cannot be generated (a bad per-record setting); it becomes an error record.
    error: Optional[str] = None
    temperature: Optional[float] = None  # 0 decodes this record greedily, > 0 samples it
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    # The completion ends where one of these first appears in the decoded text (which drops it).
    stop: tuple[str, ...] = ()
    # The text already holds the special tokens (rendered by a chat template).
    templated: bool = False

    def budget(self, default: int) -> int:
        return self.max_new_tokens or default


@dataclass(frozen=True)
class RecordFields:
    """Where a record keeps its prompt, id and (for chat records) messages."""
    prompt: str = "prompt"
    id: str = "id"
    messages: Optional[str] = None
    # Where a normalized record (distgen/inputs/source.py) keeps why one of its overrides was not allowed.
    error: Optional[str] = None


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_whole(value: Any) -> bool:
    """An integer, or a float holding one (CSV and Arrow columns with gaps turn integers into floats)."""
    return is_int(value) or isinstance(value, float) and value.is_integer()


# Per-record override: (check, what is allowed, convert).
OVERRIDES: dict[str, tuple[Callable[[Any], bool], str, Callable[[Any], Any]]] = {
    "max_new_tokens": (lambda v: is_whole(v) and v >= 1, "an integer >= 1", int),
    "temperature": (lambda v: is_number(v) and v >= 0, "a number >= 0 (0 is greedy)", float),
    "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]", float),
    "top_k": (lambda v: is_whole(v) and v >= 0, "an integer >= 0", int),
    "seed": (lambda v: is_whole(v), "an integer", int),
    "stop": (lambda v: isinstance(v, str) and v != "" or isinstance(v, (list, tuple)) and all(
        isinstance(s, str) and s for s in v), "a non-empty string or a list of them",
             lambda v: (v,) if isinstance(v, str) else tuple(v)),
}


def overrides_of(record: dict) -> tuple[dict, Optional[str]]:
    """(the record's valid overrides, why the first invalid one is not allowed or None)."""
    found, error = {}, None
    for key, (ok, allowed, convert) in OVERRIDES.items():
        value = record.get(key)
        if value is None or isinstance(value, float) and math.isnan(value):  # NaN: a gap in a CSV column
            continue
        if not ok(value):
            error = error or f"{key}={value!r} is not allowed: must be {allowed}"
            continue
        found[key] = convert(value)
    return found, error


def record_to_prompt(record: Any, index: int, where: str, fields: RecordFields,
                     render: Optional[Callable[[list], str]] = None) -> Prompt:
    """One input record as a Prompt; a ConfigError names `where` (file:line or file:record) and the field."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object with a string field '{fields.prompt}', "
                          f"found {type(record).__name__}")
    if fields.messages:
        messages = record.get(fields.messages)
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise ConfigError(f"{where}: needs a list of {{role, content}} messages in '{fields.messages}' "
                              "(dataset.messages_field)")
        text, templated = render(messages), True
    else:
        text, templated = record.get(fields.prompt), False
        if not isinstance(text, str):
            found = ", ".join(map(repr, record)) or "no fields"
            raise ConfigError(f"{where}: needs a string field '{fields.prompt}' (dataset.prompt_field); found {found}")
    record_id = record.get(fields.id)
    overrides, error = overrides_of(record)
    error = error or (record.get(fields.error) if fields.error else None)
    return Prompt(index, str(index if record_id is None else record_id), text, templated=templated, error=error,
                  **overrides)


def parse_jsonl_record(line: str, index: int, where: str, fields: RecordFields,
                       render: Optional[Callable[[list], str]] = None) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None
    return record_to_prompt(record, index, where, fields, render)


def detect_format(path: str, fmt: str, head: str = "") -> str:
    """`head` is the file's first non-blank text: a .json file starting with '[' is a JSON array."""
    if fmt != "auto":
        return fmt
    if path.endswith(".json"):
        return "json" if head.startswith("[") else "jsonl"
    return "jsonl" if path.endswith(".jsonl") else "txt"


def check_utf8_line(raw: bytes, source: str, line_no: int) -> None:
    """Bytes that are not UTF-8 are reported with their line and byte."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}:{line_no}: byte {err.start + 1} ({raw[err.start:err.start + 1]!r}) is not "
                          "UTF-8; save the prompts file as UTF-8") from None


def decode_lines(data: bytes, source: str) -> list[str]:
    """UTF-8 lines, or an error naming the first line and byte that is not UTF-8."""
    lines = data.split(b"\n")
    for line_no, raw in enumerate(lines, start=1):
        check_utf8_line(raw, source, line_no)
    return [raw.decode("utf-8") for raw in lines]


def json_array_records(text: str, source: str) -> Iterator[tuple[int, object]]:
    """(1-based line where the element starts, element) for each element of a JSON array."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise ConfigError(f"{source}:1: expected a JSON array; {JSON_ARRAY_HINT}")
    pos += 1
    while True:
        pos += len(text[pos:]) - len(text[pos:].lstrip())
        if text.startswith("]", pos):
            return
        line_no = text.count("\n", 0, pos) + 1
        try:
            element, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{source}:{err.lineno}: not valid JSON ({err.msg}); {JSON_ARRAY_HINT}") from None
        yield line_no, element
        pos += len(text[pos:]) - len(text[pos:].lstrip())
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            raise ConfigError(f"{source}:{text.count(chr(10), 0, pos) + 1}: expected ',' or ']' in the JSON array")


def parse_prompts(lines: Iterable[str], fmt: str, source: str, fields: RecordFields = RecordFields(),
                  limit: Optional[int] = None, render: Optional[Callable[[list], str]] = None) -> list[Prompt]:
    """Blank lines are skipped; ids default to the record's position and must be unique.
    Reads the whole file into memory: for checking a JSON-lines or JSON-array file line by line
    (file:line errors); jobs read datasets through distgen/inputs/source.py."""
    if fmt == "json":
        records = json_array_records("".join(lines), source)
    else:
        records = ((line_no, line) for line_no, line in enumerate(lines, start=1) if line.strip())
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for line_no, item in records:
        if limit is not None and len(prompts) >= limit:
            break
        index, where = len(prompts), f"{source}:{line_no}"
        if fmt == "txt":
            prompt = Prompt(index, str(index), item.rstrip("\r\n"))
        elif fmt == "jsonl":
            prompt = parse_jsonl_record(item, index, where, fields, render)
        else:
            prompt = record_to_prompt(item, index, where, fields, render)
        if prompt.id in seen:
            raise ConfigError(f"{where}: id {prompt.id!r} repeats the id at line {seen[prompt.id]} "
                              f"(dataset.id_field={fields.id!r} must be unique)")
        seen[prompt.id] = line_no
        prompts.append(prompt)
    return prompts


def read_prompts(cfg) -> list[Prompt]:
    """A JSON-lines, JSON-array or text file read whole, every line checked (cfg: DatasetConfig)."""
    path = Path(cfg.path)
    if not path.is_file():
        raise ConfigError(f"dataset.path={cfg.path!r} is not a file; give a .jsonl, .json or .txt prompts file")
    lines = [line + "\n" for line in decode_lines(path.read_bytes(), cfg.path)]
    fmt = detect_format(cfg.path, cfg.format, "".join(lines).lstrip()[:1])
    prompts = parse_prompts(lines, fmt, cfg.path, RecordFields(cfg.prompt_field, cfg.id_field), cfg.limit)
    if not prompts:
        raise ConfigError(f"dataset.path={cfg.path!r} holds no prompts"
                          + (f" (dataset.limit={cfg.limit})" if cfg.limit == 0 else ""))
    return prompts
