"""distgen from Python:

    import distgen
    records = distgen.generate(["The capital of France is", "def fibonacci(n):"], model="/models/qwen",
                               overrides=["generation.max_new_tokens=64"])
    for record in distgen.read_outputs("out/"): ...

`generate` runs the same job the command line runs, with the same checks and errors (a `ConfigError` naming the
bad key or value): launcher=none (the default) runs it in this process as one rank; any other launcher starts its
ranks as `python -m distgen.launch` would and waits for them.

Its lines go to the `distgen` logger: where the host application configured logging (a handler on the root
logger), they reach the host's handlers at the host's levels and distgen adds no handler; where it did not,
distgen's own handler shows them during the call, as the command line would (output.log_level), and is removed
after it (distgen/common/log.py).
"""
from __future__ import annotations

import heapq
import json
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from distgen.common import log
from distgen.common.errors import ConfigError
from distgen.catalog.load import load_config, split_job_file
from distgen.common.hub import names_hub_id
from distgen.inputs.records import json_value
from distgen.launch import launch_job
from distgen.run import quiet_as_override
from distgen.outputs.samples import record_order
from distgen.outputs.shards import MERGED_FILE, OPEN_SUFFIX, list_shards, read_jsonl_lines, read_manifest, read_shard

Prompts = Union[str, os.PathLike, Sequence[str], Sequence[dict], Any]  # Any: a datasets.Dataset


class JobFailed(RuntimeError):
    """The job started but did not finish (a rank failed): its finished records stay in output.dir."""


def override_keys(overrides: Sequence[str]) -> set[str]:
    return {o.lstrip("+").partition("=")[0] for o in overrides}


def write_prompts(prompts: Prompts, folder: Path) -> str:
    """`dataset=` for `prompts`: a path as given; a datasets.Dataset saved to disk; a list of strings or of
    records (the JSON-lines fields; numpy, pandas and datetime values as the Arrow readers give them) written as
    JSON lines, one per item, in order."""
    if isinstance(prompts, (str, os.PathLike)):
        path = os.fspath(prompts)
        if not os.path.exists(path) and not names_hub_id(path):
            raise ConfigError(f"prompts={path!r} is not allowed: not a file or folder here ({os.getcwd()}), nor a hub "
                              f"dataset id (org/name); one prompt is passed as a list: prompts=[{path!r}]")
        return path
    if hasattr(prompts, "save_to_disk"):
        prompts.save_to_disk(str(folder / "prompts"))
        return str(folder / "prompts")
    items = list(prompts)
    if not items:
        raise ConfigError("prompts=[] is not allowed: give at least one prompt")
    if all(isinstance(item, str) for item in items):
        records = [{"prompt": text} for text in items]
    elif all(isinstance(item, dict) for item in items):
        records = items
    else:
        kinds = sorted({type(item).__name__ for item in items})
        raise ConfigError(f"prompts is not allowed: a list of strings or of records (dicts), not of {', '.join(kinds)}")
    path = folder / "prompts.jsonl"
    # Values JSON has no form for (numpy numbers, pandas timestamps, dates, bytes: a DataFrame's to_dict("records"))
    # as the Arrow readers give them (docs/inputs.md, "Input columns"): numbers, ISO 8601 text, base64.
    lines = (json.dumps(json_value(record, f"prompts[{k}]", "record"), ensure_ascii=False) + "\n"
             for k, record in enumerate(records))
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


def chat_records(prompts: Prompts) -> bool:
    """A list of records of chat messages: each has `messages` and none a `prompt`."""
    return (isinstance(prompts, (list, tuple)) and bool(prompts) and all(isinstance(p, dict) for p in prompts)
            and all("messages" in p and "prompt" not in p for p in prompts))


