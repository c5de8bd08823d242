"""A record's key: a short digest of everything in one input record that decides its output record
(its id, its prompt text as run, its own settings, why it cannot run, and the input columns it keeps),
every field of `Prompt` but its index. A finished record is reused for the dataset's record with the same
key, at its index or another (distgen/outputs/shards.py moves it), so a changed prompt under the same id runs
again and an appended, inserted or reordered row costs only its own new work. A kept
column does not change the completion, but a record holding an old value of it would be out of date:
a changed column value under the same id runs that record again too (output.columns limits what is kept).
A record that keeps no columns has the key it had before records kept columns.

Keys are 62-bit integers, kept as two 31-bit halves in the ranks' int32 length table."""
from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from functools import lru_cache

from distgen.inputs.records import Prompt

HALF_BITS = 31
HALF_MASK = (1 << HALF_BITS) - 1
# Fields `Prompt` gained after keys were first written: left out of a key while the record leaves them unset (None;
# columns: none kept), so a record that does not use them keeps the key earlier runs gave it (and an earlier
# run's finished record is found).
LATER_FIELDS = frozenset({"lora", "columns", "n", "repetition_penalty", "presence_penalty", "frequency_penalty",
                          "min_p", "min_tokens", "stop_token_ids", "logit_bias", "ignore_eos", "logprobs",
                          "prompt_logprobs", "json_schema", "regex", "choice"})


@lru_cache(maxsize=None)
def content_fields(kind: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(kind) if f.name != "index")


def record_key(prompt: Prompt) -> int:
    """The record's content without its index, as JSON (any field type: an id 1 and an id "1" differ), hashed."""
    content = {name: getattr(prompt, name) for name in content_fields(type(prompt))}
    # A kept column without a value is no column: a JSON-lines file where one record gains a field gives every
    # other record that field as null (Arrow's reader), which must not make every record's key another.
    content["columns"] = {name: value for name, value in prompt.columns.items() if value is not None}
    content = {name: value for name, value in content.items()
               if not (name in LATER_FIELDS and value in (None, {}))}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=repr).encode("utf-8", "surrogatepass"))
    return int.from_bytes(digest.digest()[:8], "little") >> (64 - 2 * HALF_BITS)


def key_halves(key: int) -> tuple[int, int]:
    """(high, low) 31-bit halves, each fitting an int32."""
    return key >> HALF_BITS, key & HALF_MASK


def join_halves(high, low):
    """Keys from their halves (ints or int64 arrays)."""
    return (high << HALF_BITS) | low
