"""What one rank does: load and place the model, take its share of prompts, generate, and
write its completions to its own output shards as they finish."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

import distgen.catalog  # noqa: F401  every implementation registered (the CPU backend's kernels and attention)
from distgen.parallel.env import DistContext
from distgen.engine import Completion, build_engine
from distgen.engine.assist import assistant_spec
from distgen.engine.build import QueueShape, device_defaults, plan_batch_size, rank_budget
from distgen.engine.memory import BatchChoice, agree_across_ranks
from distgen.parallel.feed import CHUNK, PromptFeed
from distgen.parallel.layouts import DataGroups, get_layout
from distgen.parallel.layouts.base import full_param_bytes, resident_param_bytes
from distgen.parallel.loop import LoopCounters, idle_forward, run_loop
from distgen.models.loading import ModelSource, resolve_dtype
from distgen.parallel.plan import assign_to_ranks, decode_order
from distgen.job.prepare import Job
from distgen.outputs.progress import LiveCounters, ProgressDisplay, RankSampler
from distgen.outputs.records import output_record
from distgen.outputs.shards import ShardWriter
from distgen.outputs.stats import RankStats, cuda_peaks_mib, device_name, host_name, peak_rss_mib, reset_peaks
from distgen.engine.stops import StopStrings

logger = logging.getLogger(__name__)


def resolve_eos_ids(configured: Sequence[int] | None, model, tokenizer) -> list[int]:
    if configured is not None:
        return list(configured)
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if model_eos is None:
        model_eos = tokenizer.eos_token_id
    if model_eos is None:
        return []
    return [model_eos] if isinstance(model_eos, int) else list(model_eos)


def resolved_budgets(job: Job) -> np.ndarray:
    """Each prompt's budget: its record's own max_new_tokens, else generation.max_new_tokens."""
    return np.where(job.budgets > 0, job.budgets, job.cfg.generation.max_new_tokens)


def split_costs(indices: np.ndarray, job: Job, parts: int) -> list[np.ndarray]:
    """`indices` balanced over `parts` by prompt length plus budget times the samples left (generation.n: a
    prompt is prefilled once, its samples decode side by side; each part in dataset order)."""
    costs = job.lengths[indices] + resolved_budgets(job)[indices] * job.left[indices]
    return [indices[part] for part in assign_to_ranks(costs, parts)]


def rank_shard(job: Job, groups: DataGroups, rank: int) -> np.ndarray:
    """This rank's prompt indices in decoding order: prompts split over the layout's data-parallel
    groups, then over the ranks of a group. Every rank computes the same plan from the shared lengths;
    a rank's prompts come grouped by LoRA adapter (where records choose one)."""
    group_todo = split_costs(job.todo, job, len(groups.groups))[groups.index]
    mine = split_costs(group_todo, job, len(groups.members))[groups.members.index(rank)]
    return decode_order(mine, job.lengths, resolved_budgets(job), job.adapters if len(job.adapters) else None)


@dataclass
class RankRun:
    """What a rank hands the coordinator: its stats and its sampled timeline."""
    stats: RankStats
    timeline: list[dict]


def write_error_records(job: Job, writer: ShardWriter) -> None:
    """The coordinator's share before it generates: error records for the rejected prompts, a chunk at a time."""
    rejected = job.rejected
    for at in range(0, len(rejected), CHUNK):
        writer.append(job.error_records(rejected[at:at + CHUNK]))


def queue_shape(job: Job, mine: np.ndarray) -> QueueShape:
    """This rank's sequences: each prompt once per sample it still needs."""
    left = job.left[mine]
    return QueueShape(np.repeat(job.lengths[mine].astype(np.int64), left),
                      np.repeat(resolved_budgets(job)[mine].astype(np.int64), left))


