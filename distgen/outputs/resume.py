"""What an earlier run of the same job already finished, so a restart skips it.

A job is identified by a fingerprint of everything that decides its completions: the model by
its content (the files in its folder, not how its path is spelled) and its weight quantization, the sampling settings and
budgets, the too-long policy, the assistant (model.assistant and its settings, when one is set)
and the content of the prompts (a digest of the dataset's records, see `PromptSource.digest`).
How the work is batched or placed (batch size, scheduler, layout, launcher, world size) is left out: it must not change a completion, and a restart with a smaller
batch after running out of memory must find the earlier work. The finished work itself is read
from the output shards (distgen/outputs/shards.py), whose manifest names the job.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch.distributed as dist

from distgen.config import ModelConfig, RunConfig

# Files up to this size are hashed whole (configs, tokenizers); larger ones (weights) by sampling.
WHOLE_FILE_BYTES = 16 * 1024 * 1024
SAMPLE_BYTES = 1024 * 1024
# Generation settings that decide how work is batched and run, not what is generated (`cache` stays
# in: a quantized KV cache changes the tokens).
BATCHING_KEYS = ("batch_size", "memory_fraction", "scheduler", "mixed_steps", "compile", "compile_mode", "compile_cache_dir",
                 "prefill_chunk_tokens", "sync_every", "cpu_kernels")
# Assisted generation's settings: part of the fingerprint only with a model.assistant (see `assistant_identity`).
ASSISTANT_KEYS = ("num_assistant_tokens", "assistant_schedule", "assistant_confidence_threshold",
                  "prompt_lookup_ngram")


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
    return digest.hexdigest()


def folder_digest(folder: str) -> dict[str, str]:
    """Each file's digest by its name inside the folder (hidden files and folders left out)."""
    root = Path(folder)
    return {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def model_identity(cfg: ModelConfig) -> dict:
    settings = {"source": cfg.source, "dtype": cfg.dtype, "attn_implementation": cfg.attn_implementation}
    if cfg.quantization != "none":  # quantized weights change the tokens; unquantized jobs keep their fingerprint
        settings["quantization"] = cfg.quantization
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


def job_fingerprint(cfg: RunConfig, dataset_digest: str) -> str:
    generation = {k: v for k, v in asdict(cfg.generation).items() if k not in BATCHING_KEYS + ASSISTANT_KEYS}
    content = {"model": model_identity(cfg.model), "generation": generation, "too_long": cfg.dataset.too_long,
               "prompts": dataset_digest}
    assistant = assistant_identity(cfg)
    if assistant:  # without one, a job keeps the fingerprint it had before assistants existed
        content["assistant"] = assistant
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def shared_skip(finished: set[int], is_coordinator: bool) -> frozenset[int]:
    """Rank 0's finished prompts, on every rank: all ranks must plan the same work even when their
    output folders are not one shared folder."""
    box = [sorted(finished) if is_coordinator else None]
    dist.broadcast_object_list(box, src=0)
    return frozenset(box[0])