def generate(prompts: Prompts, model: Optional[str] = None, overrides: Sequence[str] = ()) -> list[dict]:
    """Generate a completion for every prompt; returns the output records in input order.

    prompts: a list of strings, a list of records with the JSON-lines fields (`prompt` or `messages`, `id`,
    `max_new_tokens`, `temperature`, `stop`, ...), a path to a prompts file or folder, or a `datasets.Dataset`.
    Records of `messages` (and no `prompt`) are chat records: dataset.messages_field=messages unless given.
    model: a model folder, a hub id in the local Hugging Face cache (`org/name`), or `tiny`; the same as `model=...`
    among the overrides.
    overrides: the command line's `key=value` strings (and, as there, `--quiet` and a job file: `--config-dir DIR`,
    `--config-name NAME`). Without `output.dir=`, the job writes to a temporary folder
    that is removed once its records are read; with one, the outputs stay there (and a rerun resumes).
    """
    if isinstance(overrides, str):
        raise ConfigError(f"overrides={overrides!r} is not allowed: a list of the command line's key=value strings, "
                          f"e.g. overrides=[{overrides!r}]")
    overrides = list(overrides)
    keys = override_keys(overrides)
    if "dataset" in keys or "dataset.path" in keys:
        raise ConfigError("dataset= is not allowed among the overrides of distgen.generate: pass the prompts")
    if model is not None and keys & {"model", "model.path"}:
        raise ConfigError(f"model= is not allowed among the overrides of distgen.generate when model={model!r} is "
                          "given: name the model once")
    with ExitStack() as stack:
        stack.enter_context(log.for_api())
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="distgen-")))
        args = [f"dataset={write_prompts(prompts, folder)}"]
        if model is not None:
            args.append(f"model={model}")
        if "output.dir" not in keys:
            args.append(f"output.dir={folder / 'out'}")
        if chat_records(prompts) and not keys & {"dataset.messages_field", "dataset.prompt_field"}:
            args.append("dataset.messages_field=messages")
        args += overrides
        try:
            out_dir = run(args)
        except JobFailed as err:
            if "output.dir" in keys:
                raise
            raise JobFailed(f"{str(err).partition(';')[0]} (its lines above say why); without output.dir= its "
                            "temporary folder is removed: give output.dir=<folder> to keep a failed job's finished "
                            "records and resume it") from None
        return list(read_outputs(out_dir))


def run(args: list[str]) -> Path:
    """Run a job from command-line arguments; its output folder. Raises ConfigError or JobFailed."""
    overrides, job_file = split_job_file(quiet_as_override(args))
    flags = [arg for arg in overrides if arg.startswith("-")]
    if flags:
        raise ConfigError(f"overrides: {flags[0]!r} is not allowed: distgen.generate takes the command line's key=value "
                          "overrides, --quiet (-q) and a job file (--config-dir DIR --config-name NAME); "
                          "--check, --print-config and --help are `python -m distgen.launch`'s")
    cfg = load_config(overrides, job_file=job_file)
    log.configure(cfg.output.log_level)  # nothing where the host application configured logging
    out_dir = Path(cfg.output.dir)
    status = launch_job(cfg, overrides, job_file)
    if status != 0:
        raise JobFailed(f"the job exited with status {status}; its finished records stay in {out_dir} "
                        "(run it again with the same output.dir to resume)")
    return out_dir


def read_outputs(output_dir: Union[str, os.PathLike]) -> Iterator[dict]:
    """Every record of a finished or partial job in `output_dir`, in dataset order, a prompt's samples
    (generation.n) by sample_index (each (index, sample_index) once: a record an interrupted run wrote twice is
    read once); distgen's records, also where outputs.jsonl holds another form (output.merge_format=openai_batch:
    then they are read from the shards)."""
    out_dir = Path(output_dir)
    manifest = read_manifest(out_dir)
    merged = out_dir / MERGED_FILE
    distgen_form = manifest.get("merge_format", "distgen") == "distgen"
    if manifest.get("complete") and manifest.get("merged") and merged.is_file() and distgen_form:
        yield from read_jsonl_lines(merged)
        return
    shards = list_shards(out_dir)
    if not shards and (not merged.is_file() or not distgen_form):
        raise ConfigError(f"output_dir={os.fspath(output_dir)!r} holds no distgen outputs (no shards under outputs/)")
    streams = [sorted(read_shard(p), key=record_order) if p.name.endswith(OPEN_SUFFIX) else read_shard(p)
               for p in shards]
    last = None
    for record in heapq.merge(*streams, key=record_order):
        order = record_order(record)
        if order != last:
            yield record
        last = order
