"""Structured output: what a job or a record asks its completions to follow, as one `Grammar` (its kind and its
text). A job asks with generation.json_schema (a JSON schema file, or the schema inline), generation.regex or
generation.choice; a record with its own `json_schema` (an object, or its JSON text), `regex` or `choice`, which
replaces the job's grammar for that record. At most one of the three, in either place.

Nothing here needs the grammar library: the engine compiles a Grammar per rank (distgen/engine/grammar.py, xgrammar),
and a job asking for one without the library installed is a ConfigError before any process starts (catalog).
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from distgen.common.errors import ConfigError
from distgen.config import GRAMMAR_KEYS, GenerationConfig

# The grammar library and how to install it (scripts/setup.sh installs these pins with --no-deps: xgrammar's wheel
# asks for triton on Linux x86_64, which only its CUDA kernel imports).
PACKAGE = "xgrammar"
INSTALL = ("pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 (scripts/setup.sh does; with a CUDA "
           "torch, pip install 'distgen[structured]')")


@dataclass(frozen=True)
class Grammar:
    """One grammar: `kind` json_schema (`text`: the schema's JSON text), regex (the expression) or choice (the
    choices as a JSON list). Hashable: a rank compiles each distinct one once."""
    kind: str
    text: str


def missing_package() -> Optional[str]:
    """Why structured output cannot run here (the library is not installed, saying how to install it), or None."""
    if importlib.util.find_spec(PACKAGE) is not None:
        return None
    return f"structured output needs the {PACKAGE} package, which is not installed: {INSTALL}"


def schema_object(value: Any) -> Optional[dict]:
    """A JSON schema given as an object, or as the JSON text of one (a table's column); None when it is neither."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def schema_text(value: Any) -> str:
    """The schema's JSON text, compact and in its own key order (xgrammar generates properties in that order)."""
    return json.dumps(schema_object(value), ensure_ascii=False, separators=(",", ":"))


def grammar_of(kind: str, value: Any) -> Grammar:
    """A checked value of json_schema (an object or its text), regex or choice as its Grammar."""
    if kind == "json_schema":
        return Grammar(kind, schema_text(value))
    if kind == "choice":
        return Grammar(kind, json.dumps(list(value), ensure_ascii=False))
    return Grammar(kind, value)


def record_grammar(prompt) -> Optional[Grammar]:
    """A record's own grammar (records.OVERRIDES checked that it sets at most one), or None."""
    for kind in GRAMMAR_KEYS:
        value = getattr(prompt, kind, None)
        if value is not None:
            return grammar_of(kind, value)
    return None


def read_schema_file(path: str) -> dict:
    """generation.json_schema given as a file: its JSON object; a ConfigError names the key and the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"generation.json_schema={path!r} cannot be read as a JSON schema file "
                          f"({getattr(err, 'strerror', None) or err}); give a file or the schema inline") from None
    try:
        schema = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"generation.json_schema={path!r} is not JSON: {err}") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"generation.json_schema={path!r} holds a {type(schema).__name__}: a JSON schema is an "
                          "object")
    return schema


def job_grammar(gen: GenerationConfig) -> Optional[Grammar]:
    """generation.*'s grammar (its schema file read), or None. GenerationConfig.check has checked the values."""
    if gen.json_schema is not None:
        given = gen.json_schema
        return grammar_of("json_schema", read_schema_file(given) if isinstance(given, str) else given)
    if gen.regex is not None:
        return grammar_of("regex", gen.regex)
    if gen.choice is not None:
        return grammar_of("choice", gen.choice)
    return None
