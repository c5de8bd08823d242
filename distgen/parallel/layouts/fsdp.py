"""PyTorch FSDP2 (fully_shard): each decoder block's weights are sharded over the ranks of a group
and all-gathered for its forward, so every rank of the group joins every forward step. With
`shard_group_size` below the number of ranks, it is HSDP: a 2-D mesh (replicas x shards), each
group of ranks sharding one copy of the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from distgen.common.checks import require
from distgen.config import LayoutConfig
from distgen.parallel.env import DistContext
from distgen.parallel.layouts.base import DataGroups, Layout, Placed, block_classes, register, shard_groups
from distgen.models.loading import ModelSource


@dataclass
class FsdpLayout(LayoutConfig):
    """PyTorch FSDP2: each decoder block sharded over a group of ranks; every rank of it joins every forward."""
    name: str = "fsdp"
    # Free each block's gathered weights after its forward (less memory, more all-gathers).
    reshard_after_forward: bool = True
    # Ranks that shard one copy of the model (HSDP when fewer than all); None: all ranks.
    shard_group_size: Optional[int] = None

    def check(self) -> None:
        require(self.shard_group_size is None or self.shard_group_size >= 1, "layout.shard_group_size",
                self.shard_group_size, "must be >= 1 (or null for all ranks)")


def prepare(source: ModelSource, cfg: FsdpLayout, ctx: DistContext, groups: DataGroups) -> Placed:
    """Shard each decoder block, then the root (embeddings, norm, head), over this rank's group.

    Only rank 0 reads the weights; the other ranks shard a weightless skeleton and receive
    their shards from rank 0, so a node holds one full copy in host memory, not one per rank.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = source.full() if ctx.is_coordinator else source.skeleton()
    full_state = model.state_dict() if ctx.is_coordinator else {}
    replicas, shards = len(groups.groups), len(groups.members)
    # 1-D mesh: plain FSDP. 2-D (replicate, shard): HSDP; forwards all-gather over "shard" only.
    mesh = (init_device_mesh(ctx.device.type, (shards,)) if replicas == 1 else
            init_device_mesh(ctx.device.type, (replicas, shards), mesh_dim_names=("replicate", "shard")))
    blocks = block_classes(model)
    if not blocks:
        raise ValueError(f"layout=fsdp: {type(model).__name__} names no decoder block class (_no_split_modules)")
    # Blocks first, then the root: the root's shard then covers only what no block owns.
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
    model = model.to(ctx.device) if ctx.is_coordinator else model.to_empty(device=ctx.device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers are not sharded and not all are in the state dict (rotary tables): copy rank 0's.
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    group = None if replicas == 1 else mesh.get_group("shard")
    return Placed(model, lockstep=True, input_device=ctx.device, group=group)


register(Layout("fsdp", prepare=prepare, data_groups=shard_groups), FsdpLayout)
