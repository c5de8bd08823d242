"""Sharding layouts: how a loaded model is placed over the ranks.

Each layout says whether it is `lockstep`: whether every rank must run every forward
(its weights live on several ranks), which the generation loop must honour.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from distgen.config import LAYOUTS as LAYOUT_NAMES, LayoutConfig
from distgen.dist_env import DistContext


@dataclass(frozen=True)
class Layout:
    name: str
    lockstep: bool
    prepare: Callable[[nn.Module, LayoutConfig, DistContext], nn.Module]


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


def prepare_replicate(model: nn.Module, cfg: LayoutConfig, ctx: DistContext) -> nn.Module:
    return model.to(ctx.device)


def prepare_fsdp(model: nn.Module, cfg: LayoutConfig, ctx: DistContext) -> nn.Module:
    """FSDP2: shard each decoder block, then the root (embeddings, norm, head), over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    blocks = block_classes(model)
    if not blocks:
        raise ValueError(f"layout=fsdp: {type(model).__name__} names no decoder block class (_no_split_modules)")
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
    return model.to(ctx.device)


register(Layout("replicate", lockstep=False, prepare=prepare_replicate))
register(Layout("fsdp", lockstep=True, prepare=prepare_fsdp))