def rank_batch(model, job: Job, shape: QueueShape, device, placed, local_world_size: int) -> Optional[BatchChoice]:
    """generation.batch_size=auto (given, or the device's default): the rows this rank fits (in a lockstep layout,
    the least over its group)."""
    gen = device_defaults(job.cfg.generation, device)[0]
    if gen.batch_size != "auto":
        return None
    choice = plan_batch_size(model, gen, shape, rank_budget(gen, device, local_world_size), device)
    if placed.lockstep:
        choice = agree_across_ranks(choice, shape.prompts > 0, device, placed.group)
    return choice


def graph_counts(engine) -> dict:
    counters = engine.decoder.counters if engine.decoder is not None else None
    return dict(cuda_graph_replays=counters.replays, cuda_graph_capture_seconds=round(counters.capture_seconds, 3),
                eager_decode_steps=counters.eager_steps) if counters else {}


def adapter_counts(bank) -> dict:
    """How often this rank swapped LoRA adapters into its weights (model.lora by name), and the seconds it took."""
    return dict(adapter_switches=bank.switches, adapter_switch_seconds=round(bank.seconds, 3)) if bank else {}


def draft_counts(engine) -> dict[str, int]:
    counters = engine.assistant.counters if engine.assistant is not None else None
    return dict(draft_proposed=counters.proposed, draft_accepted=counters.accepted) if counters else {}


def idle_run(job: Job, ctx: DistContext) -> RankRun:
    """A rank of a job whose every record is already written (an earlier run finished them, its manifest did
    not close): nothing to load or generate, the coordinator closes the job."""
    rss = round(peak_rss_mib(), 1)
    stats = RankStats(rank=ctx.rank, device=str(ctx.device), device_name=device_name(ctx.device), host=host_name(),
                      prompts=0, prompt_tokens=0, generated_tokens=0, forward_steps=0, idle_steps=0, load_seconds=0.0,
                      generate_seconds=0.0, wall_seconds=0.0, load_peak_rss_mib=rss, peak_rss_mib=rss,
                      cuda_peak_allocated_mib=0.0, cuda_peak_reserved_mib=0.0)
    return RankRun(stats, [])


