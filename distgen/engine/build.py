"""Build a rank's engine from the config: plan every decision (scheduler, batch, KV cache, compile, kernels,
attention, ...) with its reason (plan.EnginePlan), build the parts, and construct the Engine from both."""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch

from distgen.config import GenerationConfig, logprobs_within
from distgen.engine.assist import Assistant, AssistantSpec, DraftModel, PromptLookup, max_draft_tokens
from distgen.engine.backoff import Backoff, injected_oom_step
from distgen.engine.core import Adapters, Engine, StopCheck
from distgen.engine.grammar import GrammarBook
from distgen.engine.graphs import DecodeRunner, graphs_blocker
from distgen.engine.kv import CACHES, CacheSpec, QueueShape
from distgen.engine.kernels import apply_backends, batch_invariant
from distgen.engine.kv.attention import attention_context, plan_attention
from distgen.engine.kv.base import KVCache, kv_geometry, model_dtype
from distgen.engine.kv.slots import SlotKV, ring_blocker, ring_columns
from distgen.engine.windows import SLIDING, LayerWindows, text_config
from distgen.engine.kv.quantized import quant_bits
from distgen.engine.memory import (BatchChoice, activation_bytes_per_row, auto_batch_size, available_bytes,
                                   forward_bytes, kv_shape, logits_bytes_per_row, memory_budget)
from distgen.engine.plan import (AssistantChoice, AttentionChoice, AutocastChoice, CacheChoice, CacheFacts,
                                 DeviceDefaults, EnginePlan, SharingChoice, mixes, pipelines, plan_graphs)
from distgen.engine.prefix import PREFIX_SHARING, PrefixIndex, sharing_blocker
from distgen.engine.queue import PromptQueue, RequestQueue, Samples
from distgen.engine.request import Request, RequestFailed
from distgen.engine.runner import AUTOCAST, CompilePlan, Runner, persist_inductor_cache
from distgen.engine.sampler import Sampler
from distgen.engine.scheduler import SCHEDULERS
from distgen.common.errors import ConfigError
from distgen.models.forward_args import accepts_position_ids, unwrapped
from distgen.inputs.grammar import Grammar, job_grammar
from distgen.inputs.records import Prompt
from distgen.common.registry import Registry
from distgen.engine.sampling import RowSampling, row_sampling, sequence_seed


# Settings left to the device (null in the config): on CUDA a forward costs about the same up to thousands of
# tokens and rows are what the memory holds, so prompts are prefilled this many tokens per forward and
# generation.batch_size is auto; a CPU's forward costs in proportion to its tokens (bench/engine.py sized these).
DEVICE_DEFAULTS = {"cuda": dict(batch_size="auto", prefill_chunk_tokens=8192),
                   "cpu": dict(batch_size=4, prefill_chunk_tokens=512)}
# DISTGEN_CUDA_GRAPHS=0 runs the padded decode step eagerly on CUDA too (bench/gpu.py's graphs-off variant).
GRAPHS_ENV = "DISTGEN_CUDA_GRAPHS"
# generation.compile=auto compiles on CUDA only when the job has at least this many decode steps.
COMPILE_MIN_DECODE_STEPS = 2048
# On CPU auto never compiles: an automatic choice is made only where it was measured faster, and a CPU
# compile was not. A frozen compile with inductor's C++ GEMMs (runner.CPU_INDUCTOR_OPTIONS) measured
# ~1.2x eager per decode step on one model (8 layers/h512, 16 rows, one thread), but it takes 40-80 s
# every run (its graph is not cached), replaces distgen's CPU kernels, and halved a 100k-prompt tiny
# job (1095 vs 2065 tok/s, 49 s compiling). generation.compile=on still compiles on CPU.
CPU_COMPILE_REASON = ("not compiling: on CPU a compile is not measured faster (40-80 s each run, distgen's CPU "
                      "kernels set aside); generation.compile=on compiles anyway")
# Model types generation.cache=auto puts in the slot cache without compiling (golden-tested against
# model.generate; eager slots measured ~1.5x the dynamic cache in bench/engine.py). Others stay dynamic.
SLOT_CACHE_AUTO_MODEL_TYPES = ("llama", "mistral")
# Layer types a slot cache holds side by side: every column kept, a local layer's window applied in attention.
ATTENTION_LAYER_TYPES = ("full_attention", SLIDING)


