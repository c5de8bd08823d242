"""What decides a job's completions, so that a rerun finds the work it may reuse.

A job is its settings: everything that decides a completion, flat as `key: value` so a rerun with
other settings can say what changed (`generation.max_new_tokens: 8 -> 16`). The model by its content:
the files that make its outputs (weights, configs, tokenizer, remote code; not a README or a .git
folder), by name and digest, not how its path is spelled; its dtype, attention and quantization; the
sampling settings and budgets; the too-long policy; the assistant (model.assistant and its
settings, when one is set). How the work is batched or placed (batch size, scheduler, layout,
launcher, world size) is left out: it must not change a completion, and a restart with a smaller
batch after running out of memory must find the earlier work. What a record holds besides its completion
(output.columns, output.keep_prompt) is part of the settings where it is not the default, so that one job's
records all have one shape.

The prompts are not part of the settings: each record is resumed on its own, by its index and a
digest of the record (distgen/inputs/keys.py), so a grown dataset runs only its new rows. The job
fingerprint (settings and the dataset's digest) only says whether a folder holds this very job,
finished. The finished work itself is read from the output shards (distgen/outputs/shards.py).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch.distributed as dist

from distgen.config import DatasetConfig, GenerationConfig, ModelConfig, RunConfig, adapter_folders
from distgen.engine.sampling import DRAW
from distgen.inputs.grammar import job_grammar
from distgen.models.lora import ADAPTER_FILES

# Files up to this size are hashed whole (configs, tokenizers); larger ones (weights) by sampling.
WHOLE_FILE_BYTES = 16 * 1024 * 1024
SAMPLE_BYTES = 1024 * 1024
# Generation settings that decide how work is batched and run, not what is generated (`cache` stays
# in: a quantized KV cache changes the tokens).
BATCHING_KEYS = ("batch_size", "memory_fraction", "scheduler", "mixed_steps", "compile", "compile_mode", "compile_cache_dir",
                 "prefill_chunk_tokens", "sync_every", "cpu_kernels", "prefix_sharing", "attention")
# Generation settings added after jobs were first fingerprinted, with their default: part of the settings only
# when set otherwise, so an earlier job keeps its fingerprint and its outputs are still found.
LATER_KEYS = {"n": 1, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0,
              "min_tokens": 0, "stop": [], "stop_token_ids": [], "logit_bias": {}, "ignore_eos": False, "logprobs": None,
              "prompt_logprobs": None, "max_logprobs": 20,
              "json_schema": None, "regex": None, "choice": None}
# Assisted generation's settings: part of the fingerprint only with a model.assistant (see `assistant_identity`).
ASSISTANT_KEYS = ("num_assistant_tokens", "assistant_schedule", "assistant_confidence_threshold",
                  "prompt_lookup_ngram")
# The files of a model (or tokenizer) folder that decide its outputs, by name (the folder's top level, where
# from_pretrained reads them): weights and their index, configs, tokenizer files, remote code.
OUTPUT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json", "config.json", "generation_config.json",
                "quant*config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*",
                "merges.txt", "*.model", "*.tiktoken", "chat_template*", "*.py")
DIGEST_CHARS = 16


def file_digest(path: Path) -> str:
    """sha256 of a small file; of a large one its size, its head (a safetensors header lists every
    tensor's name, dtype, shape and offsets) and samples from its middle and end."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= WHOLE_FILE_BYTES:
            digest.update(f.read())
        else:
            for offset in (0, size // 2, size - SAMPLE_BYTES):
                f.seek(offset)
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:DIGEST_CHARS]


def output_files(folder: str, patterns: tuple[str, ...] = OUTPUT_FILES) -> list[Path]:
    """The files of `folder` that decide a model's outputs (see OUTPUT_FILES)."""
    return [p for p in sorted(Path(folder).iterdir()) if p.is_file() and not p.name.startswith(".")
            and any(fnmatch.fnmatch(p.name, pattern) for pattern in patterns)]


def folder_digest(folder: str, patterns: tuple[str, ...] = OUTPUT_FILES) -> dict[str, str]:
    """Each output-deciding file's digest by its name (other files come and go freely)."""
    return {p.name: file_digest(p) for p in output_files(folder, patterns)}


def adapter_identity(lora) -> dict[str, str]:
    """model.lora's adapters by their files' digests: `name[file]: digest` (flattened as model.lora.<name>[file])."""
    return {f"{name}[{file}]": digest for name, folder in adapter_folders(lora).items()
            for file, digest in folder_digest(folder, ADAPTER_FILES).items()}


def text_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]


def chat_identity(cfg: DatasetConfig) -> dict:
    """The chat settings that differ from the defaults (the rendered prompts are in each record's key; these keep a
    finished job from passing for one with another template): the template by its text's (or file's) digest."""
    found: dict[str, Any] = {}
    if cfg.chat_template is not None:
        path = Path(cfg.chat_template)
        found["chat_template"] = text_digest(path.read_bytes() if path.is_file() else cfg.chat_template.encode())
    if cfg.chat_template_kwargs:
        found["chat_template_kwargs"] = cfg.chat_template_kwargs
    if cfg.continue_final_message:
        found["continue_final_message"] = True
    return found


