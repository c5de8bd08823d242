"""What a sharding layout is, and the table of layouts by name.

A layout says how prompts are split over its data-parallel groups (`data_groups`) and how the
model is loaded and placed (`prepare`, which returns a `Placed`): whether it is `lockstep`
(every rank of its group must run every forward, because the weights live on several ranks),
which process group the loop's "any rank still has work" all-reduce runs on, where inputs live,
and how many parameter bytes stayed on this rank.
"""
from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from distgen.common.checks import require
from distgen.config import LayoutConfig, named_adapters
from distgen.parallel.env import DistContext
from distgen.common.errors import ConfigError
from distgen.models.loading import ModelSource
from distgen.models.quantizers import get_quantizer
from distgen.common.registry import Registry
from distgen.outputs.stats import tensor_bytes, weight_tensors

DISK = "disk"


@dataclass(frozen=True)
class DataGroups:
    """Ranks split into data-parallel groups; each group holds one copy of the model."""
    # Every group's ranks, in group order; each rank is in exactly one.
    groups: tuple[tuple[int, ...], ...]
    # The group this rank is in.
    index: int

    @property
    def members(self) -> tuple[int, ...]:
        return self.groups[self.index]


def contiguous_groups(world_size: int, group_size: int, rank: int) -> DataGroups:
    """Ranks 0..k-1 form group 0, k..2k-1 group 1, ... (k ranks of a node shard together)."""
    groups = tuple(tuple(range(start, start + group_size)) for start in range(0, world_size, group_size))
    return DataGroups(groups, rank // group_size)


def one_group_per_rank(cfg: LayoutConfig, ctx: DistContext) -> DataGroups:
    """Every rank holds a whole replica: as many groups as ranks."""
    return contiguous_groups(ctx.world_size, 1, ctx.rank)


def shard_groups(cfg: LayoutConfig, ctx: DistContext) -> DataGroups:
    """Groups of `layout.shard_group_size` ranks, each sharding one copy (default: one group of all)."""
    size = getattr(cfg, "shard_group_size", None) or ctx.world_size
    if ctx.world_size % size:
        raise ConfigError(f"layout.shard_group_size={size} is not allowed: it must divide the number of ranks "
                          f"({ctx.world_size})")
    return contiguous_groups(ctx.world_size, size, ctx.rank)


@dataclass
class Placed:
    """A model placed by a layout, and what the generation loop must know about it."""
    model: nn.Module
    # Every rank of `group` must run every forward (its weights live on several ranks).
    lockstep: bool
    # Where the batch's input tensors go (the device of the embeddings).
    input_device: torch.device
    # The ranks that step together; the lockstep all-reduce runs on it (None: all ranks).
    group: Optional[object] = None
    # Which blocks went where (device_map), for the rank's stats.
    device_map: Optional[dict[str, str]] = None
    # Frees what generation needed and the loop no longer does (gathered weights, offload files).
    release: Callable[[], None] = lambda: None
    # Parameter bytes resident on this rank right after placement, by device (or "disk").
    param_bytes: dict[str, int] = field(default_factory=dict)
    # Adapters chosen per record (model.lora by name: distgen/models/lora.py AdapterBank), swapped into `model`.
    adapters: Optional[object] = None


@dataclass(frozen=True)
class Layout:
    name: str
    prepare: Callable[[ModelSource, LayoutConfig, DistContext, DataGroups], Placed]
    data_groups: Callable[[LayoutConfig, DistContext], DataGroups] = one_group_per_rank
    # The package this layout imports when chosen (beyond distgen's own requirements), if any.
    needs: Optional[str] = None
    # Whether a rank may swap LoRA adapters into its weights between records (model.lora by name): it holds
    # the whole model and runs free of the other ranks.
    swaps_adapters: bool = False
    # Every weight tensor stays whole on the rank that holds it (the layout places modules; fsdp and zero3 split
    # tensors over ranks): the layouts that can place quantized weights no layout can split (Quantizer.shardable).
    whole_tensors: bool = False

    def check(self, cfg) -> None:
        """Its package is installed, it can place the quantized weights and run adapters chosen per record if given
        (before any worker starts)."""
        require(self.needs is None or importlib.util.find_spec(self.needs) is not None, "layout", self.name,
                f"it needs the {self.needs} package, which is not installed here (pip install {self.needs})")
        swapping = ", ".join(name for name, entry in LAYOUTS.entries.items() if entry.impl.swaps_adapters)
        require(self.swaps_adapters or named_adapters(cfg.model.lora) is None, "model.lora", cfg.model.lora,
                f"adapters chosen per record are swapped into a whole model between records (layout={swapping}); "
                f"layout={self.name} takes one adapter folder, merged into the weights at load")
        quantization = cfg.model.quantization
        placing = ", ".join(name for name, entry in LAYOUTS.entries.items() if entry.impl.whole_tensors)
        require(self.whole_tensors or get_quantizer(quantization).shardable, "model.quantization", quantization,
                f"layout={self.name} cannot shard {quantization} weights; layouts that can place them: {placing}")


LAYOUTS: Registry[Layout] = Registry("layout")


def register(layout: Layout, config: type[LayoutConfig]) -> Layout:
    return LAYOUTS.register(layout.name, config, layout, check=layout.check)


def get_layout(name: str) -> Layout:
    return LAYOUTS.get(name)


def block_classes(model: nn.Module) -> set[str]:
    """The repeated blocks (decoder layers) the model itself says must not be split."""
    return set(getattr(model, "_no_split_modules", None) or [])


def local_part(param: torch.Tensor) -> tuple[str, int]:
    """Where this rank's part of one parameter lives, and its bytes.

    FSDP2 parameters are DTensors (the local shard); ZeRO-3 ones carry their partition in
    `ds_tensor` (plus the whole tensor when DeepSpeed keeps a small one persistent); a parameter
    left on the meta device by accelerate's disk offload lives in the offload folder.
    """
    if hasattr(param, "to_local"):
        local = param.to_local()
        return str(local.device), local.numel() * local.element_size()
    if hasattr(param, "ds_tensor"):
        whole = param.ds_numel * param.element_size() if getattr(param, "ds_persist", False) else 0
        return str(param.ds_tensor.device), param.ds_tensor.numel() * param.ds_tensor.element_size() + whole
    where = DISK if param.device.type == "meta" else str(param.device)
    return where, tensor_bytes(param)


def resident_param_bytes(model: nn.Module) -> dict[str, int]:
    """Parameter bytes this rank holds, by device (or "disk")."""
    totals: Counter[str] = Counter()
    for param in weight_tensors(model):
        where, size = local_part(param)
        totals[where] += size
    return dict(totals)


def full_param_bytes(model: nn.Module) -> int:
    """Bytes of the whole model's parameters (every shard together; quantized ones as stored)."""
    def whole(p: torch.Tensor) -> int:
        if hasattr(p, "ds_numel") or hasattr(p, "to_local"):
            return getattr(p, "ds_numel", p.numel()) * p.element_size()
        return tensor_bytes(p)
    return sum(whole(p) for p in weight_tensors(model))


def process_group(data_groups: DataGroups, timeout_s: Optional[float] = None):
    """This rank's group as a process group. Every rank creates every group, in the same order,
    as torch.distributed requires, then keeps its own."""
    import datetime

    import torch.distributed as dist

    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    made = [dist.new_group(list(members), timeout=timeout) for members in data_groups.groups]
    return made[data_groups.index]
