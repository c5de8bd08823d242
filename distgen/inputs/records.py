"""Prompt records, and the per-record check that turns one input record into a `Prompt`.

`record_to_prompt` is the one place a record is validated, whatever the input format (JSON
lines or a JSON array read line by line, or rows of an Arrow dataset, see distgen/inputs/source.py).
Whatever makes the whole file unusable (bytes that are not UTF-8, a lone surrogate, malformed
JSON, a missing field, an id that is neither a string nor an integer, a repeated id, no prompts at
all) is a `ConfigError` naming the file and its 1-based line. A bad per-record setting (out of its
range) or chat messages the template refuses only mark that record (`Prompt.error`): it gets an
error record and the job goes on.

Ids keep their type (a string or an integer); a record without one gets its row in the dataset
(an integer, before any shuffle), and ids are unique by their text, so a given id "3" and the id a
record without one gets at row 3 are refused as the same id.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from distgen.common.errors import ConfigError
from distgen.config import (MAX_LOGIT_BIAS, MAX_PENALTY, MAX_SEED, MAX_SEQUENCE_TOKENS, MIN_TEMPERATURE, is_int,
                            is_number, logit_bias_ok, logprobs_ok, min_p_ok, penalty_ok, repetition_penalty_ok,
                            seed_ok, temperature_ok, token_ids_ok)

JSON_ARRAY_HINT = "a .json file holds one JSON array of records ([{\"prompt\": ...}, ...]) or JSON lines"
BOM = "\ufeff"
# A record's id: given (a string or an integer), or its row in the dataset.
RecordId = str | int
GENERATED_ID_NOTE = ("a record without an id gets its row (from 0) as its id; give every record an id, or none, "
                     "or ids that are not row numbers")


@dataclass(frozen=True)
class Prompt:
    index: int
    id: RecordId
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
    # vLLM's sampling knobs (generation.* has each; None or empty: generation.*'s).
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    min_p: Optional[float] = None
    min_tokens: Optional[int] = None
    stop_token_ids: Optional[tuple[int, ...]] = None
    logit_bias: Optional[tuple[tuple[int, float], ...]] = None  # (token id, bias) pairs, by token id
    ignore_eos: Optional[bool] = None
    logprobs: Optional[int] = None  # alternatives per generated token in its output record's `logprobs`

    def budget(self, default: int) -> int:
        return self.max_new_tokens or default


@dataclass(frozen=True)
class RecordFields:
    """Where a record keeps its prompt, id and (for chat records) messages."""
    prompt: str = "prompt"
    id: str = "id"
    messages: Optional[str] = None
    # Where a normalized record (distgen/inputs/source.py) keeps why one of its overrides was not allowed;
    # set, the id column holds ids as text and `ID_IS_INT` says which were integers.
    error: Optional[str] = None


# A normalized record's column: whether its id (kept as text) was an integer.
ID_IS_INT = "id_is_int"


def is_whole(value: Any) -> bool:
    """An integer, or a float holding one (CSV and Arrow columns with gaps turn integers into floats)."""
    return is_int(value) or isinstance(value, float) and value.is_integer()


def whole(value: Any) -> Any:
    """An integer a float holds (a CSV or Arrow column with gaps) as that integer; anything else as it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def bias_pairs(bias: dict) -> tuple[tuple[int, float], ...]:
    """{token_id: bias} (JSON keys are text) as (token id, bias) pairs by token id; null entries (Arrow gives every
    record of a column every key some record has) are none."""
    return tuple(sorted((int(k), float(v)) for k, v in bias.items() if v is not None))


