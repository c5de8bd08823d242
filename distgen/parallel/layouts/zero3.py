"""DeepSpeed ZeRO stage 3: every parameter partitioned over the ranks of a group while the model
is built (`deepspeed.zero.Init`), and gathered block by block for each forward by the hooks of a
`deepspeed.initialize` engine (stage 3, no optimizer). Every rank of the group joins every forward.

With `gather_for_generation` the full weights are gathered once into a plain copy that each rank
generates with on its own (no per-step gathers), then freed: for models that fit on one device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from distgen.common.checks import require
from distgen.common.registry import Registry
from distgen.config import LayoutConfig
from distgen.parallel.env import DistContext
from distgen.parallel.layouts.base import (DataGroups, Layout, Placed, process_group, register, resident_param_bytes,
                                  shard_groups)
from distgen.models.loading import ModelSource, resolve_dtype

# Where each rank keeps its partition between forwards (layout.offload_param): DeepSpeed's offload device, or None.
OFFLOAD_DEVICES: Registry[Optional[str]] = Registry("layout.offload_param", valued=True, within="zero3")
OFFLOAD_DEVICES.register("none", None, None, doc="on the rank's device")
OFFLOAD_DEVICES.register("cpu", None, "cpu", doc="in host memory, moved to the device for each forward")
OFFLOAD_DEVICES.register("nvme", None, "nvme", doc="in files under layout.nvme_path (DeepSpeed's async_io)")
# Where DeepSpeed JIT-builds its C++ ops (async_io for nvme offload), unless TORCH_EXTENSIONS_DIR says: kept, so
# a build happens once; beside distgen's CPU kernels in the user's cache (not beside the package: an installed
# wheel's folder is site-packages).
EXTENSIONS_DIR = Path.home() / ".cache" / "distgen" / "torch_extensions"


@dataclass
class Zero3Layout(LayoutConfig):
    """DeepSpeed ZeRO-3: parameters partitioned over a group of ranks; every rank of it joins every forward."""
    name: str = "zero3"
    # Where each rank keeps its partition between forwards: none (the device), cpu, or nvme (nvme_path).
    offload_param: str = "none"
    nvme_path: Optional[str] = None
    # DeepSpeed's stage3_prefetch_bucket_size and stage3_param_persistence_threshold; null: its defaults.
    stage3_prefetch_bucket_size: Optional[int] = None
    param_persistence_threshold: Optional[int] = None
    # Gather the full weights once and generate with a plain copy (no per-step gathers), then free it.
    gather_for_generation: bool = False
    # Ranks that partition one copy of the model (groups of replicas when fewer than all); null: all ranks.
    shard_group_size: Optional[int] = None
    # A collective of the group waiting longer than this fails (a rank stopped joining forwards).
    collective_timeout_s: float = 600.0

    def check(self) -> None:
        require(self.offload_param != "nvme" or bool(self.nvme_path), "layout.nvme_path", self.nvme_path,
                "layout.offload_param=nvme needs layout.nvme_path=<folder on a fast local disk>")
        require(self.shard_group_size is None or self.shard_group_size >= 1, "layout.shard_group_size",
                self.shard_group_size, "must be >= 1 (or null for all ranks)")
        require(self.collective_timeout_s > 0, "layout.collective_timeout_s", self.collective_timeout_s, "must be > 0")


def deepspeed_config(cfg: Zero3Layout, dtype: torch.dtype) -> dict:
    """A stage-3 inference config (no optimizer) from the layout's settings."""
    zero: dict = {"stage": 3}
    device = OFFLOAD_DEVICES.get(cfg.offload_param)
    if device is not None:
        zero["offload_param"] = {"device": device, "pin_memory": False,
                                 **({"nvme_path": cfg.nvme_path} if cfg.offload_param == "nvme" else {})}
    if cfg.stage3_prefetch_bucket_size is not None:
        zero["stage3_prefetch_bucket_size"] = cfg.stage3_prefetch_bucket_size
    if cfg.param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = cfg.param_persistence_threshold
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "steps_per_print": 2**31 - 1,
            "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}


def stale_build_locks(extensions_dir: Path, op: str) -> list[Path]:
    """Lock files a killed JIT build of `op` left behind (torch then waits on them forever)."""
    return sorted(extensions_dir.glob(f"**/{op}/lock"))


