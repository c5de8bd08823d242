"""The engine's traffic with the host, in one place.

- `read`: every device->host read of values the engine makes goes through it, counted (`READS`): a rank's stats
  report them per step (`blocking_syncs_per_step`). On CUDA each is a wait for the device, which then idles
  until the host launches more work; on CPU it counts the same reads, so CI can hold the count down.
- `Pending`: a step's tokens on their way to the host: copied non-blocking into pinned memory with an event
  after the copy, so the host can launch the next step before it reads them (`read` then waits for the event).
- `upload`: host-built inputs (a prefill's token ids and positions, slot ids) go through pinned memory without
  blocking the host; on CPU the tensor itself, through the same code.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch


@dataclass
class HostReads:
    count: int = 0  # device->host reads of values, each a wait for the device where it is a GPU
    waited_seconds: float = 0.0  # of which spent waiting for a pending copy's event


READS = HostReads()


class Pending:
    """A device tensor's values on their way to host memory (launched, not read yet)."""

    def __init__(self, tensor: torch.Tensor):
        self.event: Optional[torch.cuda.Event] = None
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor

    def ready(self) -> bool:
        """Whether `read` would return without waiting."""
        return self.event is None or self.event.query()


def read(values: Union[torch.Tensor, Pending]) -> Any:
    """The values as Python numbers (nested lists; a number for a 0-d tensor): THE counted device->host read."""
    READS.count += 1
    if isinstance(values, Pending):
        if values.event is not None:
            start = time.perf_counter()
            values.event.synchronize()
            READS.waited_seconds += time.perf_counter() - start
        return values.host.tolist()
    return values.tolist()


def upload(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: on CUDA through pinned memory, non-blocking (the caching host allocator keeps
    the pinned block until the copy has run); on CPU as it is."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def upload_lists(lists: Sequence[Sequence], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Host lists as 1-D device tensors of `dtype`: one tensor built, one copy (upload), split into views."""
    flat = upload(torch.tensor([value for values in lists for value in values], dtype=dtype), device)
    return list(torch.split(flat, [len(values) for values in lists]))


def upload_all(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host int64 tensors on `device` through ONE upload (one pinned buffer, one copy); views of it, each in its
    own shape."""
    flat = upload(torch.cat([t.reshape(-1) for t in tensors]), device)
    sizes = [t.numel() for t in tensors]
    return [part.view(t.shape) for part, t in zip(torch.split(flat, sizes), tensors)]