def model_identity(cfg: ModelConfig) -> dict:
    settings = {"source": cfg.source, "dtype": cfg.dtype, "attn_implementation": cfg.attn_implementation}
    if cfg.quantization != "none":  # quantized weights change the tokens
        settings["quantization"] = cfg.quantization
    if cfg.lora is not None:  # by name (which records choose) and files; merged (one folder) or swapped (several)
        settings["lora"] = adapter_identity(cfg.lora)
        settings["lora_merged"] = isinstance(cfg.lora, str)
    if cfg.source == "tiny":
        return {**settings, "tiny": asdict(cfg.tiny)}
    tokenizer = folder_digest(cfg.tokenizer_path) if cfg.tokenizer_path else {}
    return {**settings, "files": folder_digest(cfg.path), "tokenizer_files": tokenizer}


def assistant_identity(cfg: RunConfig) -> dict:
    """Who drafts and how, or {} without an assistant. Greedy rows get the same tokens whoever drafts, but a
    sampled row's tokens depend on the drafts (the accept rule draws other random numbers; the distribution
    stays). Whether a row samples is its own (a record's temperature), so the assistant always counts."""
    model = cfg.model
    if model.assistant == "none":
        return {}
    identity = {"name": model.assistant, **{key: getattr(cfg.generation, key) for key in ASSISTANT_KEYS}}
    if model.assistant == "tiny":
        identity["tiny"] = asdict(replace(model.tiny, seed=model.assistant_seed))
    if model.assistant == "draft":
        identity["files"] = folder_digest(model.assistant_path)
    return identity


# How a settings key names a file: `model.path[model.safetensors]` is that file's digest.
FILE_GROUPS = {"model.files": "model.path", "model.tokenizer_files": "model.tokenizer_path",
               "assistant.files": "model.assistant_path"}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings as `a.b.c: value`; a folder's files as `model.path[name]: digest`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if name in FILE_GROUPS:
            flat.update({f"{FILE_GROUPS[name]}[{file}]": digest for file, digest in value.items()})
        elif isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# What a record holds besides its completion, with the default that leaves it out of the settings (a job of an
# earlier distgen, which kept no columns, has the settings it had).
RECORD_SHAPE = {"columns": None, "keep_prompt": True}


def record_shape(cfg: RunConfig) -> dict[str, Any]:
    return {key: getattr(cfg.output, key) for key, default in RECORD_SHAPE.items()
            if getattr(cfg.output, key) != default}


def generation_settings(gen: GenerationConfig) -> dict[str, Any]:
    """generation.* that decides completions; a JSON schema by its content's digest, whether given as a file (so an
    edited file is another job, however its path is spelled) or inline."""
    generation = {k: v for k, v in asdict(gen).items() if k not in BATCHING_KEYS + ASSISTANT_KEYS
                  and not (k in LATER_KEYS and v == LATER_KEYS[k])}
    if gen.json_schema is not None:
        generation["json_schema"] = text_digest(job_grammar(gen).text.encode("utf-8"))
    if gen.do_sample and gen.temperature > 0:  # a job sampled by another draw is another job
        generation["draw"] = DRAW
    return generation


def job_settings(cfg: RunConfig) -> dict[str, Any]:
    """Everything that decides a completion (and a record's shape), flat (`generation.max_new_tokens: 32`), JSON
    values."""
    generation = generation_settings(cfg.generation)
    content = {"model": model_identity(cfg.model), "generation": generation,
               "dataset": {"too_long": cfg.dataset.too_long, **chat_identity(cfg.dataset)}}
    shape = record_shape(cfg)
    if shape:
        content["output"] = shape
    assistant = assistant_identity(cfg)
    if assistant:
        content["assistant"] = assistant
    return json.loads(json.dumps(flatten(content)))  # tuples as lists: as a manifest reads back


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:DIGEST_CHARS]


def job_fingerprint(cfg: RunConfig, dataset_digest: str) -> str:
    """This very job: its settings and its dataset's content (a finished one has nothing left to do)."""
    return settings_digest({"settings": job_settings(cfg), "prompts": dataset_digest})


def settings_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for each setting that differs (`(none)` where one side lacks it; a record shape key's
    default where one side leaves it out)."""
    defaults = {f"output.{key}": value for key, value in RECORD_SHAPE.items()}

    def show(settings: dict, key: str) -> str:
        if key in settings:
            return json.dumps(settings[key])
        return json.dumps(defaults[key]) if key in defaults else "(none)"
    return [f"{key}: {show(old, key)} -> {show(new, key)}" for key in sorted(old.keys() | new.keys())
            if old.get(key, ()) != new.get(key, ())]


def shared_done(finished: Optional[np.ndarray], is_coordinator: bool) -> np.ndarray:
    """Rank 0's finished records (a bool per (index, sample_index), distgen/outputs/samples.py), on every rank:
    all ranks must plan the same work even when their output folders are not one shared folder."""
    box = [(np.packbits(finished), len(finished)) if is_coordinator else None]
    dist.broadcast_object_list(box, src=0)
    packed, count = box[0]
    return np.unpackbits(packed, count=count).astype(bool)