def check_nvme_offload(extensions_dir: Path) -> None:
    """offload_param=nvme needs DeepSpeed's async_io op: libaio present, and no half-built op."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    locks = stale_build_locks(extensions_dir, "async_io")
    if locks:
        raise RuntimeError(f"layout.offload_param=nvme: {locks[0]} exists: an earlier build of DeepSpeed's "
                           f"async_io op was stopped halfway, and the build would wait on it forever; "
                           f"if no other build is running, delete that file and run again (the build takes ~17 min)")
    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise RuntimeError("layout.offload_param=nvme needs libaio: apt-get install libaio-dev, "
                           "or use layout.offload_param=cpu")


def skip_shm_comm_op(device: torch.device) -> None:
    """On CPU DeepSpeed JIT-builds a shared-memory all-reduce op when its comm backend starts
    (~2.5 min). ZeRO-3 gathers go through torch.distributed (gloo here); that op serves only
    DeepSpeed's own inference all-reduce, which this layout does not use: do not build it."""
    import deepspeed.ops

    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_partitioned(source: ModelSource, ds_config: dict, group, loads_weights: bool) -> nn.Module:
    """Build the model under zero.Init (each block partitioned as soon as it exists), then fill it
    from the full weights that the group's first rank holds, one parameter at a time."""
    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    # Weights come from the group's first rank below, so no random init; keep RoPE tables in fp32.
    with no_init_weights(), prevent_arange_dtype_change(), \
            deepspeed.zero.Init(config_dict_or_path=ds_config, data_parallel_group=group):
        model = source.unloaded()
    full = source.full().state_dict() if loads_weights else {}
    for name, param in model.named_parameters():
        # Gathered on entry; on exit the group's rank 0 (its first rank) broadcasts and each rank keeps its part.
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if loads_weights:
                param.data.copy_(full.pop(name))
    return model


def gather_plain_copy(model: nn.Module, source: ModelSource, device: torch.device) -> nn.Module:
    """The whole model as ordinary tensors on `device`, gathered one parameter at a time."""
    import deepspeed

    plain = source.skeleton().to_empty(device=device)
    plain_params = dict(plain.named_parameters())
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            plain_params[name].data.copy_(param.data)
    for (name, buffer), (_, target) in zip(model.named_buffers(), plain.named_buffers(), strict=True):
        target.copy_(buffer)
    return plain.eval()


def prepare(source: ModelSource, cfg: Zero3Layout, ctx: DistContext, groups: DataGroups) -> Placed:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger

    # Order matters: the extensions dir and the skipped op must be set before DeepSpeed's comm
    # backend starts (the first zero.Init), and the group must exist before zero.Init uses it.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))
    # zero.Init reads the rank from the environment, which a lone process (no launcher) lacks.
    for key, value in (("LOCAL_RANK", ctx.local_rank), ("RANK", ctx.rank), ("WORLD_SIZE", ctx.world_size)):
        os.environ.setdefault(key, str(value))
    if cfg.offload_param == "nvme":
        check_nvme_offload(Path(os.environ["TORCH_EXTENSIONS_DIR"]))
    skip_shm_comm_op(ctx.device)
    ds_logger.setLevel("WARNING")
    group = process_group(groups, cfg.collective_timeout_s)
    ds_config = deepspeed_config(cfg, resolve_dtype(source.cfg.dtype, ctx.device))
    leader = groups.members[0]
    model = build_partitioned(source, ds_config, group, loads_weights=ctx.rank == leader)
    # Buffers are not partitioned and not all are in the state dict (rotary tables): copy the leader's.
    for buffer in model.buffers():
        dist.broadcast(buffer, src=leader, group=group)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    module = engine.module.eval()
    param_bytes = resident_param_bytes(module)
    if not cfg.gather_for_generation:
        return Placed(module, lockstep=True, input_device=ctx.device, group=group, param_bytes=param_bytes)
    plain = gather_plain_copy(module, source, ctx.device)
    # Each rank now holds the whole model: it runs free; `release` frees the copy after generation.
    return Placed(plain, lockstep=False, input_device=ctx.device, group=group, param_bytes=param_bytes,
                  release=lambda: plain.to_empty(device="meta"))


register(Layout("zero3", prepare=prepare, data_groups=shard_groups, needs="deepspeed"), Zero3Layout)
