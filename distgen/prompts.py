"""Read a prompts file (JSON lines or plain text) into `Prompt` records in dataset order."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from distgen.config import DatasetConfig
from distgen.errors import ConfigError


@dataclass(frozen=True)
class Prompt:
    index: int
    id: str
    text: str
    # Per-record budget from the file; None means generation.max_new_tokens.
    max_new_tokens: Optional[int] = None

    def budget(self, default: int) -> int:
        return self.max_new_tokens or default


def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "jsonl" if path.endswith((".jsonl", ".json")) else "txt"


def parse_jsonl_record(line: str, index: int, where: str, prompt_field: str, id_field: str) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(prompt_field), str):
        raise ConfigError(f"{where}: needs a string field '{prompt_field}' (dataset.prompt_field)")
    budget = record.get("max_new_tokens")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise ConfigError(f"{where}: max_new_tokens={budget!r} must be an integer >= 1")
    return Prompt(index, str(record.get(id_field, index)), record[prompt_field], budget)


def parse_prompts(lines: Iterable[str], fmt: str, source: str, prompt_field: str = "prompt",
                  id_field: str = "id", limit: Optional[int] = None) -> list[Prompt]:
    """Blank lines are skipped; ids default to the record's position and must be unique."""
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for line_no, line in enumerate(lines, start=1):
        if limit is not None and len(prompts) >= limit:
            break
        if not line.strip():
            continue
        index, where = len(prompts), f"{source}:{line_no}"
        if fmt == "jsonl":
            prompt = parse_jsonl_record(line, index, where, prompt_field, id_field)
        else:
            prompt = Prompt(index, str(index), line.rstrip("\n"))
        if prompt.id in seen:
            raise ConfigError(f"{where}: id {prompt.id!r} repeats the id at record {seen[prompt.id]}")
        seen[prompt.id] = index
        prompts.append(prompt)
    return prompts


def read_prompts(cfg: DatasetConfig) -> list[Prompt]:
    path = Path(cfg.path)
    if not path.is_file():
        raise ConfigError(f"dataset.path={cfg.path!r} is not a file; give a .jsonl or .txt prompts file")
    with path.open(encoding="utf-8") as lines:
        return parse_prompts(lines, detect_format(cfg.path, cfg.format), cfg.path,
                             cfg.prompt_field, cfg.id_field, cfg.limit)
