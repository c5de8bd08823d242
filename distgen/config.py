"""Typed run configuration: the schema Hydra composes the YAML groups in `configs/` into.

Each part's `check` checks its own values (ranges, and rules among its own fields). Names (a layout, a cache, a
dtype) are checked against the implementations' name tables by the catalog (distgen/catalog), which also runs
the rules an implementation states about the rest of the config: this module imports nothing of distgen's
above `common/`, and loading it pulls in no torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Optional

from distgen.common.checks import require

# The length table (distgen/parallel/feed.py) holds token counts as int32: a prompt plus its budget fit in it.
MAX_SEQUENCE_TOKENS = 2**31 - 1
# What torch.Generator.manual_seed takes without wrapping (it also takes negatives down to -2**63, as their
# two's complement, so -1 would be the same seed as 2**64 - 1): distgen allows 0 .. 2**64 - 1.
MAX_SEED = 2**64 - 1
# Logits are divided by the temperature in fp32: a smaller positive temperature rounds to 0 there.
MIN_TEMPERATURE = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny
# generation.n (and a record's n): completions per prompt.
MAX_SAMPLES = 65536
# vLLM's (and OpenAI's) ranges: presence and frequency penalties in [-2, 2], a logit bias in [-100, 100].
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
# Token ids are int64 on the device.
MAX_TOKEN_ID = 2**63 - 1
# Structured output: the keys that ask for a grammar (generation.* and a record's own; at most one of them).
GRAMMAR_KEYS = ("json_schema", "regex", "choice")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def seed_ok(value: Any) -> bool:
    return is_int(value) and 0 <= value <= MAX_SEED


# A LoRA adapter's name (model.lora={name: folder}, a record's `lora`): what a Hydra override key and peft's
# adapter names (module-dict keys) both take.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def named_adapters(lora: Any) -> Optional[dict[str, str]]:
    """model.lora's adapters chosen per record, {name: folder}: a mapping as given, a list by folder names;
    None for one folder (merged into the weights for every record) or none. Checked by ModelConfig.check."""
    if isinstance(lora, dict):
        return {str(name): folder for name, folder in lora.items()}
    if isinstance(lora, (list, tuple)):
        return {PurePath(str(folder)).name: folder for folder in lora}
    return None


def adapter_folders(lora: Any) -> dict[str, str]:
    """Every adapter folder of model.lora by name (one folder: named "default", peft's own name for it)."""
    if lora is None:
        return {}
    return named_adapters(lora) or {"default": lora}


def lora_problem(lora: Any) -> Optional[str]:
    """Why a model.lora value is not one adapter folder or adapters by name, or None."""
    if lora is None or isinstance(lora, str) and lora:
        return None
    if not isinstance(lora, (dict, list, tuple)) or not lora:
        return ("expected a LoRA adapter folder (saved by peft's save_pretrained), {name: folder, ...} or a list of "
                "folders (several: chosen per record by its `lora` field)")
    if any(not isinstance(folder, str) or not folder for folder in (lora.values() if isinstance(lora, dict) else lora)):
        return "every adapter is a folder (a non-empty string)"
    names = named_adapters(lora)
    if len(names) < len(lora):
        return "two folders of the list have the same name: name them with model.lora={name: folder, ...}"
    bad = [name for name in names if not ADAPTER_NAME.match(name)]
    if bad:
        return f"adapter name {bad[0]!r} is not letters, digits, _ and -: name it with model.lora={{name: folder}}"
    return None


# apply_chat_template's own arguments that distgen sets (or that change what it returns): not template variables.
CHAT_TEMPLATE_ARGUMENTS = ("conversation", "chat_template", "add_generation_prompt", "continue_final_message", "tokenize",
                           "padding", "truncation", "max_length", "return_tensors", "return_dict",
                           "return_assistant_tokens_mask", "tokenizer_kwargs")


def chat_kwargs_problem(kwargs: Any) -> Optional[str]:
    """Why a mapping of chat template variables (dataset.chat_template_kwargs, a record's) is not one, or None."""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        return "expected an object of template variables ({name: value, ...})"
    taken = [k for k in kwargs if k in CHAT_TEMPLATE_ARGUMENTS]
    if taken:
        return (f"{taken[0]!r} is an argument of apply_chat_template that distgen sets, not a template variable "
                "(dataset.chat_template and dataset.continue_final_message choose the template and how it ends)")
    return None


def samples_ok(value: Any) -> bool:
    """A count of completions per prompt (generation.n, a record's n)."""
    return is_int(value) and 1 <= value <= MAX_SAMPLES


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def temperature_ok(value: Any) -> bool:
    """0 (greedy, for a record) or a finite temperature fp32 can divide by."""
    return is_number(value) and (value == 0 or MIN_TEMPERATURE <= value < float("inf"))


def repetition_penalty_ok(value: Any) -> bool:
    """A finite penalty > 0 that fp32 can divide by (1 is off)."""
    return is_number(value) and MIN_TEMPERATURE <= value < float("inf")


def penalty_ok(value: Any) -> bool:
    """A presence or frequency penalty: in [-2, 2] (0 is off)."""
    return is_number(value) and -MAX_PENALTY <= value <= MAX_PENALTY


def min_p_ok(value: Any) -> bool:
    return is_number(value) and 0 <= value <= 1


def token_id_ok(value: Any) -> bool:
    return is_int(value) and 0 <= value <= MAX_TOKEN_ID


def token_ids_ok(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(token_id_ok(t) for t in value)


def logit_bias_ok(bias: Any) -> bool:
    """{token id: bias}: ids >= 0 (an integer, or its digits as a JSON key), each bias finite in [-100, 100]."""
    return isinstance(bias, dict) and all(
        token_id_ok(int(k) if isinstance(k, str) and k.isdigit() and k.isascii() else k) and is_number(v)
        and -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS for k, v in bias.items() if v is not None)


def regex_ok(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def choices_ok(value: Any) -> bool:
    """Structured output's choices: a non-empty list of non-empty strings."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(c, str) and c for c in value)


def logprobs_within(value: int, cap: int) -> bool:
    """`value` alternatives are allowed under generation.max_logprobs=`cap` (-1: no cap)."""
    return cap == -1 or value <= cap


def logprobs_ok(value: Any) -> bool:
    """How many alternatives each token's logprob comes with: an integer >= 0 (capped at the vocabulary)."""
    return is_int(value) and 0 <= value < MAX_SEQUENCE_TOKENS


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
    # A model folder (saved with save_pretrained), or a Hugging Face hub id (`org/name`) found in the local HF
    # cache (model=org/name); model.revision picks a branch, tag or commit of a hub id.
    path: Optional[str] = None
    revision: Optional[str] = None
    # Let a hub id missing from the cache be downloaded (never when HF_HUB_OFFLINE is set).
    allow_download: bool = False
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
    # LoRA adapters (peft folders; the peft package): one folder is merged into the weights at load, in every layout;
    # several, {name: folder, ...} or a list of folders (named by their folder names), are chosen per record by its
    # `lora` field (layout=replicate; a record without one runs the base model).
    lora: Any = None

    def check(self) -> None:
        problem = lora_problem(self.lora)
        require(problem is None, "model.lora", self.lora, problem or "")
        require(named_adapters(self.lora) is None or self.quantization == "none", "model.lora", self.lora,
                f"adapters chosen per record are swapped into the weights, which model.quantization="
                f"{self.quantization} quantizes: merge one adapter (model.lora=<folder>) or use model.quantization=none")
        if self.source == "pretrained":
            require(bool(self.path), "model.path", self.path,
                    "model.source=pretrained needs model=<model folder, or org/name in the Hugging Face cache> "
                    "(or model=tiny for a random-init test model)")
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
    # offloaded); auto: when the KV cache of batch_size rows does not fit the memory budget, sliding_window
    # (a model local in every layer, if its ring fits) or quantized (offloaded on CUDA); static when compiling,
    # chunking or for a sliding-window model whose window the sequences reach; else dynamic.
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
    # The slot cache's attention: auto (the first implementation that can run here; the engine line says which and
    # why) or a name in distgen.engine.kv.attention.ATTENTIONS (torch_sdpa, sdpa_folded, cuda_varlen,
    # varlen_reference, flash_attn, cpu_kernels), which must then run here.
    attention: str = "auto"
    # Most prompt tokens one prefill forward runs (chunked splits prompts to fit; a slot cache packs prompts up to
    # it); None: the device's default (8192 on CUDA, 512 on CPU: distgen.engine.build.DEVICE_DEFAULTS).
    prefill_chunk_tokens: Optional[int] = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    # Completions per prompt (a record's `n` overrides it): records with sample_index 0..n-1, each sample its own
    # seed stream (sample 0's is the one n=1 draws); the prompt is prefilled once and its KV copied to the samples'
    # rows (a slot cache). Greedy decoding gives n equal completions, as vLLM does.
    n: int = 1
    # Prompts sharing a prefix (a system prompt, few-shot examples) prefill it once: a prompt admitted while a
    # running one holds the same first tokens copies their KV into its own slot (a slot cache without a sliding
    # window, no model.assistant): a name in distgen.engine.prefix.PREFIX_SHARING: auto (prefixes of >= 64
    # tokens, where the cache can), on (the same; a config error where it cannot), off.
    prefix_sharing: str = "auto"
    # None: the model's own EOS ids; [] never stops early.
    eos_token_ids: Optional[list[int]] = None
    # vLLM's sampling knobs, with vLLM's semantics and order (distgen/engine/logits.py; docs/engine.md). Each is also
    # a per-record field (distgen/inputs/records.py OVERRIDES), which replaces the setting here for its record.
    # Every token already in the prompt or the completion: its logit divided by this when positive, multiplied
    # when negative (HF generate's repetition_penalty, and vLLM's); 1 is off.
    repetition_penalty: float = 1.0
    # Subtracted from the logit of every token the completion already holds: presence once, frequency once per
    # time it appears (OpenAI's definitions; the prompt does not count); in [-2, 2], 0 is off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Sampled rows keep only tokens whose probability (after temperature) is at least min_p times the most
    # likely token's; in [0, 1], 0 is off (greedy rows: no effect).
    min_p: float = 0.0
    # EOS and stop_token_ids are impossible (logit -inf) until the completion holds this many tokens.
    min_tokens: int = 0
    # Strings that end a completion where one first appears in its text (finish_reason "stop"; the string and what
    # follows are not kept), for every record without a `stop` of its own (vLLM's SamplingParams.stop).
    stop: list[str] = field(default_factory=list)
    # Token ids that end a completion besides EOS (finish_reason "stop"; the token is kept).
    stop_token_ids: list[int] = field(default_factory=list)
    # {token_id: bias}: added to those logits before anything else chooses (each bias in [-100, 100]).
    logit_bias: dict[int, float] = field(default_factory=dict)
    # EOS does not end a completion (stop_token_ids and stop strings still do).
    ignore_eos: bool = False
    # Each output record carries `logprobs`: per generated token its log-probability and the K most likely
    # tokens' (the model's raw logprobs, before penalties and temperature, as vLLM returns); null: none.
    logprobs: Optional[int] = None
    # Each output record carries `prompt_logprobs`: per prompt token its log-probability and the K most likely
    # tokens' at its position (the first token's entry null), as vLLM's prompt_logprobs; null: none. Such a prompt
    # is prefilled whole (no shared prefix).
    prompt_logprobs: Optional[int] = None
    # The most alternatives logprobs and prompt_logprobs may ask for, here or in a record (a record asking more gets an
    # error record), as vLLM's max_logprobs and OpenAI's top_logprobs cap: each alternative costs every step a
    # device->host copy and every token an output entry; -1: no cap but the vocabulary.
    max_logprobs: int = 20
    # Structured output (distgen/engine/grammar.py, xgrammar; docs/engine.md): every completion follows a JSON schema
    # (a schema file, or the schema inline), a regular expression, or is one of a list of choices; at most one of
    # the three. A record's own json_schema, regex or choice replaces it for that record. The grammar's end finishes
    # a completion with finish_reason "stop".
    json_schema: Any = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
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
        require(is_int(self.max_new_tokens) and 1 <= self.max_new_tokens < MAX_SEQUENCE_TOKENS,
                "generation.max_new_tokens", self.max_new_tokens,
                f"must be >= 1 and <= {MAX_SEQUENCE_TOKENS - 1} (a prompt plus its budget are counted in int32)")
        require(self.batch_size in (None, "auto") or (type(self.batch_size) is int and self.batch_size >= 1),
                "generation.batch_size", self.batch_size, "expected auto or an integer >= 1 (null: the device's default)")
        require(0 < self.memory_fraction <= 1, "generation.memory_fraction", self.memory_fraction, "must be in (0, 1]")
        require(self.sync_every >= 1, "generation.sync_every", self.sync_every, "must be >= 1")
        require(self.prefill_chunk_tokens is None or self.prefill_chunk_tokens >= 1, "generation.prefill_chunk_tokens",
                self.prefill_chunk_tokens, "must be >= 1 (or null: the device's default)")
        require(self.cache_residual_length >= 1, "generation.cache_residual_length", self.cache_residual_length,
                "must be >= 1")
        require(temperature_ok(self.temperature), "generation.temperature", self.temperature,
                f"must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE} (fp32's smallest normal number)")
        require(samples_ok(self.n), "generation.n", self.n, f"must be an integer in [1, {MAX_SAMPLES}]")
        require(seed_ok(self.seed), "generation.seed", self.seed, f"must be an integer in [0, {MAX_SEED}] "
                "(torch.Generator.manual_seed's range)")
        require(self.eos_token_ids is None or token_ids_ok(self.eos_token_ids),
                "generation.eos_token_ids", self.eos_token_ids, "must be null or a list of token ids >= 0")
        require(self.top_k >= 0, "generation.top_k", self.top_k, "must be >= 0 (0 disables top-k)")
        require(0 < self.top_p <= 1, "generation.top_p", self.top_p, "must be in (0, 1]")
        self.check_knobs()
        require(self.num_assistant_tokens >= 1, "generation.num_assistant_tokens", self.num_assistant_tokens,
                "must be >= 1")
        threshold = self.assistant_confidence_threshold
        require(threshold is None or 0 <= threshold < 1, "generation.assistant_confidence_threshold", threshold,
                "must be in [0, 1) or null")
        require(self.prompt_lookup_ngram >= 1, "generation.prompt_lookup_ngram", self.prompt_lookup_ngram,
                "must be >= 1")

    def check_knobs(self) -> None:
        """vLLM's sampling knobs: the ranges a record's own values are held to too (records.OVERRIDES)."""
        require(repetition_penalty_ok(self.repetition_penalty), "generation.repetition_penalty",
                self.repetition_penalty, f"must be a finite number >= {MIN_TEMPERATURE} (1 is off)")
        for key in ("presence_penalty", "frequency_penalty"):
            require(penalty_ok(getattr(self, key)), f"generation.{key}", getattr(self, key),
                    f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0 is off)")
        require(min_p_ok(self.min_p), "generation.min_p", self.min_p, "must be in [0, 1] (0 is off)")
        require(is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_new_tokens, "generation.min_tokens",
                self.min_tokens, f"must be an integer in [0, generation.max_new_tokens={self.max_new_tokens}]")
        require(isinstance(self.stop, (list, tuple)) and all(isinstance(v, str) and v for v in self.stop),
                "generation.stop", self.stop, "must be a list of non-empty strings")
        require(token_ids_ok(self.stop_token_ids), "generation.stop_token_ids", self.stop_token_ids,
                "must be a list of token ids >= 0")
        require(logit_bias_ok(self.logit_bias), "generation.logit_bias", self.logit_bias,
                f"must map token ids >= 0 to biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        require(is_int(self.max_logprobs) and (self.max_logprobs == -1 or logprobs_ok(self.max_logprobs)),
                "generation.max_logprobs", self.max_logprobs, "must be an integer >= 0, or -1 (no cap)")
        for key in ("logprobs", "prompt_logprobs"):
            value = getattr(self, key)
            require(value is None or logprobs_ok(value) and logprobs_within(value, self.max_logprobs),
                    f"generation.{key}", value, "must be null or an integer >= 0 (alternatives per token, capped at "
                    f"the vocabulary), at most generation.max_logprobs={self.max_logprobs}")
        self.check_grammar()

    def check_grammar(self) -> None:
        """Structured output's keys: their forms (a schema file is read, and each grammar compiled, by the catalog)."""
        given = [key for key in GRAMMAR_KEYS if getattr(self, key) is not None]
        if len(given) > 1:
            require(False, f"generation.{given[1]}", getattr(self, given[1]),
                    f"generation.{given[0]} is set too: give one of generation.json_schema, regex and choice")
        schema = self.json_schema
        require(schema is None or isinstance(schema, dict) or isinstance(schema, str) and schema.strip() != "",
                "generation.json_schema", schema, "expected a JSON schema file or the schema inline (an object)")
        require(self.regex is None or regex_ok(self.regex), "generation.regex", self.regex,
                "expected a regular expression (a non-empty string)")
        require(self.choice is None or choices_ok(self.choice), "generation.choice", self.choice,
                "expected a non-empty list of non-empty strings")
        require(not given or self.min_tokens == 0, "generation.min_tokens", self.min_tokens,
                f"must be 0 with generation.{given[0] if given else ''}: the grammar decides where a completion ends")


@dataclass
class DatasetConfig:
    path: Optional[str] = None
    format: str = "auto"
    prompt_field: str = "prompt"
    id_field: str = "id"
    # A column of chat messages ([{role, content}, ...]) rendered with the tokenizer's chat
    # template (add_generation_prompt); when set, it is used instead of prompt_field.
    messages_field: Optional[str] = None
    # The chat template instead of the tokenizer's: a template file (Jinja text, or a chat_template.json), the
    # template itself, or the name of one of the tokenizer's templates.
    chat_template: Optional[str] = None
    # Extra variables for the chat template (apply_chat_template's kwargs, e.g. {enable_thinking: false}); a
    # record's own `chat_template_kwargs` (an object) adds to them. null: none.
    chat_template_kwargs: Any = None
    # Continue the last (assistant) message instead of starting a new one: no generation prompt, the final
    # message left open (transformers' apply_chat_template continue_final_message).
    continue_final_message: bool = False
    # The split to take from a saved DatasetDict or a hub dataset.
    split: str = "train"
    # A hub dataset (dataset=org/name, read from the Hugging Face cache, as a model id is): its revision (a
    # branch, tag or commit; null: main), its subset (the dataset's config name; null: its default), and
    # whether it may be downloaded when it is not cached (never while HF_HUB_OFFLINE is set).
    revision: Optional[str] = None
    subset: Optional[str] = None
    allow_download: bool = False
    limit: Optional[int] = None
    # Shuffle the records with this seed before `limit` applies; None keeps file order.
    shuffle_seed: Optional[int] = None
    # A prompt whose tokens plus budget exceed the model's context: an error record (the job goes
    # on), its oldest tokens dropped to fit, or a config error before any worker starts.
    too_long: str = "error_record"

    def check(self) -> None:
        require(bool(self.path), "dataset.path", self.path,
                "give dataset=<prompts file (.jsonl .json .txt .csv .parquet) or dataset folder> "
                "(dataset=demo runs the bundled demo prompts)")
        require(self.limit is None or self.limit >= 0, "dataset.limit", self.limit, "must be >= 0")
        require(self.shuffle_seed is None or (is_int(self.shuffle_seed) and self.shuffle_seed >= 0),
                "dataset.shuffle_seed", self.shuffle_seed, "must be null or an integer >= 0")
        chat = self.chat_template is not None or self.chat_template_kwargs or self.continue_final_message
        require(bool(self.messages_field) or not chat, "dataset.messages_field", self.messages_field,
                "dataset.chat_template, chat_template_kwargs and continue_final_message render chat records: "
                "give dataset.messages_field=<column of messages>")
        require(self.chat_template is None or bool(self.chat_template.strip()), "dataset.chat_template",
                self.chat_template, "expected a template file, the template itself or a template's name")
        kwargs = self.chat_template_kwargs
        require(kwargs is None or chat_kwargs_problem(kwargs) is None, "dataset.chat_template_kwargs", kwargs,
                f"{chat_kwargs_problem(kwargs)} (null: none)")


@dataclass
class OutputConfig:
    dir: str = "outputs"
    print_table: bool = True
    # The lowest level of distgen's lines shown: a name in distgen.common.log.LOG_LEVELS (debug, info, warning,
    # error); --quiet is warning. Info and debug go to stdout, warnings and errors to stderr.
    log_level: str = "info"
    # Each rank logs its progress this often (seconds); 0 turns it off.
    progress_every_s: float = 30.0
    # Skip prompts an earlier run of the same job finished into this output.dir (per record: same index, id,
    # prompt and per-record settings). false: reuse nothing; with earlier outputs there it needs overwrite=true.
    resume: bool = True
    # Earlier outputs this run cannot reuse (other settings, or resume=false) are moved aside into
    # output.dir/previous-<time>/ instead of refusing the run. Nothing is ever deleted.
    overwrite: bool = False
    # output.dir/distgen.lock: one job at a time. Its holder touches it every lock_heartbeat_s seconds; it is
    # stale after 3 of them, and break_lock=true then takes it (a job on another host that died).
    break_lock: bool = False
    lock_heartbeat_s: float = 30.0
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
    # The input columns each record keeps (besides id and prompt), with their values and types as read; None:
    # all of them, []: none. A column named like an output field (completion, error, ...) is kept as input_<name>.
    columns: Optional[list[str]] = None
    # false: records leave out the prompt text (chat records keep their messages as a column).
    keep_prompt: bool = True
    # The form of outputs.jsonl: a name in distgen.outputs.shards.MERGE_FORMATS (distgen records, or OpenAI batch
    # output lines); auto: openai_batch when the dataset is an OpenAI batch file, else distgen.
    merge_format: str = "auto"

    def check(self) -> None:
        columns = self.columns
        require(columns is None or (isinstance(columns, (list, tuple)) and all(isinstance(c, str) and c for c in columns)
                                    and len(set(columns)) == len(columns)), "output.columns", columns,
                "must be null (all the input columns) or a list of distinct column names ([] keeps none)")
        require(self.progress_every_s >= 0, "output.progress_every_s", self.progress_every_s, "must be >= 0")
        require(self.shard_size >= 1, "output.shard_size", self.shard_size, "must be >= 1")
        require(self.sample_every_s > 0, "output.sample_every_s", self.sample_every_s, "must be > 0")
        require(self.lock_heartbeat_s > 0, "output.lock_heartbeat_s", self.lock_heartbeat_s, "must be > 0")


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

    def parts(self) -> tuple[Any, ...]:
        return (self.model, self.model.tiny, self.layout, self.generation, self.dataset, self.output, self.launcher)

    def check(self) -> "RunConfig":
        """Every part's own values (names and rules across parts: distgen.catalog.check)."""
        for part in self.parts():
            part.check()
        return self
