"""Which forward arguments a model accepts, so one decode path serves every architecture."""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


@functools.lru_cache(maxsize=None)
def accepts_position_ids(model_class: type) -> bool:
    """ALiBi models (Bloom, MPT) take no `position_ids`: they derive positions from the mask."""
    return "position_ids" in inspect.signature(model_class.forward).parameters


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a wrapper whose forward takes anything (DeepSpeed's engine)."""
    return getattr(model, "module", model)


def model_inputs(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """`inputs` without the arguments this model's forward does not take."""
    if "position_ids" in inputs and not accepts_position_ids(type(unwrapped(model))):
        return {key: value for key, value in inputs.items() if key != "position_ids"}
    return inputs
