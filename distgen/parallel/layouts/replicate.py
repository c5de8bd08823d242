"""Every rank holds the whole model and generates for its own prompts (data parallel)."""
from __future__ import annotations

from dataclasses import dataclass

from distgen.config import LayoutConfig
from distgen.parallel.env import DistContext
from distgen.parallel.layouts.base import DataGroups, Layout, Placed, register
from distgen.models.loading import ModelSource


@dataclass
class ReplicateLayout(LayoutConfig):
    """Every rank holds the whole model; ranks run free (data parallel)."""
    name: str = "replicate"


def prepare(source: ModelSource, cfg: ReplicateLayout, ctx: DistContext, groups: DataGroups) -> Placed:
    model = source.full().to(ctx.device)
    # Adapters chosen per record: each rank swaps them into its own copy (ranks run free).
    return Placed(model, lockstep=False, input_device=ctx.device, adapters=source.adapters(model))


register(Layout("replicate", prepare=prepare, swaps_adapters=True, whole_tensors=True), ReplicateLayout)
