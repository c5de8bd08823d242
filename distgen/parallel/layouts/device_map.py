"""accelerate big-model inference: one model replica spread over the devices a rank owns (its
GPUs, then CPU, then disk), computed with `infer_auto_device_map` under per-device caps. Ranks
are replicas and run free (data parallel); nothing is a collective."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from distgen.common.checks import require
from distgen.config import LayoutConfig
from distgen.parallel.env import DistContext
from distgen.common.errors import ConfigError
from distgen.parallel.layouts.base import DataGroups, Layout, Placed, block_classes, register
from distgen.models.loading import ModelSource, resolve_attn_implementation, resolve_dtype

MEMORY_KEYS = ("cuda", "cpu")


@dataclass
class DeviceMapLayout(LayoutConfig):
    """accelerate device_map: each rank spreads one replica over its GPUs, CPU and disk; ranks run free."""
    name: str = "device_map"
    # Most memory the map may use on each of the rank's GPUs ("cuda") and on the CPU ("cpu"), e.g.
    # {cuda: 20GiB, cpu: 64GiB} or bytes; what does not fit goes to disk. Empty: what is free.
    max_memory: dict[str, str] = field(default_factory=dict)
    # Where disk-offloaded weights go (one subfolder per rank); null: a temporary folder.
    offload_folder: Optional[str] = None
    # GPUs each rank spans on a GPU node (8 GPUs, 2 per replica: start 4 ranks).
    devices_per_replica: int = 1

    def check(self) -> None:
        for key in self.max_memory:
            require(key in MEMORY_KEYS, f"layout.max_memory.{key}", self.max_memory[key],
                    "max_memory keys are " + ", ".join(MEMORY_KEYS))
        require(self.devices_per_replica >= 1, "layout.devices_per_replica", self.devices_per_replica, "must be >= 1")


def rank_gpus(cfg: DeviceMapLayout, ctx: DistContext) -> list[int]:
    """The GPUs this rank spans: devices_per_replica consecutive ones from local_rank * devices_per_replica."""
    if ctx.device.type != "cuda":
        return []
    first = ctx.local_rank * cfg.devices_per_replica
    if first + cfg.devices_per_replica > torch.cuda.device_count():
        raise ConfigError(f"layout.devices_per_replica={cfg.devices_per_replica} is not allowed: local rank "
                          f"{ctx.local_rank} would need GPUs {first}..{first + cfg.devices_per_replica - 1} but "
                          f"{torch.cuda.device_count()} are visible; start fewer ranks per node")
    return list(range(first, first + cfg.devices_per_replica))


def memory_caps(cfg: DeviceMapLayout, gpus: list[int]) -> Optional[dict]:
    """accelerate's max_memory: each of the rank's GPUs by index, and "cpu"; None: accelerate's own guess."""
    def size(value: str):
        return int(value) if str(value).isdigit() else value

    caps: dict = {gpu: size(cfg.max_memory["cuda"]) for gpu in gpus if "cuda" in cfg.max_memory}
    if "cpu" in cfg.max_memory:
        caps["cpu"] = size(cfg.max_memory["cpu"])
    if not caps:
        return None
    if gpus and "cuda" not in cfg.max_memory:  # caps on some devices only: the others take what is free
        from accelerate.utils import get_max_memory
        caps = {**{gpu: free for gpu, free in get_max_memory().items() if gpu in gpus}, **caps}
    return caps


def plan_device_map(skeleton: nn.Module, caps: Optional[dict], dtype: torch.dtype) -> dict[str, object]:
    """Which module goes where; decoder blocks are never split over devices."""
    from accelerate import infer_auto_device_map

    return infer_auto_device_map(skeleton, max_memory=caps, no_split_module_classes=sorted(block_classes(skeleton)),
                                 dtype=dtype)


def load_mapped(source: ModelSource, device_map: dict, offload_dir: Path) -> nn.Module:
    """A saved model is read straight into its places; the in-memory tiny model, and one read whole (merged with
    a LoRA adapter, or quantized, by `source.full()`: the whole model in host memory once), are dispatched."""
    if source.cfg.source == "tiny" or source.reads_whole:
        from accelerate import dispatch_model
        return dispatch_model(source.full(), device_map, offload_dir=str(offload_dir))
    from transformers import AutoModelForCausalLM
    cfg = source.cfg
    dtype = resolve_dtype(cfg.dtype, source.device)
    return AutoModelForCausalLM.from_pretrained(
        cfg.path, dtype=dtype, device_map=device_map, offload_folder=str(offload_dir),
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=resolve_attn_implementation(cfg.attn_implementation, source.device, dtype)).eval()


def offloaded(device_map: dict, gpus: list[int]) -> list[str]:
    """Modules the map keeps away from where they run: on disk, or in CPU memory while GPUs run them."""
    return [name for name, device in device_map.items() if device == "disk" or (gpus and device == "cpu")]


def offload_dir(cfg: DeviceMapLayout, rank: int) -> Path:
    """This rank's own folder for disk-offloaded weights (removed after generation)."""
    if not cfg.offload_folder:
        return Path(tempfile.mkdtemp(prefix=f"distgen-offload-rank{rank}-"))
    folder = Path(cfg.offload_folder) / f"rank-{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def where(device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def prepare(source: ModelSource, cfg: DeviceMapLayout, ctx: DistContext, groups: DataGroups) -> Placed:
    gpus = rank_gpus(cfg, ctx)
    dtype = resolve_dtype(source.cfg.dtype, ctx.device)
    device_map = plan_device_map(source.skeleton(), memory_caps(cfg, gpus), dtype)
    moved = offloaded(device_map, gpus)
    if moved and source.cfg.quantization != "none":  # accelerate offloads plain tensors only
        raise ConfigError(f"model.quantization={source.cfg.quantization!r} is not allowed with an offloading "
                          f"layout=device_map ({len(moved)} modules offloaded, first {moved[0]!r}): quantized "
                          f"weights cannot be offloaded; raise layout.max_memory or use model.quantization=none")
    folder = offload_dir(cfg, ctx.rank)
    model = load_mapped(source, device_map, folder)
    placed_map = {name: where(device) for name, device in device_map.items()}
    # Inputs go where the first block runs; accelerate's hooks move them on and bring outputs back.
    input_device = torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")
    return Placed(model, lockstep=False, input_device=input_device, device_map=placed_map,
                  release=lambda: shutil.rmtree(folder, ignore_errors=True))


register(Layout("device_map", prepare=prepare, whole_tensors=True), DeviceMapLayout)
