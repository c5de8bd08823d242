"""Per-rank memory and throughput figures."""
from __future__ import annotations

import os
import platform
import re
import resource
import socket
import sys
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from distgen.common.clock import timestamp

MIB = 1024 * 1024


@dataclass
class RankStats:
    rank: int
    device: str
    prompts: int
    prompt_tokens: int
    generated_tokens: int
    forward_steps: int
    idle_steps: int
    load_seconds: float
    generate_seconds: float
    wall_seconds: float
    # Peak RSS once the model is loaded and placed (before generation), and at the end.
    load_peak_rss_mib: float
    peak_rss_mib: float
    cuda_peak_allocated_mib: float
    cuda_peak_reserved_mib: float
    # Parameter bytes resident on this rank right after placement, by device (or "disk"), and the
    # whole model's: a sharded layout holds about 1/N of it.
    param_bytes: dict[str, int] = field(default_factory=dict)
    model_param_bytes: int = 0
    # device_map: which module went where.
    device_map: Optional[dict[str, str]] = None
    # The batch size the rank started with and why (generation.batch_size, or what auto picked), the one
    # it ended with, and how many times it halved it after running out of memory.
    batch_size: int = 0
    batch_size_reason: str = ""
    final_batch_size: int = 0
    oom_backoffs: int = 0
    # Assisted generation (model.assistant): draft tokens the main model checked, and how many it kept.
    draft_proposed: int = 0
    draft_accepted: int = 0
    # LoRA adapters chosen per record (model.lora by name): times this rank swapped one into its weights, and the
    # seconds the swaps took (inside generate_seconds).
    adapter_switches: int = 0
    adapter_switch_seconds: float = 0.0
    # generation.compile: seconds of the first compiled decode step (the compile itself, inside
    # generate_seconds); 0 when the decode step ran eager.
    compile_seconds: float = 0.0
    # Device->host reads of values the engine made (distgen.engine.host.read), per forward step: 1 is one wait
    # for the device per step; a pipelined engine reads step N's tokens while step N+1 runs.
    host_reads: int = 0
    blocking_syncs_per_step: float = 0.0
    # Decode steps replayed from the engine's own CUDA graphs (one per row bucket, engine/graphs.py), the seconds
    # their captures took (inside generate_seconds), and padded decode steps that ran eagerly.
    cuda_graph_replays: int = 0
    cuda_graph_capture_seconds: float = 0.0
    eager_decode_steps: int = 0
    # What the rank ran on: the GPU's name or the CPU's model, and the host.
    device_name: str = ""
    host: str = ""
    # Prompt tokens run through forwards, and those taken from a slot that held them instead (a shared prefix, a
    # prompt's other samples: distgen/engine/prefix.py); wall seconds of the steps that carried prompt tokens
    # (on CPU their compute; on a GPU their launch only, the device runs behind).
    prefill_tokens: int = 0
    shared_prefix_tokens: int = 0
    prefill_step_seconds: float = 0.0
    # The engine's plan: every decision the builder made, with its reason, and its line (distgen/engine/plan.py).
    engine: dict = field(default_factory=dict)
    # Whether a row's logits did not depend on its batch (the engine plan's batch_invariant), and how many of this
    # rank's completions drew their tokens (temperature > 0): a resumed job that samples on rows that are not
    # batch-invariant draws valid tokens, but not necessarily the ones an uninterrupted run would have.
    batch_invariant: bool = False
    sampled_completions: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else 0.0

    @property
    def param_mib(self) -> float:
        """Parameter memory held in memory (not on disk)."""
        return sum(size for where, size in self.param_bytes.items() if where != "disk") / MIB

    @property
    def disk_param_mib(self) -> float:
        return self.param_bytes.get("disk", 0) / MIB

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0

    def as_record(self) -> dict:
        return {**vars(self), "tokens_per_second": round(self.tokens_per_second, 2),
                "param_mib": round(self.param_mib, 3),
                "acceptance_rate": round(self.acceptance_rate, 4), "disk_param_mib": round(self.disk_param_mib, 3)}


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name (`NVIDIA H100 80GB HBM3`) or the CPU's model, with how many cores this process may use."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores)"


