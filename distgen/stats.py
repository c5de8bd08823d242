"""Per-rank memory and throughput figures."""
from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

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

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0

    def as_record(self) -> dict:
        return {**vars(self), "tokens_per_second": round(self.tokens_per_second, 2)}


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_peaks_mib(device: torch.device) -> tuple[float, float]:
    if device.type != "cuda":
        return 0.0, 0.0
    return torch.cuda.max_memory_allocated(device) / MIB, torch.cuda.max_memory_reserved(device) / MIB


def reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
