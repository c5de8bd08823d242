"""Build a rank's engine from the config: pick the scheduler, KV cache and compile plan, and say why."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from distgen.config import CACHE_NAMES, GenerationConfig
from distgen.engine.core import Engine, StopCheck
from distgen.engine.kv.base import KVCache, kv_geometry, model_dtype
from distgen.engine.kv.dynamic import DynamicKV
from distgen.engine.kv.slots import Int8SlotLayer, SlotKV, SlotLayer
from distgen.engine.queue import PromptQueue, RequestQueue
from distgen.engine.request import Request
from distgen.engine.runner import CompilePlan, Runner, persist_inductor_cache
from distgen.engine.sampler import Sampler
from distgen.engine.scheduler import SCHEDULERS
from distgen.errors import ConfigError
from distgen.forward_args import accepts_position_ids, unwrapped
from distgen.prompts import Prompt
from distgen.sampling import row_sampling, sequence_generator

log = logging.getLogger("distgen.engine")

# generation.compile=auto compiles only when the job has at least this many decode steps.
COMPILE_MIN_DECODE_STEPS = 2048
# Model types generation.cache=auto puts in the slot cache without compiling (golden-tested against
# model.generate; eager slots measured ~1.5x the dynamic cache in bench/engine.py). Others stay dynamic.
SLOT_CACHE_AUTO_MODEL_TYPES = ("llama", "mistral")


def slot_cache_blocker(model: torch.nn.Module) -> Optional[str]:
    """None when the model can use a slot cache, else why not (it needs position ids and a 4D mask)."""
    if not accepts_position_ids(type(unwrapped(model))):
        return f"{type(unwrapped(model)).__name__} takes no position_ids"
    if getattr(model.config, "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder"
    if len(set(getattr(model.config, "layer_types", None) or [])) > 1:
        return f"{type(model).__name__} mixes attention layer types ({sorted(set(model.config.layer_types))})"
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


def plan_compile(gen: GenerationConfig, model: torch.nn.Module, decode_steps: int, lockstep: bool,
                 device: torch.device) -> CompilePlan:
    if gen.compile == "off":
        return CompilePlan(False, reason="generation.compile=off")
    blocker = compile_blocker(model)
    if gen.compile == "on":
        if blocker:
            raise ConfigError(f"generation.compile=on is not possible: {blocker}; use generation.compile=off")
        return CompilePlan(True, gen.compile_mode, "generation.compile=on")
    if blocker:
        return CompilePlan(False, reason=f"not compiling: {blocker}")
    if gen.cache == "dynamic":
        return CompilePlan(False, reason="not compiling: generation.cache=dynamic changes shape every step")
    if lockstep:
        return CompilePlan(False, reason="not compiling: a lockstep (sharded) layout; use generation.compile=on")
    if device.type != "cuda":
        return CompilePlan(False, reason="not compiling: on CPU the compiled step measured no faster than eager "
                                         "slots (bench/engine.py); use generation.compile=on")
    if decode_steps < COMPILE_MIN_DECODE_STEPS:
        return CompilePlan(False, reason=f"not compiling: about {decode_steps} decode steps are too few to repay "
                                         f"a compile (auto compiles from {COMPILE_MIN_DECODE_STEPS})")
    return CompilePlan(True, gen.compile_mode, f"compiling: about {decode_steps} decode steps")


def kv_bytes(model: torch.nn.Module, rows: int, columns: int) -> int:
    """Estimated bytes of a full-precision KV cache of `rows` x `columns` tokens."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty((), dtype=model_dtype(model)).element_size()
    return 2 * config.num_hidden_layers * rows * columns * heads * head_dim * itemsize