def generate_shard(job: Job, ctx: DistContext, display: Optional[ProgressDisplay] = None) -> RankRun:
    """Generate this rank's prompts; records go to this rank's shards as they finish."""
    if not job.left.any():
        return idle_run(job, ctx)
    wall_start = time.perf_counter()
    reset_peaks(ctx.device)
    layout = get_layout(job.cfg.layout.name)
    groups = layout.data_groups(job.cfg.layout, ctx)
    placed = layout.prepare(ModelSource(job.cfg.model, job.tokenizer, ctx.device), job.cfg.layout, ctx, groups)
    model, device = placed.model, placed.input_device
    param_bytes = placed.param_bytes or resident_param_bytes(model)
    load_seconds = time.perf_counter() - wall_start
    load_peak_rss = peak_rss_mib()

    pad_id = job.tokenizer.pad_token_id
    eos_ids = resolve_eos_ids(job.cfg.generation.eos_token_ids, model, job.tokenizer)
    gen, out = job.cfg.generation, job.cfg.output
    stops = StopStrings(job.tokenizer, job.cfg.generation.stop, job.cfg.generation.min_tokens)
    mine = rank_shard(job, groups, ctx.rank)
    feed = PromptFeed(job.source, mine, job.tokenizer, lengths=job.lengths)
    shape = queue_shape(job, mine)
    batch = rank_batch(model, job, shape, device, placed, ctx.local_world_size)
    # The draft model (model.assistant) is whole on every rank, never sharded (distgen/engine/assist.py).
    assistant = assistant_spec(job.cfg.model, job.tokenizer, resolve_dtype(job.cfg.model.dtype, device), device)
    engine = build_engine(model, feed, gen, pad_id, eos_ids, device, lockstep=placed.lockstep,
                          shape=shape, stop_check=stops.hit, batch=batch, assistant=assistant,
                          local_world_size=ctx.local_world_size, adapters=placed.adapters,
                          samples=job.sample_indices, tokenizer=job.tokenizer, layout=job.cfg.layout.name)
    # Each rank's engine line once: rank 0's at info, the others' at debug (output.log_level=debug).
    logger.log(logging.INFO if ctx.is_coordinator else logging.DEBUG, "engine: %s", engine.choice)
    if batch is not None:
        logger.info("generation.batch_size=auto picked %d: %s", batch.rows, batch.reason)
    live, counters = LiveCounters(), LoopCounters()
    sampler = RankSampler(ctx.rank, out.sample_every_s, job.work_path("progress"), live, counters, ctx.device,
                          display)
    with ShardWriter(job.out_dir, ctx.rank, out.format, out.shard_size) as writer, sampler:
        if ctx.is_coordinator:
            write_error_records(job, writer)

        def keep(completions: list[Completion]) -> None:
            finished = [output_record(c, stops.cut, out.keep_prompt) for c in completions]
            writer.append(finished)
            live.prompts += len(finished)
            live.prompt_tokens += sum(r["prompt_tokens"] for r in finished)
            live.generated_tokens += sum(r["completion_tokens"] for r in finished)
            live.sampled += sum(c.sampled and c.error is None for c in completions)

        try:
            run_loop(engine, placed.lockstep, lambda: idle_forward(model, pad_id, device), device, keep,
                     group=placed.group, sync_every=gen.sync_every, counters=counters)
        except RuntimeError as err:
            if "timed out" not in str(err).lower() or not placed.lockstep:
                raise
            # Every rank still in the collective says this; the rank that stopped is the one that does not.
            peers = [r for r in groups.members if r != ctx.rank]
            raise RuntimeError(f"rank {ctx.rank}: a collective of layout={job.cfg.layout.name} timed out waiting "
                               f"for the other ranks of its group {peers}: one of them stopped joining forwards "
                               f"(the one whose log lacks this message)") from err
    engine.close()
    model_bytes = full_param_bytes(model)
    placed.release()
    allocated, reserved = cuda_peaks_mib(ctx.device)
    stats = RankStats(
        rank=ctx.rank, device=str(ctx.device), device_name=device_name(ctx.device), host=host_name(),
        prompts=live.prompts, prompt_tokens=live.prompt_tokens,
        generated_tokens=live.generated_tokens, forward_steps=counters.forward_steps, idle_steps=counters.idle_steps,
        load_seconds=round(load_seconds, 3), generate_seconds=round(counters.seconds, 3),
        wall_seconds=round(time.perf_counter() - wall_start, 3), load_peak_rss_mib=round(load_peak_rss, 1),
        peak_rss_mib=round(peak_rss_mib(), 1),
        cuda_peak_allocated_mib=round(allocated, 1), cuda_peak_reserved_mib=round(reserved, 1),
        param_bytes=param_bytes, model_param_bytes=model_bytes, device_map=placed.device_map,
        batch_size=engine.batch.rows, batch_size_reason=engine.batch.reason, final_batch_size=engine.backoff.rows,
        oom_backoffs=engine.backoff.count, compile_seconds=round(engine.runner.compile_seconds, 3),
        host_reads=engine.host_reads, prefill_tokens=engine.prefill_tokens,
        shared_prefix_tokens=engine.prefixes.shared_tokens if engine.prefixes is not None else 0,
        prefill_step_seconds=round(engine.prefill_seconds, 3),
        **graph_counts(engine),
        blocking_syncs_per_step=round(engine.host_reads / max(1, counters.forward_steps), 3),
        **draft_counts(engine), **adapter_counts(placed.adapters),
        engine=engine.plan.as_dict(), batch_invariant=engine.plan.batch_invariant, sampled_completions=live.sampled)
    return RankRun(stats, [asdict(sample) for sample in sampler.samples])
