"""PyTorch FSDP2 (fully_shard): each decoder block's weights are sharded over the ranks and
all-gathered for its forward, so every rank joins every forward step."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from distgen.config import LayoutConfig
from distgen.dist_env import DistContext
from distgen.layouts.base import Layout, block_classes, register
from distgen.model_loading import ModelSource


@dataclass
class FsdpLayout(LayoutConfig):
    """PyTorch FSDP2: each decoder block sharded over the ranks; every rank joins every forward."""
    name: str = "fsdp"
    # Free each block's gathered weights after its forward (less memory, more all-gathers).
    reshard_after_forward: bool = True


def prepare(source: ModelSource, cfg: FsdpLayout, ctx: DistContext) -> nn.Module:
    """Shard each decoder block, then the root (embeddings, norm, head), over all ranks.

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
    return model


register(Layout("fsdp", lockstep=True, prepare=prepare), FsdpLayout)
