"""What a sharding layout is, and the table of layouts by name.

Each layout says whether it is `lockstep`: whether every rank must run every forward (its
weights live on several ranks), which the generation loop must honour.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from distgen.config import LayoutConfig
from distgen.dist_env import DistContext
from distgen.model_loading import ModelSource
from distgen.registry import Registry


@dataclass(frozen=True)
class Layout:
    name: str
    lockstep: bool
    prepare: Callable[[ModelSource, LayoutConfig, DistContext], nn.Module]


LAYOUTS: Registry[Layout] = Registry("layout")


def register(layout: Layout, config: type[LayoutConfig]) -> Layout:
    return LAYOUTS.register(layout.name, config, layout)


def get_layout(name: str) -> Layout:
    return LAYOUTS.get(name)


def block_classes(model: nn.Module) -> set[str]:
    """The repeated blocks (decoder layers) the model itself says must not be split."""
    return set(getattr(model, "_no_split_modules", None) or [])