def slot_cache_blocker(model: torch.nn.Module) -> Optional[str]:
    """None when the model can use a slot cache, else why not (it needs position ids and a 4D mask; layers of
    other kinds than global and sliding-window attention, or sliding windows that are not causal, it cannot hold)."""
    if not accepts_position_ids(type(unwrapped(model))):
        return f"{type(unwrapped(model)).__name__} takes no position_ids"
    if getattr(model.config, "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder"
    kinds = set(getattr(model.config, "layer_types", None) or [])
    if len(kinds) > 1 and not kinds <= set(ATTENTION_LAYER_TYPES):
        return f"{type(model).__name__} mixes attention layer types ({sorted(kinds)})"
    if getattr(text_config(model.config), "use_bidirectional_attention", False):
        return f"{type(model).__name__} attends bidirectionally (use_bidirectional_attention)"
    return None


def compile_blocker(model: torch.nn.Module) -> Optional[str]:
    """Why torch.compile must not wrap this model's decode step, or None."""
    device_map = getattr(model, "hf_device_map", None) or {}
    if any(str(place) in ("cpu", "disk") for place in device_map.values()) and len(set(device_map.values())) > 1:
        return "the model is offloaded to CPU/disk (device_map)"
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return "the model's parameters are offloaded by ZeRO-3"
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not getattr(quantizer, "is_compileable", False):
        return f"its quantizer {type(quantizer).__name__} is not compileable"
    return slot_cache_blocker(model)


# A generation.compile policy: (generation settings, model, decode steps, lockstep, device) -> the plan.
CompilePolicy = Callable[[GenerationConfig, torch.nn.Module, int, bool, torch.device], CompilePlan]


def compile_off(gen: GenerationConfig, model: torch.nn.Module, decode_steps: int, lockstep: bool,
                device: torch.device) -> CompilePlan:
    """Never compile the decode step."""
    return CompilePlan(False, reason="generation.compile=off")


def compile_on(gen: GenerationConfig, model: torch.nn.Module, decode_steps: int, lockstep: bool,
               device: torch.device) -> CompilePlan:
    """Always compile the decode step (a config error when the model cannot be compiled)."""
    blocker = compile_blocker(model)
    if blocker:
        raise ConfigError(f"generation.compile=on is not possible: {blocker}; use generation.compile=off")
    return compiling(gen, model, device, lockstep, "generation.compile=on")


# What the engine line adds when a CPU compile freezes the weights.
FROZEN_NOTE = " (CPU: weights frozen into the compiled step, a prepacked copy beside the model's own)"


def compiling(gen: GenerationConfig, model: torch.nn.Module, device: torch.device, lockstep: bool,
              reason: str) -> CompilePlan:
    """The plan that compiles, frozen on CPU where `freezes` says so (and the reason says it)."""
    freeze = freezes(model, device, lockstep)
    return CompilePlan(True, gen.compile_mode, reason + (FROZEN_NOTE if freeze else ""), freeze=freeze)


def freezes(model: torch.nn.Module, device: torch.device, lockstep: bool) -> bool:
    """A CPU compile freezes the weights into the graph (runner.CPU_INDUCTOR_OPTIONS) unless a sharded
    layout gathers and frees them around every forward or a quantizer owns them."""
    return device.type == "cpu" and not lockstep and getattr(model, "hf_quantizer", None) is None


def compile_auto(gen: GenerationConfig, model: torch.nn.Module, decode_steps: int, lockstep: bool,
                 device: torch.device) -> CompilePlan:
    """Compile when the job repays it: on CUDA (never on CPU), a slot cache, not lockstep, enough decode steps."""
    blocker = compile_blocker(model)
    if blocker:
        return CompilePlan(False, reason=f"not compiling: {blocker}")
    if gen.cache != "auto" and not CACHES.get(gen.cache).slots(gen):
        return CompilePlan(False, reason=f"not compiling: generation.cache={gen.cache} changes shape every step")
    if lockstep:
        return CompilePlan(False, reason="not compiling: a lockstep (sharded) layout; use generation.compile=on")
    if device.type != "cuda":
        return CompilePlan(False, reason=CPU_COMPILE_REASON)
    if decode_steps < COMPILE_MIN_DECODE_STEPS:
        return CompilePlan(False, reason=f"not compiling: about {decode_steps} decode steps are too few to repay "
                                         f"a compile (auto compiles on cuda from {COMPILE_MIN_DECODE_STEPS})")
    return compiling(gen, model, device, lockstep, f"compiling: about {decode_steps} decode steps")


# generation.compile's names (the config check and --help read them).
COMPILE: Registry[CompilePolicy] = Registry("generation.compile", valued=True)
COMPILED_READS = ("generation.compile_mode", "generation.compile_cache_dir")
COMPILE.register("auto", None, compile_auto, owns=COMPILED_READS)
COMPILE.register("on", None, compile_on, owns=COMPILED_READS)
COMPILE.register("off", None, compile_off)


def plan_compile(gen: GenerationConfig, model: torch.nn.Module, decode_steps: int, lockstep: bool,
                 device: torch.device) -> CompilePlan:
    return COMPILE.get(gen.compile)(gen, model, decode_steps, lockstep, device)


def plan_cache(gen: GenerationConfig, model: torch.nn.Module, compiling: bool, need: int = 0, budget: int = 1 << 62,
               device_type: str = "cpu", quantized_need: Optional[int] = None, columns: Optional[int] = None,
               ring_need: Optional[int] = None) -> tuple[str, str]:
    """(cache name, why); `need` is the estimated KV bytes of batch_size rows in full precision,
    `quantized_need` in the quantized cache (default: a quarter), `ring_need` in the sliding_window ring (None: the
    model cannot use one), `budget` what may be spent on it; `columns`: the longest sequence (None: unknown), which
    says whether a sliding window binds."""
    windows, blocker = LayerWindows.of(model.config), slot_cache_blocker(model)
    binding = windows if columns is None else windows.binding(columns)
    if gen.cache != "auto":
        kind = CACHES.get(gen.cache)
        if kind.slots(gen) and blocker:
            raise ConfigError(f"generation.cache={gen.cache} is not possible: {blocker}; "
                              "use generation.cache=dynamic")
        if gen.cache == "sliding_window" and ring_blocker(windows):
            raise ConfigError(f"generation.cache=sliding_window is not possible: {ring_blocker(windows)}; use "
                              "generation.cache=static or auto")
        return gen.cache, f"generation.cache={gen.cache}"
    local = binding.local and not blocker
    if local and need > budget and ring_need is not None and ring_need <= budget:
        return "sliding_window", f"a cache of every column (~{need >> 20} MiB) exceeds the budget of " \
                                 f"{budget >> 20} MiB; a ring of the window of {windows.uniform} (~{ring_need >> 20} " \
                                 "MiB) fits"
    if need > budget:
        quantized_need = need // 4 if quantized_need is None else quantized_need
        over = f"a full-precision KV cache (~{need >> 20} MiB) exceeds the budget of {budget >> 20} MiB"
        can_quantize = not (blocker and CACHES.get("quantized").slots(gen))
        if device_type == "cuda" and (quantized_need > budget or not can_quantize):
            return "offloaded", over + (f", and a quantized one (~{quantized_need >> 20} MiB) too" if can_quantize
                                        else "; the model cannot use the int8 slot cache")
        if can_quantize:
            return "quantized", f"{over} (quantized: ~{quantized_need >> 20} MiB)"
    if compiling:
        return "static", "a compiled decode step needs fixed shapes"
    if gen.scheduler == "chunked":
        if blocker:
            raise ConfigError(f"generation.scheduler=chunked is not possible: {blocker}")
        return "static", "chunked prefill continues prompts in a slot cache"
    if local:
        return "static", f"{windows_said(binding)}: each layer's window applied in the slot cache"
    if not compile_blocker(model) and model.config.model_type in SLOT_CACHE_AUTO_MODEL_TYPES:
        return "static", f"slots need no row surgery for a {model.config.model_type} model"
    return "dynamic", "no compile, no sliding window"


def windows_said(windows: LayerWindows) -> str:
    """What the engine line says of a model's binding windows."""
    local = [i for i, window in enumerate(windows.windows) if window is not None]
    if len(local) == len(windows.windows):
        return f"every layer attends over a sliding window of {windows.smallest}"
    return f"layers {', '.join(map(str, local))} attend over a sliding window of {windows.smallest}"


def build_assistant(spec: AssistantSpec, model: torch.nn.Module, kv: KVCache, gen: GenerationConfig,
                    shape: QueueShape, pad_id: int, eos_ids: Sequence[int], device: torch.device) -> Assistant:
    if not kv.verifies_drafts:
        raise ConfigError(f"model.assistant={spec.name} cannot run on generation.cache={gen.cache} "
                          f"({type(kv).__name__}); use generation.cache=auto, static, sliding_window or dynamic")
    if spec.draft is None:
        return Assistant(PromptLookup(gen.prompt_lookup_ngram), gen, eos_ids)
    draft = spec.draft
    blocker = slot_cache_blocker(draft)
    if blocker:
        raise ConfigError(f"model.assistant={spec.name}: the draft model cannot use a slot cache ({blocker})")
    vocab, draft_vocab = (unwrapped(m).config.get_text_config().vocab_size for m in (model, draft))
    if vocab != draft_vocab:
        raise ConfigError(f"model.assistant={spec.name}: the draft model's vocabulary ({draft_vocab} tokens) differs "
                          f"from the model's ({vocab}); a draft must share the model's tokenizer")
    draft_kv = SlotKV(kv_geometry(draft)[0], gen.batch_size, shape.columns, pad_id, device, model_dtype(draft),
                      full_width=False, compacts=False, windows=LayerWindows.of(draft.config))
    return Assistant(DraftModel(draft, draft_kv, gen.prefill_chunk_tokens if gen.scheduler == "chunked" else None),
                     gen, eos_ids)


def prefill_token_budget(gen: GenerationConfig, kv: KVCache) -> int:
    """Most prompt tokens one prefill forward runs: generation.prefill_chunk_tokens when prompts are
    chunked or packed into one row (a packed forward's attention grows with the square of its tokens);
    otherwise unbounded (padded prefills admit every prompt a free row can take)."""
    return gen.prefill_chunk_tokens if gen.scheduler == "chunked" or kv.packs_prefill else 1 << 62


def record_seed(gen: GenerationConfig, prompt: Prompt, sample: int = 0) -> int:
    """The record's 64-bit seed (its sample's); a seed out of range (screening checks it) fails this request only."""
    try:
        return sequence_seed(gen, prompt, sample)
    except (ValueError, OverflowError, TypeError) as err:
        raise RequestFailed(f"seed={prompt.seed if prompt.seed is not None else gen.seed} cannot seed a sampler: "
                            f"{type(err).__name__}: {err}") from err


def make_request(prompt: Prompt, ids: Sequence[int], gen: GenerationConfig, device: torch.device, sample: int,
                 vocab: int, assisted: bool, grammars: GrammarBook, grammar: Optional[Grammar]) -> Request:
    """The request of one sample of a prompt, with its record's own sampling settings (and seed) applied over
    generation.*; a record that reaches the engine already failed (Prompt.error, e.g. it could not be tokenized),
    or whose settings this engine cannot honour (`settings_refusal`, a grammar the library cannot compile), fails
    here. `grammar`: generation.*'s (read once); `grammars`: the rank's compiled grammars."""
    if prompt.error is not None:
        raise RequestFailed(prompt.error)
    sampling = row_sampling(gen, prompt, grammar)
    budget = prompt.budget(gen.max_new_tokens)
    refusal = settings_refusal(sampling, budget, vocab, assisted, gen.max_logprobs)
    if refusal:
        raise RequestFailed(refusal)
    matcher = None if sampling.grammar is None else grammars.matcher(sampling.grammar)
    seed = record_seed(gen, prompt, sample) if sampling.do_sample else None
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None and assisted else None
    return Request(prompt, list(ids), budget, seed, sampling, generator=generator,
                   sample=sample, logprobs=[] if sampling.logprobs is not None else None, matcher=matcher,
                   prompt_blocks=[] if sampling.prompt_logprobs is not None else None)


def settings_refusal(sampling: RowSampling, budget: int, vocab: int, assisted: bool,
                     max_logprobs: int = -1) -> Optional[str]:
    """Why a record's settings cannot run (what a record alone cannot be checked for before the engine knows its
    budget, the vocabulary, whether drafts are verified and generation.max_logprobs), naming the field; None when
    they can."""
    for key in ("logprobs", "prompt_logprobs"):
        value = getattr(sampling, key)
        if value is not None and not logprobs_within(value, max_logprobs):
            return f"{key}={value} is not allowed: must be at most generation.max_logprobs={max_logprobs}"
    if sampling.min_tokens > budget:
        return f"min_tokens={sampling.min_tokens} is not allowed: must be at most its max_new_tokens={budget}"
    outside = [token for token, _ in sampling.logit_bias if token >= vocab]
    if outside:
        return (f"logit_bias token id {outside[0]} is not allowed: must be below the model's vocabulary of {vocab} "
                "tokens")
    if assisted and sampling.processed:
        return ("its settings (penalties, logit_bias, min_tokens, min_p, logprobs or a json_schema, regex or choice) "
                "are not allowed with model.assistant: drafts are verified against the model's plain logits")
    if sampling.grammar is not None and sampling.min_tokens > 0:
        return (f"min_tokens={sampling.min_tokens} is not allowed with a {sampling.grammar.kind}: the grammar decides "
                "where the completion ends")
    return None


def every_sample(gen: GenerationConfig) -> Samples:
    """Each prompt's samples 0..n-1 (its record's n, else generation.n)."""
    return lambda prompt: range(prompt.samples(gen.n))


def plan_prefix_sharing(gen: GenerationConfig, kv: KVCache, assisted: bool) -> SharingChoice:
    """Whether (and from how many first tokens) the engine shares prefixes between slots, and what the line says."""
    policy = PREFIX_SHARING.get(gen.prefix_sharing)
    blocker = sharing_blocker(kv, assisted)
    if blocker is not None:
        if policy.required:
            raise ConfigError(f"generation.prefix_sharing=on is not possible: {blocker}; use "
                              "generation.prefix_sharing=auto or off")
        return SharingChoice(False, None, f"no prefix sharing ({blocker}): a prompt's samples prefill it each")
    if policy.min_tokens is None:
        return SharingChoice(True, None, "prefix sharing off (generation.prefix_sharing=off): a prompt's samples "
                                         "still copy its KV")
    return SharingChoice(True, policy.min_tokens, f"prefix sharing: a prompt admitted while a slot holds >= "
                                                  f"{policy.min_tokens} of its first tokens (a prompt's samples: "
                                                  "any) copies their KV and prefills the rest")


def rank_budget(gen: GenerationConfig, device: torch.device, local_world_size: int = 1) -> int:
    """generation.memory_fraction of the device's free memory (on CPU the host's, split among its
    `local_world_size` ranks: DistContext.local_world_size)."""
    sharing = 1 if device.type == "cuda" else local_world_size
    return memory_budget(available_bytes(device), gen.memory_fraction, sharing)


def device_defaults(gen: GenerationConfig, device: torch.device) -> tuple[GenerationConfig, DeviceDefaults]:
    """generation.* with the settings left to the device (None) filled in from DEVICE_DEFAULTS, and which they were
    (what the engine line says of them)."""
    device_type = "cuda" if device.type == "cuda" else "cpu"
    left = {key: value for key, value in DEVICE_DEFAULTS[device_type].items() if getattr(gen, key) is None}
    return (replace(gen, **left) if left else gen), DeviceDefaults(tuple(left.items()), device.type)


def packs_prefill(model: torch.nn.Module, gen: GenerationConfig) -> bool:
    """Whether the cache will likely be a slot cache, whose prefill packs prompts into one forward of at most the
    token budget (plan_cache decides for good once the batch is known)."""
    if slot_cache_blocker(model) or (gen.cache != "auto" and not CACHES.get(gen.cache).slots(gen)):
        return False  # (each kind says whether it is a slot cache with these settings: quantized int8 is one)
    return gen.cache != "auto" or LayerWindows.of(model.config).local \
        or model.config.model_type in SLOT_CACHE_AUTO_MODEL_TYPES


def plan_batch_size(model: torch.nn.Module, gen: GenerationConfig, shape: QueueShape, budget: int,
                    device: torch.device = torch.device("cpu")) -> BatchChoice:
    """generation.batch_size as given, or the most rows that fit `budget` when it is auto: with a slot cache one
    packed forward's activations are charged once (attention scores only where they are materialised), each row
    its KV cache and logits; with a padded cache each row its whole forward."""
    gen = device_defaults(gen, device)[0]
    if gen.batch_size != "auto":
        return BatchChoice(gen.batch_size, f"generation.batch_size={gen.batch_size}")
    query = shape.longest_prompt
    if gen.scheduler == "chunked":
        query = min(query, gen.prefill_chunk_tokens)
    dtype = model_dtype(model)
    kv = kv_shape(model.config, dtype, quantized=gen.cache == "quantized",
                  ring=ring_of(model, shape, gen) if gen.cache == "sliding_window" else None)
    if packs_prefill(model, gen):
        tokens = max(gen.prefill_chunk_tokens, query)  # a prompt longer than the budget is admitted whole
        flash = plan_attention(attention_context(model.config, device, AUTOCAST.get(gen.autocast) or dtype, dtype,
                                                 gen.cpu_kernels, gen.autocast, columns=shape.columns),
                               gen.attention)[0].addressed
        return auto_batch_size(kv, logits_bytes_per_row(model.config, dtype), shape.columns, shape.prompts, budget,
                               forward=forward_bytes(model.config, dtype, tokens, 0 if flash else query),
                               forward_tokens=tokens)
    activations = activation_bytes_per_row(model.config, dtype, query, shape.columns)
    return auto_batch_size(kv, activations, shape.columns, shape.prompts, budget)


def ring_of(model: torch.nn.Module, shape: QueueShape, gen: GenerationConfig, verify_tokens: int = 1) -> Optional[int]:
    """The columns of a `sliding_window` ring for this model and job, or None where the model cannot use one."""
    windows = LayerWindows.of(model.config)
    return None if ring_blocker(windows) else ring_columns(windows.uniform, shape, gen, verify_tokens)


def plan_autocast(gen: GenerationConfig, model: torch.nn.Module) -> tuple[Optional[torch.dtype], AutocastChoice]:
    """(the dtype the forwards autocast to or None, the choice and why): autocast applies to fp32 weights only."""
    dtype = AUTOCAST.get(gen.autocast)
    if dtype is None:
        return None, AutocastChoice(None, "")
    if model_dtype(model) != torch.float32:
        return None, AutocastChoice(None, f"no autocast: generation.autocast={gen.autocast} is for fp32 weights, "
                                          f"these are {model_dtype(model)}")
    return dtype, AutocastChoice(gen.autocast, f"autocast to {gen.autocast}")


def plan_engine_compile(gen: GenerationConfig, model: torch.nn.Module, decode_steps: int, lockstep: bool,
                        device: torch.device, assistant: Optional[AssistantSpec], swaps_adapters: bool) -> CompilePlan:
    """generation.compile for this engine: never with an assistant (its verify forwards change shape) nor, under
    auto, with a cache that changes shape; a CPU compile does not freeze weights that LoRA adapters swap into."""
    if assistant is not None:
        if gen.compile == "on":
            raise ConfigError(f"generation.compile=on is not possible with model.assistant={assistant.name}: its "
                              "verify forwards change shape every step; use generation.compile=off or auto")
        return CompilePlan(False, reason=f"not compiling: model.assistant={assistant.name} verifies a different "
                                         "number of tokens each step")
    if gen.cache != "auto" and not CACHES.get(gen.cache).slots(gen) and gen.compile == "auto":
        return CompilePlan(False, reason=f"not compiling: generation.cache={gen.cache}")
    plan = plan_compile(gen, model, decode_steps, lockstep, device)
    if swaps_adapters and plan.freeze:  # a frozen graph would keep the weights it was compiled with
        return replace(plan, freeze=False, reason=plan.reason.replace(FROZEN_NOTE, "")
                       + " (weights not frozen: model.lora swaps adapters into them)")
    return plan


def own_graphs(gen: GenerationConfig, model: torch.nn.Module, device: torch.device, lockstep: bool,
               autocast: Optional[torch.dtype], cache: str, columns: int) -> Optional[str]:
    """The slot attention whose decode step the engine's own CUDA graphs would replay if the step were not compiled
    (graphs.py: a static slot cache, an attention that addresses rows by slot id and can be captured, nothing
    else in the way), or None."""
    if cache != "static":  # the int8 layers, the ring and the dynamic caches keep the mask-and-read path
        return None
    attention = plan_attention(attention_context(model.config, device, autocast or model_dtype(model),
                                                 model_dtype(model), gen.cpu_kernels, gen.autocast, False,
                                                 columns=columns), gen.attention)[0]
    blocked = graphs_blocker(device, lockstep, False, autocast, model, attention.capturable, False,
                             os.environ.get(GRAPHS_ENV, "1").strip() == "0")
    return None if blocked or not attention.addressed else attention.name


def graphs_over_compile(plan: CompilePlan, gen: GenerationConfig, graphs: Optional[str]) -> CompilePlan:
    """generation.compile=auto does not compile a decode step the engine's own CUDA graphs replay through `graphs`
    (an attention name, `own_graphs`): they are captured in seconds, while a compiled CUDA decode keeps the masked
    SDPA path over every slot's columns. compile=on still compiles."""
    if gen.compile != "auto" or not plan.enabled or graphs is None:
        return plan
    return CompilePlan(False, reason=f"not compiling: the engine's own CUDA graphs replay the decode step ({graphs}; "
                                     "generation.compile=on compiles instead)")


def plan_engine_cache(gen: GenerationConfig, model: torch.nn.Module, compiling: bool, shape: QueueShape, budget: int,
                      device: torch.device, verify_tokens: int) -> CacheChoice:
    """The KV cache of generation.batch_size rows for this job (plan_cache, from the sizes each kind would take)."""
    dtype, rows = model_dtype(model), gen.batch_size
    full, quantized = kv_shape(model.config, dtype), kv_shape(model.config, dtype, quantized=True)
    ring = ring_of(model, shape, gen, verify_tokens)
    ring_need = None if ring is None else kv_shape(model.config, dtype, ring=ring).bytes(rows, shape.columns)
    cache, why = plan_cache(gen, model, compiling, full.bytes(rows, shape.columns), budget, device.type,
                            quantized.bytes(rows, shape.columns), shape.columns, ring_need)
    if cache == "quantized":
        why += f"; backend {gen.cache_quant_backend}, {quant_bits(gen)} bits"
    return CacheChoice(cache, why)


def build_engine(model: torch.nn.Module, queue: PromptQueue | Sequence[tuple[Prompt, Sequence[int]]],
                 gen: GenerationConfig, pad_id: int, eos_ids: Sequence[int], device: torch.device,
                 lockstep: bool = False, shape: Optional[QueueShape] = None,
                 stop_check: Optional[StopCheck] = None, batch: Optional[BatchChoice] = None,
                 assistant: Optional[AssistantSpec] = None, local_world_size: int = 1,
                 adapters: Optional[Adapters] = None, samples: Optional[Samples] = None,
                 tokenizer=None, layout: str = "") -> Engine:
    """`queue`: a lazy prompt queue (then `shape` comes from the length table) or a list of (prompt, ids).
    `samples`: each prompt's sample indices to run (default: 0..n-1, generation.n or the record's n).
    `batch`: the batch size the ranks agreed on (else planned here from generation.batch_size).
    `assistant`: assisted decoding (distgen.engine.assist.assistant_spec builds it from model.assistant).
    `local_world_size`: the ranks on this host (DistContext.local_world_size), which share its RAM.
    `adapters`: LoRA adapters chosen per request, swapped into the weights (distgen.models.lora.AdapterBank).
    `tokenizer`: the HF tokenizer, which structured output's grammars are compiled for (engine.grammar).
    `layout` (layout.name): what the out-of-memory back-off's messages name (the log line names the rank)."""
    # 1. the batch, the compile and the cache, from the config, the device and the model
    gen, defaults = device_defaults(gen, device)
    shape = shape if shape is not None else QueueShape.of(queue, gen)
    budget = rank_budget(gen, device, local_world_size)
    batch = batch or plan_batch_size(model, gen, shape, budget, device)
    gen = replace(gen, batch_size=batch.rows)
    autocast, autocast_choice = plan_autocast(gen, model)
    compile_plan = plan_engine_compile(gen, model, shape.decode_steps(gen.batch_size), lockstep, device, assistant,
                                       adapters is not None)
    verify_tokens = max_draft_tokens(gen) + 1 if assistant is not None else 1
    if compile_plan.enabled and gen.compile == "auto":  # the engine's own CUDA graphs, where they can run, instead
        uncompiled = plan_engine_cache(gen, model, False, shape, budget, device, verify_tokens).name
        compile_plan = graphs_over_compile(compile_plan, gen, own_graphs(gen, model, device, lockstep, autocast,
                                                                         uncompiled, shape.columns))
    cache = plan_engine_cache(gen, model, compile_plan.enabled, shape, budget, device, verify_tokens)
    if compile_plan.enabled:
        persist_inductor_cache(gen.compile_cache_dir)
    # 2. the kernel backends (which prepare the model) and the slot attention
    kernels = apply_backends(gen, model, device, lockstep, compile_plan.enabled, autocast)
    attention, attention_why = plan_attention(attention_context(
        model.config, device, autocast or model_dtype(model), model_dtype(model), gen.cpu_kernels, gen.autocast,
        compile_plan.enabled, columns=shape.columns), gen.attention)
    # 3. the cache, the assistant and the queue are built; what the plan reads of the cache
    spec = CacheSpec(model, gen, shape, gen.batch_size, pad_id, device, compile_plan.enabled,
                     verify_tokens=verify_tokens, attention=attention)
    kind = CACHES.get(cache.name)
    kv = kind.build(spec)
    facts = CacheFacts.of(kv)
    helper = assistant and build_assistant(assistant, model, kv, gen, shape, pad_id, eos_ids, device)
    assisted = helper is not None
    vocab = unwrapped(model).config.get_text_config().vocab_size
    grammars, grammar = GrammarBook(tokenizer, vocab, eos_ids), job_grammar(gen)
    waiting = RequestQueue(queue, lambda prompt, ids, sample: make_request(
        prompt, ids, gen, device, sample, vocab, assisted=assisted, grammars=grammars, grammar=grammar),
                           samples or every_sample(gen))
    graphs_off = graphs_blocker(device, lockstep, compile_plan.enabled, autocast, model, attention.capturable,
                                False, os.environ.get(GRAPHS_ENV, "1").strip() == "0")
    # 4. the plan: every decision with its reason
    plan = EnginePlan(
        batch=batch, scheduler=gen.scheduler, cache=cache, compile=compile_plan, lockstep=lockstep, defaults=defaults,
        assistant=AssistantChoice(assistant.name, gen.assistant_schedule, gen.num_assistant_tokens)
        if assistant is not None else None,
        autocast=autocast_choice, kernels=kernels,
        attention=AttentionChoice(attention.name, attention_why) if facts.varlen else None,
        adapters=len(adapters.names) if adapters is not None else None,
        sharing=plan_prefix_sharing(gen, kv, assisted), mixed=mixes(gen.mixed_steps, facts, assisted),
        pipelined=pipelines(facts, lockstep, assisted), graphs=plan_graphs(facts, assisted, graphs_off),
        token_budget=prefill_token_budget(gen, kv), batch_invariant=batch_invariant(model))
    # 5. the engine, from the plan and its parts
    runner, sampler = Runner(model, compile_plan, autocast), Sampler(gen, eos_ids, device)
    decoder = None if plan.graphs is None else DecodeRunner(runner, sampler.eos_ids, capture=plan.graphs.capture,
                                                            why=plan.graphs.reason)
    backoff = Backoff(not lockstep, lambda rows: kind.build(replace(spec, rows=rows)), gen.batch_size,
                      layout_note=f" (layout={layout})" if layout else "", inject_at=injected_oom_step())
    return Engine(plan, waiting, SCHEDULERS.get(gen.scheduler), kv, runner, sampler, stop_check, helper,
                  prefixes=PrefixIndex(plan.sharing.min_tokens) if plan.sharing.copies else None,
                  decoder=decoder, backoff=backoff, adapters=adapters, grammars=grammars)
