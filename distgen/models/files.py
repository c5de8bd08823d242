"""Reading a model folder's files without loading them: a JSON object (config.json, adapter_config.json) and
whether a weight file is whole (a safetensors header against the file's size). Below loading.py and lora.py,
which both check folders with them."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from distgen.common.errors import ConfigError

SAFETENSORS = ".safetensors"
# A safetensors header is JSON of this size at most (the format's own limit).
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def read_json_object(path: Path, folder: Path, key: str) -> dict:
    """A JSON object from `path` (a file of the folder `key` names); unreadable, or not an object: a ConfigError."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{key}={str(folder)!r}: {path} cannot be read as JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{key}={str(folder)!r}: {path} holds a JSON {type(config).__name__}, not an object")
    return config


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (its 8-byte header length, its JSON header, the tensors'
    offsets against the file size), or None. No tensor is read."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors header"
        length = struct.unpack("<Q", head)[0]
        if length > min(MAX_SAFETENSORS_HEADER, size - 8):
            return f"its header length {length} does not fit the file ({size} bytes)"
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError):
            return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    offsets = [entry.get("data_offsets") for name, entry in header.items()
               if name != "__metadata__" and isinstance(entry, dict)]
    ends = [pair[1] for pair in offsets if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], int)]
    if max(ends, default=0) > size - 8 - length:
        return f"its tensors need {max(ends) + 8 + length} bytes but the file has {size} (cut short?)"
    return None


def weight_file_problem(path: Path) -> str | None:
    """Why a weight file (.safetensors: its header against its size; .bin: not empty) cannot be read, or None."""
    return safetensors_problem(path) if path.suffix == SAFETENSORS else (
        "it is empty" if path.stat().st_size == 0 else None)
