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

A record's other fields (its input columns: `category`, a `metadata` dict, its own settings, a chat record's
messages) travel with its `Prompt` as JSON values (`Prompt.columns`, chosen by output.columns) to its output
record; they never change what is generated.
"""
from __future__ import annotations

import base64
import datetime
import decimal
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from distgen.common.errors import ConfigError
from distgen.config import (ADAPTER_NAME, GRAMMAR_KEYS, MAX_LOGIT_BIAS, MAX_PENALTY, MAX_SAMPLES, MAX_SEED,
                            MAX_SEQUENCE_TOKENS, MIN_TEMPERATURE, chat_kwargs_problem, choices_ok, is_int, is_number,
                            logit_bias_ok, logprobs_ok, min_p_ok, penalty_ok, regex_ok, repetition_penalty_ok,
                            samples_ok, seed_ok, temperature_ok, token_ids_ok)
from distgen.inputs.grammar import schema_object, schema_text

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
    prompt_logprobs: Optional[int] = None  # alternatives per prompt token in its output record's `prompt_logprobs`
    # The LoRA adapter (a name in model.lora) this record runs with; None: the base model (or the one merged).
    lora: Optional[str] = None
    # Completions of this record (None: generation.n).
    n: Optional[int] = None
    # Structured output (at most one; any of them replaces generation's grammar for this record): a JSON schema (its
    # JSON text), a regular expression, or the completions allowed (distgen/inputs/grammar.py).
    json_schema: Optional[str] = None
    regex: Optional[str] = None
    choice: Optional[tuple[str, ...]] = None
    # The input record's columns kept for its output record (output.columns), by their names in the dataset, as
    # JSON values (distgen/inputs/source.py picks them). Not hashed: a dict.
    columns: dict[str, Any] = field(default_factory=dict, hash=False)

    def budget(self, default: int) -> int:
        return self.max_new_tokens or default

    def samples(self, default: int) -> int:
        return self.n or default


@dataclass(frozen=True)
class RecordFields:
    """Where a record keeps its prompt, id and (for chat records) messages."""
    prompt: str = "prompt"
    id: str = "id"
    messages: Optional[str] = None
    # Where a normalized record (distgen/inputs/source.py) keeps why one of its overrides was not allowed;
    # set, the id column holds ids as text and `ID_IS_INT` says which were integers.
    error: Optional[str] = None
    # Each record holds chat messages or a plain prompt, its own choice (an OpenAI batch file's chat and
    # completion requests); else every record holds `messages` when it is set.
    mixed: bool = False


# Past this a float (an integer column with gaps, a JSON number like 1e30) does not hold the integer the file does.
EXACT_FLOAT_INTS = 2**53
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
    "n": (lambda v: is_whole(v) and samples_ok(int(v)), f"an integer in [1, {MAX_SAMPLES}]", int),
    "stop": (lambda v: isinstance(v, str) and v != "" or isinstance(v, (list, tuple)) and all(
        isinstance(s, str) and s for s in v), "a non-empty string or a list of them",
             lambda v: (v,) if isinstance(v, str) else tuple(v)),
    "lora": (lambda v: isinstance(v, str) and bool(ADAPTER_NAME.match(v)),
             "an adapter's name in model.lora (letters, digits, _ and -)", str),
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
    "prompt_logprobs": (lambda v: is_whole(v) and logprobs_ok(int(v)), "an integer >= 0 (alternatives per prompt "
                                                                        "token, capped at the vocabulary)", int),
    # Structured output (one of the three; a schema the grammar library cannot compile fails its record in the
    # engine, distgen/engine/grammar.py, as an error record too).
    "json_schema": (lambda v: schema_object(v) is not None, "a JSON schema: an object, or its JSON text", schema_text),
    "regex": (regex_ok, "a regular expression (a non-empty string)", str),
    "choice": (choices_ok, "a non-empty list of non-empty strings", tuple),
}
# A chat record's own variables for the chat template (added to dataset.chat_template_kwargs).
CHAT_KWARGS = "chat_template_kwargs"
# What a chat template renders a record's messages with: (messages, the record's own template variables) -> text.
Render = Callable[[list, dict], str]


class JsonNaN(float):
    """A NaN written in a JSON record: a value (JSON leaves a value out with null), not a CSV or parquet gap."""


def json_constant(name: str) -> float:
    """Python's JSON reader's NaN, Infinity and -Infinity, a NaN marked as written."""
    return JsonNaN(name) if name == "NaN" else float(name)


def overrides_of(record: dict) -> tuple[dict, Optional[str]]:
    """(the record's valid overrides, why the first invalid one is not allowed or None)."""
    found, error = {}, None
    for key, (ok, allowed, convert) in OVERRIDES.items():
        value = record.get(key)
        if value is None or isinstance(value, float) and math.isnan(value) and not isinstance(value, JsonNaN):
            continue  # NaN: a gap in a CSV column
        if not ok(value):
            error = error or f"{key}={value!r} is not allowed: must be {allowed}"
            continue
        found[key] = convert(value)
    grammars = [key for key in GRAMMAR_KEYS if key in found]
    if len(grammars) > 1:
        error = error or (f"{grammars[1]} is not allowed with {grammars[0]}: a record gives at most one of "
                          f"{', '.join(GRAMMAR_KEYS)}")
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
    if is_int(value) or is_whole(value) and abs(value) < EXACT_FLOAT_INTS:
        return int(value)
    raise ConfigError(f"{where}: id {value!r} is not allowed: an id ('{fields.id}', dataset.id_field) is a string "
                      f"or an integer (one read as a float, as in a column with gaps, below 2**53)")


# pandas' marks of a missing value (NaT, NA: a DataFrame's to_dict("records") gaps), null as Arrow reads a gap.
PANDAS_GAPS = ("NaTType", "NAType")


def json_value(value: Any, where: str, name: str) -> Any:
    """A column's value as JSON holds it: strings, numbers, booleans, null, lists and objects as they are; a date
    or time as ISO 8601 text, a decimal as its text, bytes as base64, anything else as its text. A string holding
    a lone surrogate (no output can hold it) is a ConfigError naming the column."""
    if isinstance(value, str):
        check_unicode(value, where, name)
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if type(value).__name__ in PANDAS_GAPS:  # before dates: NaT is a datetime whose isoformat() is "NaT"
        return None
    if isinstance(value, dict):
        return {str(k): json_value(v, where, name) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v, where, name) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if hasattr(value, "tolist"):  # numpy values and arrays
        return json_value(value.tolist(), where, name)
    return str(value) if not isinstance(value, decimal.Decimal) else format(value, "f")


def record_chat_kwargs(record: dict) -> tuple[dict, Optional[str]]:
    """(the record's own chat template variables, why they are not allowed or None). A null value is as unset (an
    Arrow column of objects fills the keys other records have with nulls)."""
    value = record.get(CHAT_KWARGS)
    if value is None:
        return {}, None
    problem = chat_kwargs_problem(value)
    if problem:
        return {}, f"{CHAT_KWARGS}={value!r} is not allowed: {problem}"
    return {k: v for k, v in value.items() if v is not None}, None


def rendered(messages: list, render: Render, kwargs: dict) -> tuple[str, Optional[str]]:
    """(text, None), or ("", why) when the chat template refuses these messages (templates raise on
    e.g. roles that do not alternate): that record gets an error record."""
    try:
        return render(messages, kwargs), None
    except Exception as err:  # the tokenizer's template is data, as the record is; attributable to this record
        return "", f"messages could not be rendered by the chat template: {type(err).__name__}: {err}"


def is_chat(record: dict, fields: RecordFields) -> bool:
    return bool(fields.messages) and (not fields.mixed or record.get(fields.messages) is not None)


def record_to_prompt(record: Any, index: int, where: str, fields: RecordFields,
                     render: Optional[Render] = None, row: Optional[int] = None,
                     columns: Optional[dict[str, Any]] = None) -> Prompt:
    """One input record as a Prompt; a ConfigError names `where` (file:line or file:record) and the field.
    `row`: the record's row in the dataset before any shuffle (its id when it has none; default `index`);
    `columns`: the input columns it keeps for its output record (JSON values)."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object with a string field '{fields.prompt}', "
                          f"found {type(record).__name__}")
    error = None
    if is_chat(record, fields):
        messages = record.get(fields.messages)
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            # one record's: an error record (the rest of the job goes on); a file without the column is refused
            # before start (inputs.source.check_columns)
            error = (f"{fields.messages}={short(messages)} is not allowed: expected a list of {{role, content}} "
                     "messages (dataset.messages_field)")
            text, templated = "", True
        else:
            for m in messages:
                for value in m.values():
                    if isinstance(value, str):
                        check_unicode(value, where, fields.messages)
            kwargs, error = record_chat_kwargs(record)
            (text, error), templated = (("", error) if error else rendered(messages, render, kwargs)), True
    else:
        text, templated = record.get(fields.prompt), False
        if not isinstance(text, str):
            # one record's (a file's records share its columns: a missing field reads None): an error record, the
            # rest of the job goes on; a file without the column is refused before start (source.check_columns)
            error = (f"{fields.prompt}={short(text)} ({type(text).__name__}) is not allowed: expected a string "
                     "(dataset.prompt_field)")
            text = ""
        else:
            check_unicode(text, where, fields.prompt)
    stops = record.get("stop")
    for stop in stops if isinstance(stops, (list, tuple)) else [stops]:
        if isinstance(stop, str):
            check_unicode(stop, where, "stop")
    overrides, bad = overrides_of(record)
    error = error or bad or (record.get(fields.error) if fields.error else None)
    return Prompt(index, record_id(record, fields, index if row is None else row, where), text,
                  templated=templated, error=error, columns=columns or {}, **overrides)


def short(value: Any, most: int = 80) -> str:
    """repr(value), cut to `most` characters (an error record names the value, not all of it)."""
    text = repr(value)
    return text if len(text) <= most else text[:most - 3] + "..."


def parse_json_line(line: str, where: str) -> Any:
    try:
        return json.loads(line, parse_constant=json_constant)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None


def check_utf8_line(raw: bytes, source: str, line_no: int) -> None:
    """Bytes that are not UTF-8 are reported with their line and byte."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}:{line_no}: byte {err.start + 1} ({raw[err.start:err.start + 1]!r}) is not "
                          "UTF-8; save the prompts file as UTF-8") from None




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
