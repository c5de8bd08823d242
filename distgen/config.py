"""Typed run configuration.

The dataclasses are the schema Hydra composes the YAML groups in `distgen/configs/` into.
`RunConfig.check` checks every value after composition, before any process group exists.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from distgen.common.errors import ConfigError

MODEL_SOURCES = ("pretrained", "tiny")
DTYPES = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")
# jsonl, json (a JSON array), txt, csv, parquet: files; saved: a folder written by `datasets.save_to_disk`;
# folder: a local folder of data files `datasets.load_dataset` reads (never a download).
DATASET_FORMATS = ("auto", "jsonl", "json", "txt", "csv", "parquet", "saved", "folder")
OUTPUT_FORMATS = ("jsonl", "parquet")
# What a prompt that does not fit the model's context becomes.
TOO_LONG_POLICIES = ("error_record", "truncate_left", "fail")
# The engine's name tables: schedulers are distgen.engine.scheduler.SCHEDULERS, KV caches
# distgen.engine.kv.CACHES, compile policies distgen.engine.build.COMPILE; `GenerationConfig.check` reads them.
# torch.autocast around the engine's forwards (for fp32 checkpoints): the name -> dtype table is
# distgen.engine.runner.AUTOCAST_DTYPES.
AUTOCAST_NAMES = ("none", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
# Assisted (speculative) generation: who proposes draft tokens (distgen/engine/assist.py checks it matches
# ASSISTANTS): none, a tiny random draft (tests), n-gram prompt lookup (no model), a draft model folder.
ASSISTANT_NAMES = ("none", "tiny", "prompt_lookup", "draft")
ASSISTANT_SCHEDULES = ("constant", "heuristic")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def require_choice(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    require(value in choices, key, value, "expected one of " + ", ".join(choices))


@dataclass
class TinyModelConfig:
    """A random-init Llama built in memory; every rank builds the same weights from `seed`."""

    layers: int = 2
    hidden_size: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    init_std: float = 0.2
    seed: int = 0

    def check(self) -> None:
        for key in ("layers", "hidden_size", "heads", "kv_heads", "intermediate_size"):
            value = getattr(self, key)
            require(value >= 1, f"model.tiny.{key}", value, "must be >= 1")
        require(self.hidden_size % self.heads == 0, "model.tiny.hidden_size", self.hidden_size,
                f"must be a multiple of model.tiny.heads={self.heads}")
        require(self.heads % self.kv_heads == 0, "model.tiny.kv_heads", self.kv_heads,
                f"must divide model.tiny.heads={self.heads}")


@dataclass
class ModelConfig:
    source: str = "pretrained"
    path: Optional[str] = None
    tokenizer_path: Optional[str] = None
    dtype: str = "auto"
    attn_implementation: str = "auto"
    trust_remote_code: bool = False
    # Quantized weights: a name in the quantizer table (distgen/models/quantizers); none keeps model.dtype.
    quantization: str = "none"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    # Assisted generation: none | tiny (a random-init draft built like model=tiny with assistant_seed) |
    # prompt_lookup (n-gram matches in the prompt and generated text) | draft (a model folder: assistant_path).
    assistant: str = "none"
    assistant_path: Optional[str] = None
    assistant_seed: int = 1

    def check(self) -> None:
        require_choice("model.source", self.source, MODEL_SOURCES)
        require_choice("model.dtype", self.dtype, DTYPES)
        require_choice("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        if self.source == "pretrained":
            require(bool(self.path), "model.path", self.path,
                    "model.source=pretrained needs model.path=<local model folder> "
                    "(or model=tiny for a random-init test model)")
        require_choice("model.assistant", self.assistant, ASSISTANT_NAMES)
        require(self.assistant != "draft" or bool(self.assistant_path), "model.assistant_path", self.assistant_path,
                "model.assistant=draft needs model.assistant_path=<local draft model folder>")
        require(self.assistant == "draft" or self.assistant_path is None, "model.assistant_path",
                self.assistant_path, f"only model.assistant=draft reads it (model.assistant={self.assistant})")


@dataclass
class LayoutConfig:
    """Base of every layout's settings; each layout in distgen/parallel/layouts/ derives its own and
    registers it, and `layout=<name>` selects it."""
    name: str = "replicate"

    def check(self) -> None:
        """Each layout's own value checks (its name is checked against the layout table)."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    # Most sequences decoded together on a rank: an integer >= 1, or "auto": the most rows whose KV cache
    # and activations fit memory_fraction of the free device memory (host RAM on CPU); None: the device's
    # default (auto on CUDA, 4 on CPU: distgen.engine.build.DEVICE_DEFAULTS).
    batch_size: Any = None
    # Share of the free device memory (available RAM on CPU, split among the host's ranks) that
    # batch_size=auto and cache=auto plan the KV cache and activations into.
    memory_fraction: float = 0.8
    # Who joins the batch: static (a new batch once all rows are done), continuous (a free row is
    # refilled at once), chunked (prompts prefilled in chunks of prefill_chunk_tokens between decode steps).
    scheduler: str = "continuous"
    # continuous/chunked: the running rows decode in the same forward that admits (or chunks) prompts, where
    # the cache packs both (the varlen slot cache; not with model.assistant); false: a prefill forward pauses them.
    mixed_steps: bool = True
    # KV cache: auto or a name in distgen.engine.kv.CACHES (dynamic, static, sliding_window, quantized,
    # offloaded); auto: sliding_window when the model has one, quantized (offloaded on CUDA) when the KV
    # cache of batch_size rows does not fit the memory budget, static when compiling or chunking, else dynamic.
    cache: str = "auto"
    # cache=quantized: int8 (distgen's int8 slots), fp8, quanto or hqq (transformers' quantized caches);
    # bits: None takes the backend's default; residual_length: recent tokens kept unquantized (quanto, hqq).
    cache_quant_backend: str = "int8"
    cache_quant_bits: Optional[int] = None
    cache_residual_length: int = 128
    # torch.compile of the decode step: a name in distgen.engine.build.COMPILE: auto (when the job is big
    # enough to repay it), on, off.
    compile: str = "auto"
    compile_mode: str = "default"
    # Where compiled kernels persist across runs (default: $TORCHINDUCTOR_CACHE_DIR or ~/.cache/distgen/inductor).
    compile_cache_dir: Optional[str] = None
    # Run the engine's forwards under torch.autocast in bf16 or fp16 (an fp32 checkpoint computing in half
    # precision; on CPU without bf16 instructions this is slower than fp32); none: the weights' dtype.
    autocast: str = "none"
    # CPU kernels: a name in distgen.backends.cpu.kernels.CPU_KERNELS: auto (distgen's AVX2 kernels where they
    # can run: CPU, fp32; the packed linear and fused norms/MLPs not sharded or compiled; the slot cache's
    # decode attention and key/value writes), distgen (a config error where they cannot), torch.
    cpu_kernels: str = "auto"
    # Most prompt tokens one prefill forward runs (chunked splits prompts to fit; a slot cache packs prompts up to
    # it); None: the device's default (8192 on CUDA, 512 on CPU: distgen.engine.build.DEVICE_DEFAULTS).
    prefill_chunk_tokens: Optional[int] = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    # None: the model's own EOS ids; [] never stops early.
    eos_token_ids: Optional[list[int]] = None
    # Lockstep layouts: all-reduce "any rank still has work" every this many steps (idle ranks
    # keep joining forwards in between); 1 checks every step.
    sync_every: int = 1
    # Assisted generation (model.assistant): draft tokens proposed per round (the start value with the
    # heuristic schedule: +2 after a fully accepted round, -1 otherwise, per sequence, at least 1).
    num_assistant_tokens: int = 5
    assistant_schedule: str = "constant"
    # A draft model stops drafting a sequence once its token's probability falls below this (None: never).
    assistant_confidence_threshold: Optional[float] = None
    # Prompt lookup: the longest n-gram matched (then shorter ones, down to 1).
    prompt_lookup_ngram: int = 3

    def check(self) -> None:
        require(self.max_new_tokens >= 1, "generation.max_new_tokens", self.max_new_tokens, "must be >= 1")
        require(self.batch_size in (None, "auto") or (type(self.batch_size) is int and self.batch_size >= 1),
                "generation.batch_size", self.batch_size, "expected auto or an integer >= 1 (null: the device's default)")
        require(0 < self.memory_fraction <= 1, "generation.memory_fraction", self.memory_fraction, "must be in (0, 1]")
        require(self.sync_every >= 1, "generation.sync_every", self.sync_every, "must be >= 1")
        from distgen.engine.scheduler import SCHEDULERS  # the engine imports this module

        require_choice("generation.scheduler", self.scheduler, SCHEDULERS.names())
        from distgen.engine.kv import check_cache_settings  # the cache table imports this module
        check_cache_settings(self)
        from distgen.engine.build import COMPILE  # the engine imports this module
        require_choice("generation.compile", self.compile, COMPILE.names())
        require_choice("generation.compile_mode", self.compile_mode, COMPILE_MODES)
        require_choice("generation.autocast", self.autocast, AUTOCAST_NAMES)
        from distgen.backends.cpu.kernels import CPU_KERNELS  # the engine imports this module
        require_choice("generation.cpu_kernels", self.cpu_kernels, CPU_KERNELS.names())
        require(self.prefill_chunk_tokens is None or self.prefill_chunk_tokens >= 1, "generation.prefill_chunk_tokens",
                self.prefill_chunk_tokens, "must be >= 1 (or null: the device's default)")
        require(not (self.scheduler == "chunked" and self.cache == "dynamic"), "generation.cache", self.cache,
                "generation.scheduler=chunked needs a slot cache: static, sliding_window or auto")
        require(not (self.compile == "on" and self.cache == "dynamic"), "generation.cache", self.cache,
                "generation.compile=on needs a fixed-shape cache: static, sliding_window or auto")
        require(self.temperature > 0, "generation.temperature", self.temperature, "must be > 0")
        require(self.top_k >= 0, "generation.top_k", self.top_k, "must be >= 0 (0 disables top-k)")
        require(0 < self.top_p <= 1, "generation.top_p", self.top_p, "must be in (0, 1]")
        require(self.num_assistant_tokens >= 1, "generation.num_assistant_tokens", self.num_assistant_tokens,
                "must be >= 1")
        require_choice("generation.assistant_schedule", self.assistant_schedule, ASSISTANT_SCHEDULES)
        threshold = self.assistant_confidence_threshold
        require(threshold is None or 0 <= threshold < 1, "generation.assistant_confidence_threshold", threshold,
                "must be in [0, 1) or null")
        require(self.prompt_lookup_ngram >= 1, "generation.prompt_lookup_ngram", self.prompt_lookup_ngram,
                "must be >= 1")


