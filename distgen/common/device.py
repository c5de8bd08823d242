"""device=auto|cpu|cuda: the device type a rank will use."""
from __future__ import annotations

from distgen.common.registry import Registry


def cuda_if_visible() -> str:
    import torch  # only when a device is resolved: the config schema pulls in no torch
    return "cuda" if torch.cuda.is_available() else "cpu"


# device -> () -> the device type the ranks use.
DEVICES: Registry = Registry("device", valued=True)
DEVICES.register("auto", None, cuda_if_visible, doc="CUDA + NCCL when a GPU is visible, else CPU + gloo")
DEVICES.register("cpu", None, lambda: "cpu", doc="CPU ranks over gloo")
DEVICES.register("cuda", None, lambda: "cuda", doc="one GPU per rank (LOCAL_RANK), over NCCL")


def target_device(requested: str) -> str:
    """The device type a rank will use for `device=<requested>` (as parallel.env.resolve_device picks it)."""
    return DEVICES.get(requested)()
