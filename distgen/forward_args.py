"""Which forward arguments a model accepts, so one decode path serves every architecture."""
from __future__ import annotations

import functools
import inspect

import torch


@functools.lru_cache(maxsize=None)
def accepts_position_ids(model_class: type) -> bool:
    """ALiBi models (Bloom, MPT) take no `position_ids`: they derive positions from the mask."""
    return "position_ids" in inspect.signature(model_class.forward).parameters


def position_kwargs(model: torch.nn.Module, position_ids: torch.Tensor) -> dict:
    return {"position_ids": position_ids} if accepts_position_ids(type(model)) else {}