@dataclass
class DatasetConfig:
    path: Optional[str] = None
    format: str = "auto"
    prompt_field: str = "prompt"
    id_field: str = "id"
    # A column of chat messages ([{role, content}, ...]) rendered with the tokenizer's chat
    # template (add_generation_prompt); when set, it is used instead of prompt_field.
    messages_field: Optional[str] = None
    # The split to take from a saved DatasetDict or a local dataset folder.
    split: str = "train"
    limit: Optional[int] = None
    # Shuffle the records with this seed before `limit` applies; None keeps file order.
    shuffle_seed: Optional[int] = None
    # A prompt whose tokens plus budget exceed the model's context: an error record (the job goes
    # on), its oldest tokens dropped to fit, or a config error before any worker starts.
    too_long: str = "error_record"

    def check(self) -> None:
        require(bool(self.path), "dataset.path", self.path,
                "give dataset=<prompts file (.jsonl .txt .csv .parquet) or dataset folder>")
        require_choice("dataset.format", self.format, DATASET_FORMATS)
        require_choice("dataset.too_long", self.too_long, TOO_LONG_POLICIES)
        require(self.limit is None or self.limit >= 0, "dataset.limit", self.limit, "must be >= 0")


@dataclass
class OutputConfig:
    dir: str = "outputs"
    print_table: bool = True
    # Each rank logs its progress this often (seconds); 0 turns it off.
    progress_every_s: float = 30.0
    # Skip prompts an earlier run of the same job finished into this output.dir.
    resume: bool = True
    # Shards under output.dir/outputs/: part-RRRRR-NNNNN.jsonl or .parquet.
    format: str = "jsonl"
    # Records per shard; a rank starts a new shard once its current one holds this many.
    shard_size: int = 10000
    # Also write outputs.jsonl in dataset order by a streaming k-way merge of the shards.
    merge: bool = True
    # Each rank samples its memory and counters this often (seconds) for the report.
    sample_every_s: float = 1.0
    # Write report.html (memory and throughput over time, length histograms) next to stats.json.
    report: bool = True

    def check(self) -> None:
        require(self.progress_every_s >= 0, "output.progress_every_s", self.progress_every_s, "must be >= 0")
        require_choice("output.format", self.format, OUTPUT_FORMATS)
        require(self.shard_size >= 1, "output.shard_size", self.shard_size, "must be >= 1")
        require(self.sample_every_s > 0, "output.sample_every_s", self.sample_every_s, "must be > 0")