def memory_budget(device: torch.device) -> int:
    """Half the memory still free on the device (CUDA) or host (MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    for line in open("/proc/meminfo") if Path("/proc/meminfo").exists() else []:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 // 2
    return 1 << 62


def plan_cache(gen: GenerationConfig, model: torch.nn.Module, compiling: bool, need: int = 0,
               budget: int = 1 << 62) -> tuple[str, str]:
    """(cache name, why); `need` is the estimated KV bytes of the job, `budget` what may be spent on it."""
    window, blocker = kv_geometry(model)[1], slot_cache_blocker(model)
    if gen.cache != "auto":
        if gen.cache != "dynamic" and blocker:
            raise ConfigError(f"generation.cache={gen.cache} is not possible: {blocker}; "
                              "use generation.cache=dynamic")
        if gen.cache == "sliding_window" and not window:
            raise ConfigError("generation.cache=sliding_window needs a model whose config has a sliding_window")
        return gen.cache, f"generation.cache={gen.cache}"
    if window and not blocker:
        return "sliding_window", f"the model attends over a sliding window of {window}"
    if need > budget and not blocker:
        return "quantized", f"a full-precision KV cache (~{need >> 20} MiB) exceeds the budget of {budget >> 20} MiB"
    if compiling:
        return "static", "a compiled decode step needs fixed shapes"
    if gen.scheduler == "chunked":
        if blocker:
            raise ConfigError(f"generation.scheduler=chunked is not possible: {blocker}")
        return "static", "chunked prefill continues prompts in a slot cache"
    if not compile_blocker(model) and model.config.model_type in SLOT_CACHE_AUTO_MODEL_TYPES:
        return "static", f"slots need no row surgery for a {model.config.model_type} model"
    return "dynamic", "no compile, no sliding window"


@dataclass(frozen=True)
class QueueShape:
    """A rank's prompts as the length table sees them (no request needs to exist): each one's
    prompt token count and budget, in any order."""
    lengths: np.ndarray  # (prompts,)
    budgets: np.ndarray  # (prompts,) each prompt's own max_new_tokens or generation.max_new_tokens

    @classmethod
    def of(cls, queue: Sequence[tuple[Prompt, Sequence[int]]], gen: GenerationConfig) -> "QueueShape":
        return cls(np.asarray([len(ids) for _, ids in queue], dtype=np.int64),
                   np.asarray([p.budget(gen.max_new_tokens) for p, _ in queue], dtype=np.int64))

    @property
    def columns(self) -> int:
        """The most cache columns one sequence needs: prompt plus budget."""
        return int((self.lengths + self.budgets).max()) if len(self.lengths) else 1

    @property
    def longest_prompt(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 1

    def decode_steps(self, batch_size: int) -> int:
        return int(self.budgets.sum()) // batch_size


def build_kv(name: str, model: torch.nn.Module, gen: GenerationConfig, shape: QueueShape, pad_id: int,
             device: torch.device, compiling: bool) -> KVCache:
    if name == "dynamic":
        return DynamicKV(gen.batch_size, pad_id, device)
    layers, window = kv_geometry(model)
    columns = shape.columns
    if name == "sliding_window":
        # A ring: a prefill chunk of q tokens must not overwrite what its first token still needs.
        longest_chunk = shape.longest_prompt
        if gen.scheduler == "chunked":
            longest_chunk = min(longest_chunk, gen.prefill_chunk_tokens)
        columns = min(columns, window + longest_chunk - 1)
    return SlotKV(layers, gen.batch_size, columns, pad_id, device, model_dtype(model), full_width=compiling,
                  window=window if name == "sliding_window" else None,
                  layer_class=Int8SlotLayer if name == "quantized" else SlotLayer)


KV_BUILDERS: dict[str, Callable] = {"dynamic": build_kv, "static": build_kv, "sliding_window": build_kv,
                                    "quantized": build_kv}
assert ("auto", *KV_BUILDERS) == CACHE_NAMES, "distgen.config.CACHE_NAMES must list KV_BUILDERS"


def make_request(prompt: Prompt, ids: Sequence[int], gen: GenerationConfig, device: torch.device) -> Request:
    """A request with its record's own sampling settings (and seed) applied over generation.*."""
    sampling = row_sampling(gen, prompt)
    return Request(prompt, list(ids), prompt.budget(gen.max_new_tokens),
                   sequence_generator(gen, prompt, device) if sampling.do_sample else None, sampling)


def build_engine(model: torch.nn.Module, queue: PromptQueue | Sequence[tuple[Prompt, Sequence[int]]],
                 gen: GenerationConfig, pad_id: int, eos_ids: Sequence[int], device: torch.device,
                 lockstep: bool = False, shape: Optional[QueueShape] = None,
                 stop_check: Optional[StopCheck] = None) -> Engine:
    """`queue`: a lazy prompt queue (then `shape` comes from the length table) or a list of (prompt, ids)."""
    shape = shape if shape is not None else QueueShape.of(queue, gen)
    decode_steps = shape.decode_steps(gen.batch_size)
    if gen.cache == "dynamic" and gen.compile == "auto":
        compile_plan = CompilePlan(False, reason="not compiling: generation.cache=dynamic")
    else:
        compile_plan = plan_compile(gen, model, decode_steps, lockstep, device)
    cache, why = plan_cache(gen, model, compile_plan.enabled, kv_bytes(model, gen.batch_size, shape.columns),
                            memory_budget(device))
    if compile_plan.enabled:
        persist_inductor_cache(gen.compile_cache_dir)
    choice = f"scheduler={gen.scheduler}, cache={cache} ({why}); {compile_plan.reason}"
    log.info("engine: %s", choice)
    kv = build_kv(cache, model, gen, shape, pad_id, device, compile_plan.enabled)
    waiting = RequestQueue(queue, lambda prompt, ids: make_request(prompt, ids, gen, device))
    engine = Engine(waiting, SCHEDULERS[gen.scheduler], kv, Runner(model, compile_plan),
                    Sampler(gen, eos_ids, device), gen.prefill_chunk_tokens if gen.scheduler == "chunked" else 1 << 62,
                    stop_check)
    engine.choice = choice
    return engine
