"""Sharding layouts: how the model is loaded and placed over the ranks.

Each layout says whether it is `lockstep`: whether every rank must run every forward
(its weights live on several ranks), which the generation loop must honour.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from distgen.config import LAYOUTS as LAYOUT_NAMES, LayoutConfig
from distgen.dist_env import DistContext
from distgen.model_loading import ModelSource


@dataclass(frozen=True)
class Layout:
    name: str
    lockstep: bool
    prepare: Callable[[ModelSource, LayoutConfig, DistContext], nn.Module]


REGISTRY: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    if layout.name not in LAYOUT_NAMES:
        raise ValueError(f"layout {layout.name!r} must be listed in distgen.config.LAYOUTS")
    REGISTRY[layout.name] = layout
    return layout


def get_layout(name: str) -> Layout:
    return REGISTRY[name]


def block_classes(model: nn.Module) -> set[str]:
    """The repeated blocks (decoder layers) the model itself says must not be split."""
    return set(getattr(model, "_no_split_modules", None) or [])


def prepare_replicate(source: ModelSource, cfg: LayoutConfig, ctx: DistContext) -> nn.Module:
    return source.full().to(ctx.device)


def prepare_fsdp(source: ModelSource, cfg: LayoutConfig, ctx: DistContext) -> nn.Module:
    """FSDP2: shard each decoder block, then the root (embeddings, norm, head), over all ranks.

    Only rank 0 reads the weights; the other ranks shard a weightless skeleton and receive
    their shards from rank 0, so a node holds one full copy in host memory, not one per rank.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = source.full() if ctx.is_coordinator else source.skeleton()
    full_state = model.state_dict() if ctx.is_coordinator else {}
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    blocks = block_classes(model)
    if not blocks:
        raise ValueError(f"layout=fsdp: {type(model).__name__} names no decoder block class (_no_split_modules)")
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
    model = model.to(ctx.device) if ctx.is_coordinator else model.to_empty(device=ctx.device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers are not sharded and not all are in the state dict (rotary tables): copy rank 0's.
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model


register(Layout("replicate", lockstep=False, prepare=prepare_replicate))
register(Layout("fsdp", lockstep=True, prepare=prepare_fsdp))