@dataclass
class LauncherConfig:
    """Base of every launcher's settings; each launcher in distgen/launchers/ derives its own
    and registers it, and `launcher=<name>` selects it."""
    name: str = "none"

    def check(self) -> None:
        """Each launcher's own value checks (its name is checked against the launcher table)."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    device: str = "auto"

    def check(self) -> "RunConfig":
        # The tables import this module, so they are imported here, not at the top.
        from distgen.launchers import LAUNCHERS
        from distgen.parallel.layouts import LAYOUTS
        from distgen.engine.kv import check_cache_device
        from distgen.models.quantizers import check_quantization
        from distgen.models.quantizers.base import target_device

        require_choice("device", self.device, DEVICES)
        LAYOUTS.check_selected(self.layout)
        needs = LAYOUTS.get(self.layout.name).needs
        require(needs is None or importlib.util.find_spec(needs) is not None, "layout", self.layout.name,
                f"it needs the {needs} package, which is not installed here (pip install {needs})")
        LAUNCHERS.check_selected(self.launcher)
        for part in (self.model, self.model.tiny, self.layout, self.generation, self.dataset, self.output,
                     self.launcher):
            part.check()
        check_quantization(self)
        check_cache_device(self.generation, target_device(self.device))
        require(self.generation.autocast == "none" or self.model.dtype in ("auto", "fp32"), "generation.autocast",
                self.generation.autocast, f"autocast is for fp32 weights, but model.dtype={self.model.dtype}; "
                "use generation.autocast=none (or model.dtype=fp32)")
        return self