# Per-record override: (check, what is allowed, convert).
# The ranges are what the rest of the job can hold: budgets in the int32 length table
# (distgen/parallel/feed.py), seeds in torch.Generator.manual_seed, temperatures in fp32 division.
OVERRIDES: dict[str, tuple[Callable[[Any], bool], str, Callable[[Any], Any]]] = {
    "max_new_tokens": (lambda v: is_whole(v) and 1 <= v < MAX_SEQUENCE_TOKENS,
                       f"an integer in [1, {MAX_SEQUENCE_TOKENS - 1}]", int),
    "temperature": (temperature_ok, f"0 (greedy) or a finite number >= {MIN_TEMPERATURE}", float),
    "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]", float),
    "top_k": (lambda v: is_whole(v) and 0 <= v < 2**63, "an integer >= 0 (0 disables top-k)", int),
    "seed": (lambda v: is_whole(v) and seed_ok(int(v)), f"an integer in [0, {MAX_SEED}]", int),
    "stop": (lambda v: isinstance(v, str) and v != "" or isinstance(v, (list, tuple)) and all(
        isinstance(s, str) and s for s in v), "a non-empty string or a list of them",
             lambda v: (v,) if isinstance(v, str) else tuple(v)),
    # vLLM's sampling knobs: the ranges generation.* is held to (GenerationConfig.check_knobs). A token id past
    # the model's vocabulary is found once the engine knows it (engine.build.make_request), as an error record too.
    "repetition_penalty": (repetition_penalty_ok, f"a finite number >= {MIN_TEMPERATURE} (1 is off)", float),
    "presence_penalty": (penalty_ok, f"a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0 is off)", float),
    "frequency_penalty": (penalty_ok, f"a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0 is off)", float),
    "min_p": (min_p_ok, "a number in [0, 1] (0 is off)", float),
    "min_tokens": (lambda v: is_whole(v) and 0 <= v < MAX_SEQUENCE_TOKENS,
                   "an integer >= 0, at most the record's max_new_tokens", int),
    "stop_token_ids": (lambda v: isinstance(v, (list, tuple)) and token_ids_ok([whole(t) for t in v]),
                       "a list of token ids >= 0", lambda v: tuple(dict.fromkeys(int(t) for t in v))),
    "logit_bias": (logit_bias_ok, f"an object {{token_id: bias}}, ids >= 0, biases in [-{MAX_LOGIT_BIAS:g}, "
                                  f"{MAX_LOGIT_BIAS:g}]", bias_pairs),
    "ignore_eos": (lambda v: isinstance(v, bool), "true or false", bool),
    "logprobs": (lambda v: is_whole(v) and logprobs_ok(int(v)), "an integer >= 0 (alternatives per token, capped "
                                                                 "at the vocabulary)", int),
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


def check_unicode(value: str, where: str, field: str) -> None:
    """A string JSON escapes made (\\ud800) can hold a lone surrogate: not text, and no UTF-8 output can hold it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConfigError(f"{where}: field '{field}' holds a lone surrogate ({value[err.start]!r} at character "
                          f"{err.start + 1}), which is not Unicode text; fix its escape in the record") from None


def has_id(record: dict, fields: RecordFields) -> bool:
    """Whether the record gives its own id (a gap in a CSV column, NaN, is none)."""
    value = record.get(fields.id) if fields.id else None
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def record_id(record: dict, fields: RecordFields, row: int, where: str) -> RecordId:
    """The record's own id (a string or an integer; a whole float from a CSV column with gaps is an
    integer), or its row when it has none."""
    if not has_id(record, fields):
        return row
    value = record[fields.id]
    if fields.error is not None:  # normalized: the id as text and whether it was an integer
        return int(value) if record.get(ID_IS_INT) else value
    if isinstance(value, str):
        check_unicode(value, where, fields.id)
        return value
    if is_whole(value):
        return int(value)
    raise ConfigError(f"{where}: id {value!r} is not allowed: an id ('{fields.id}', dataset.id_field) is a string "
                      "or an integer")


def rendered(messages: list, render: Callable[[list], str]) -> tuple[str, Optional[str]]:
    """(text, None), or ("", why) when the chat template refuses these messages (templates raise on
    e.g. roles that do not alternate): that record gets an error record."""
    try:
        return render(messages), None
    except Exception as err:  # the tokenizer's template is data, as the record is; attributable to this record
        return "", f"messages could not be rendered by the chat template: {type(err).__name__}: {err}"


def record_to_prompt(record: Any, index: int, where: str, fields: RecordFields,
                     render: Optional[Callable[[list], str]] = None, row: Optional[int] = None) -> Prompt:
    """One input record as a Prompt; a ConfigError names `where` (file:line or file:record) and the field.
    `row`: the record's row in the dataset before any shuffle (its id when it has none; default `index`)."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object with a string field '{fields.prompt}', "
                          f"found {type(record).__name__}")
    error = None
    if fields.messages:
        messages = record.get(fields.messages)
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise ConfigError(f"{where}: needs a list of {{role, content}} messages in '{fields.messages}' "
                              "(dataset.messages_field)")
        for m in messages:
            for value in m.values():
                if isinstance(value, str):
                    check_unicode(value, where, fields.messages)
        (text, error), templated = rendered(messages, render), True
    else:
        text, templated = record.get(fields.prompt), False
        if not isinstance(text, str):
            found = ", ".join(map(repr, record)) or "no fields"
            raise ConfigError(f"{where}: needs a string field '{fields.prompt}' (dataset.prompt_field); found {found}")
        check_unicode(text, where, fields.prompt)
    stops = record.get("stop")
    for stop in stops if isinstance(stops, (list, tuple)) else [stops]:
        if isinstance(stop, str):
            check_unicode(stop, where, "stop")
    overrides, bad = overrides_of(record)
    error = error or bad or (record.get(fields.error) if fields.error else None)
    return Prompt(index, record_id(record, fields, index if row is None else row, where), text,
                  templated=templated, error=error, **overrides)


