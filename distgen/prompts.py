"""Read a prompts file (JSON lines, a JSON array or plain text) into `Prompt` records in dataset order.

Whatever makes the whole file unusable (bytes that are not UTF-8, malformed JSON, a missing
field, a repeated id, no prompts at all) is a `ConfigError` naming the file and its 1-based line,
raised before any worker starts. A bad per-record setting only marks that record (`Prompt.error`):
it gets an error record and the job goes on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from distgen.config import DatasetConfig
from distgen.errors import ConfigError

JSON_ARRAY_HINT = "a .json file holds one JSON array of records ([{\"prompt\": ...}, ...]) or JSON lines"


@dataclass(frozen=True)
class Prompt:
    index: int
    id: str
    text: str
    # Per-record budget from the file; None means generation.max_new_tokens.
    max_new_tokens: Optional[int] = None
    # Why this record cannot be generated (a bad per-record setting); it becomes an error record.
    error: Optional[str] = None

    def budget(self, default: int) -> int:
        return self.max_new_tokens or default


@dataclass(frozen=True)
class SourceLine:
    """One record's text and where it came from (1-based line)."""
    line_no: int
    text: str


def detect_format(path: str, fmt: str, head: str = "") -> str:
    """`head` is the file's first non-blank text: a .json file starting with '[' is a JSON array."""
    if fmt != "auto":
        return fmt
    if path.endswith(".json"):
        return "json" if head.startswith("[") else "jsonl"
    return "jsonl" if path.endswith(".jsonl") else "txt"


def decode_lines(data: bytes, source: str) -> list[str]:
    """UTF-8 lines; bytes that are not UTF-8 are reported with their line and byte."""
    lines = data.split(b"\n")
    for line_no, raw in enumerate(lines, start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{source}:{line_no}: byte {err.start + 1} ({raw[err.start:err.start + 1]!r}) is not "
                              "UTF-8; save the prompts file as UTF-8") from None
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


def budget_error(budget: object) -> Optional[str]:
    if budget is None or (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1):
        return None
    return f"max_new_tokens={budget!r} is not allowed: must be an integer >= 1"


def record_prompt(record: object, index: int, where: str, prompt_field: str, id_field: str) -> Prompt:
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object with a string field '{prompt_field}', "
                          f"found {type(record).__name__}")
    if not isinstance(record.get(prompt_field), str):
        found = ", ".join(map(repr, record)) or "no fields"
        raise ConfigError(f"{where}: needs a string field '{prompt_field}' (dataset.prompt_field); found {found}")
    budget = record.get("max_new_tokens")
    error = budget_error(budget)
    return Prompt(index, str(record.get(id_field, index)), record[prompt_field], None if error else budget, error)


def parse_jsonl_line(line: str, where: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None


def parse_prompts(lines: Iterable[str], fmt: str, source: str, prompt_field: str = "prompt",
                  id_field: str = "id", limit: Optional[int] = None) -> list[Prompt]:
    """Blank lines are skipped; ids default to the record's position and must be unique."""
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
        else:
            record = parse_jsonl_line(item, where) if fmt == "jsonl" else item
            prompt = record_prompt(record, index, where, prompt_field, id_field)
        if prompt.id in seen:
            raise ConfigError(f"{where}: id {prompt.id!r} repeats the id at line {seen[prompt.id]} "
                              f"(dataset.id_field={id_field!r} must be unique)")
        seen[prompt.id] = line_no
        prompts.append(prompt)
    return prompts


def read_prompts(cfg: DatasetConfig) -> list[Prompt]:
    path = Path(cfg.path)
    if not path.is_file():
        raise ConfigError(f"dataset.path={cfg.path!r} is not a file; give a .jsonl, .json or .txt prompts file")
    lines = [line + "\n" for line in decode_lines(path.read_bytes(), cfg.path)]
    fmt = detect_format(cfg.path, cfg.format, "".join(lines).lstrip()[:1])
    prompts = parse_prompts(lines, fmt, cfg.path, cfg.prompt_field, cfg.id_field, cfg.limit)
    if not prompts:
        raise ConfigError(f"dataset.path={cfg.path!r} holds no prompts"
                          + (f" (dataset.limit={cfg.limit})" if cfg.limit == 0 else ""))
    return prompts