def host_name() -> str:
    return socket.gethostname()


def versions() -> dict[str, str]:
    """The versions that decide a run: Python, distgen, torch, transformers, datasets (and CUDA's where built)."""
    import datasets
    import transformers

    # The package this module belongs to is imported before it; `import distgen` would name its API module above.
    distgen = sys.modules[__name__.partition(".")[0]]
    found = {"python": platform.python_version(), "distgen": distgen.__version__, "torch": torch.__version__,
             "transformers": transformers.__version__, "datasets": datasets.__version__}
    return {**found, "cuda": torch.version.cuda} if torch.version.cuda else found


def environment(stats: list["RankStats"]) -> dict:
    """When, where and with what the run ran: the date, the coordinator's host, every rank's host and device,
    and the versions."""
    return {"date": timestamp(), "hostname": host_name(),
            "hosts": sorted({s.host for s in stats if s.host}),
            "devices": sorted({s.device_name for s in stats if s.device_name}), "versions": versions()}


# Error messages told apart by their words, not their numbers: one entry per kind of failure.
NUMBER = re.compile(r"\d+")
MAX_ERROR_KINDS = 1000
MESSAGE_CHARS = 500


@dataclass
class ErrorTally:
    """Error records by message; messages that differ only in their numbers (token counts, sizes) count as one,
    shown by the first of them. At most MAX_ERROR_KINDS kinds are told apart; the rest count as `other`."""
    kinds: dict[str, list] = field(default_factory=dict)  # the message with its numbers as N -> [count, first]
    other: int = 0

    def add(self, message: str) -> None:
        message = message[:MESSAGE_CHARS]
        kind = NUMBER.sub("N", message)
        if kind in self.kinds:
            self.kinds[kind][0] += 1
        elif len(self.kinds) < MAX_ERROR_KINDS:
            self.kinds[kind] = [1, message]
        else:
            self.other += 1

    def commonest(self, count: int = 5) -> list[dict]:
        """The `count` commonest kinds: [{"count", "message"}], the most first."""
        ranked = sorted(self.kinds.values(), key=lambda entry: -entry[0])[:count]
        return [{"count": n, "message": message} for n, message in ranked]


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident memory of this process now (Linux /proc), for sampling over time."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / MIB
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


def cuda_allocated_mib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / MIB if device.type == "cuda" else 0.0


def cuda_peaks_mib(device: torch.device) -> tuple[float, float]:
    if device.type != "cuda":
        return 0.0, 0.0
    return torch.cuda.max_memory_allocated(device) / MIB, torch.cuda.max_memory_reserved(device) / MIB


def reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight takes as stored: the inner tensors of a tensor subclass (quanto's data and
    scales), the packed data plus quantization scales of a bitsandbytes parameter."""
    if hasattr(tensor, "__tensor_flatten__"):
        inner, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in inner)
    scales = [getattr(tensor, "SCB", None), getattr(getattr(tensor, "quant_state", None), "absmax", None)]
    return tensor.numel() * tensor.element_size() + sum(tensor_bytes(s) for s in scales if s is not None)


def packed_weights(module: nn.Module) -> list[torch.Tensor]:
    """The weight and bias of torch's quantized Linear, which keeps them packed, not as Parameters."""
    if not (hasattr(module, "_packed_params") and callable(getattr(module, "weight", None))):
        return []
    weight, bias = module.weight(), module.bias()
    return [weight] if bias is None else [weight, bias]


def weight_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """The model's parameters (a tied one once) and the weights quantized Linear layers keep packed."""
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) not in seen:  # parameters live as long as the model, so their ids are stable
                seen.add(id(param))
                yield param
        # Unpacked on each call, so never shared (and their ids are reused once freed).
        yield from packed_weights(module)