def parse_json_line(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None


def parse_jsonl_record(line: str, index: int, where: str, fields: RecordFields,
                       render: Optional[Callable[[list], str]] = None) -> Prompt:
    return record_to_prompt(parse_json_line(line, where), index, where, fields, render)


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
    """UTF-8 lines (a byte order mark at the start dropped), or an error naming the first line and byte that
    is not UTF-8."""
    lines = data.removeprefix(BOM.encode()).split(b"\n")
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
    seen: dict[str, tuple[int, bool]] = {}  # id as text -> (line, whether that id came from the position)
    for line_no, item in records:
        if limit is not None and len(prompts) >= limit:
            break
        index, where = len(prompts), f"{source}:{line_no}"
        if fmt == "txt":
            prompt, given = Prompt(index, index, item.rstrip("\r\n")), False
        else:
            record = parse_json_line(item, where) if fmt == "jsonl" else item
            prompt = record_to_prompt(record, index, where, fields, render)
            given = has_id(record, fields)
        key = str(prompt.id)
        if key in seen:
            line, generated = seen[key]
            raise ConfigError(f"{where}: id {prompt.id!r} repeats the id at line {line} (dataset.id_field="
                              f"{fields.id!r} must be unique" + (f"; {GENERATED_ID_NOTE}" if generated or not given
                                                                 else "") + ")")
        seen[key] = (line_no, not given)
        prompts.append(prompt)
    return prompts


def read_prompts(cfg) -> list[Prompt]:
    """A JSON-lines, JSON-array or text file read whole, every line checked (cfg: DatasetConfig)."""
    path = Path(cfg.path)
    if not path.is_file():
        raise ConfigError(f"dataset.path={cfg.path!r} is not a file; give a .jsonl, .json or .txt prompts file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"dataset.path={cfg.path!r} cannot be read: {err.strerror or err}") from None
    lines = [line + "\n" for line in decode_lines(data, cfg.path)]
    fmt = detect_format(cfg.path, cfg.format, "".join(lines).lstrip()[:1])
    prompts = parse_prompts(lines, fmt, cfg.path, RecordFields(cfg.prompt_field, cfg.id_field), cfg.limit)
    if not prompts:
        raise ConfigError(f"dataset.path={cfg.path!r} holds no prompts"
                          + (f" (dataset.limit={cfg.limit})" if cfg.limit == 0 else ""))
    return prompts
