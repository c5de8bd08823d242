"""A rank's whole job once the process group exists: share the plan (lengths, screening, finished work),
generate this rank's share, and (rank 0) check, merge and report the outputs."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from distgen.catalog.load import config_to_dict
from distgen.common import log
from distgen.common.errors import ConfigError, OutputSpaceError
from distgen.common.procs import exit_on_termination, exit_with_parent
from distgen.job.prepare import Job, claim_output_dir, say_finished
from distgen.inputs.keys import join_halves
from distgen.job.worker import RankRun, generate_shard
from distgen.common.files import write_atomic
from distgen.common.hub import hub_commit
from distgen.outputs.coordinator import (format_table, gather_to_coordinator, resumed_draws_note, run_figures,
                                         summarize, whole_job, write_stats)
from distgen.outputs.folder import MERGED_FILE, OUTPUTS_DIR, read_manifest
from distgen.outputs.lock import OutputLock
from distgen.outputs.progress import ProgressDisplay
from distgen.outputs.records import ERROR, MergeInfo
from distgen.outputs.report import REPORT_FILE, render_report
from distgen.outputs.resume import shared_done
from distgen.outputs.samples import SampleTable
from distgen.outputs.shards import Coverage, finish_outputs, job_complete, saying_no_space, start_outputs
from distgen.outputs.stats import environment
from distgen.parallel.env import DistContext, discover, init_distributed, shutdown
from distgen.parallel.feed import (ADAPTER, BUDGET, KEY_HIGH, KEY_LOW, LENGTH, SAMPLES, SCREEN, broadcast_flag,
                                   check_fits, shared_lengths)

logger = logging.getLogger(__name__)
# The coordinator's closing lines: the table and `wrote N records` (distgen/common/log.py REPORT).
report = logging.getLogger(log.REPORT)


def record_keys(table: np.ndarray) -> np.ndarray:
    """Each prompt's record key (distgen/inputs/keys.py) from its two halves in the length table."""
    return join_halves(table[KEY_HIGH].astype(np.int64), table[KEY_LOW].astype(np.int64))


def start_coordinator(job: Job, table: np.ndarray) -> np.ndarray:
    """Rank 0, holding the lock: repair and read the earlier shards, say what it found, claim the job's files;
    the finished records (a bool per (index, sample_index))."""
    repairs = start_outputs(job.out_dir, job.start(), record_keys(table), job.cfg.output.format, job.samples,
                            job.source.kept_names())
    for line in job.column_notes() + repairs.messages():
        logger.info(line)
    return repairs.finished


def share_plan(job: Job, ctx: DistContext) -> bool:
    """Every prompt's length and screening, and the finished prompts (rank 0 reads the shards), on
    every rank; False when an earlier run already finished the whole job (nothing to do)."""
    complete = ctx.is_coordinator and job.reuses and job_complete(job.out_dir, job.fingerprint)
    if broadcast_flag(complete, ctx):
        if ctx.is_coordinator:
            say_finished(job)
        return False
    table = shared_lengths(job.source, job.tokenizer, ctx, job.work_path(f"lengths-{job.fingerprint}.npy"),
                           job.screening)
    check_fits(table, job.source, job.tokenizer, job.screening)
    job.lengths, job.budgets, job.screen, job.adapters = table[LENGTH], table[BUDGET], table[SCREEN], table[ADAPTER]
    job.samples = SampleTable.of(np.where(table[SAMPLES] > 0, table[SAMPLES], job.cfg.generation.n))
    finished = start_coordinator(job, table) if ctx.is_coordinator else None
    job.done = shared_done(finished, ctx.is_coordinator)
    job.left = job.samples_left()
    if job.resumed and ctx.is_coordinator:
        what = "prompts" if job.samples.single else f"records of {job.prompt_count} prompts"
        logger.info("resuming: %d of %d %s already done in %s", job.resumed, job.record_count, what,
                    job.cfg.output.dir)
    return True


def model_metadata(job: Job) -> dict:
    """The model as configured, the folder it was read from, and its hub revision and commit (where it came from
    the Hugging Face cache)."""
    given, used = job.given.model, job.cfg.model
    if used.source == "tiny":
        return {"source": "tiny", "tiny": asdict(used.tiny)}
    found = {"source": used.source, "path": given.path, "folder": str(Path(used.path).absolute()),
             "revision": given.revision, "commit": hub_commit(used.path)}
    return {key: value for key, value in found.items() if value is not None}


def dataset_metadata(job: Job) -> dict:
    """The dataset as configured and, for a hub dataset, the snapshot folder it was read from and its commit."""
    given, used = job.given.dataset, job.cfg.dataset
    found = {"path": given.path, "format": used.format}
    if used.format == "hub":
        found.update(folder=str(Path(used.path).absolute()), revision=given.revision, subset=given.subset,
                     split=used.split, commit=hub_commit(used.path))
    return {key: value for key, value in found.items() if value is not None}


def run_metadata(job: Job, stats) -> dict:
    """What produced the outputs: the composed config (as --print-config prints it), the model and its revision,
    the dataset (and its hub commit), the versions, the devices and hosts, the date."""
    return {**environment(stats), "model": model_metadata(job), "dataset": dataset_metadata(job),
            "config": config_to_dict(job.given)}


def outcomes(summary: dict, coverage: Coverage) -> dict:
    """The whole job's records by finish reason, its error records (screening's and generation's) and the
    commonest errors."""
    return {**summary, "errors": coverage.finish_reasons.get(ERROR, 0),
            "finish_reasons": dict(sorted(coverage.finish_reasons.items())),
            "commonest_errors": coverage.errors.commonest()}


def merge_info(job: Job) -> MergeInfo:
    model = job.given.model
    return MergeInfo(model=model.path or model.source, job=job.fingerprint,
                     chat=bool(job.cfg.dataset.messages_field), created=int(time.time()),
                     token_text=lambda token: job.tokenizer.decode([token]))


def coordinate(job: Job, ctx: DistContext, run: RankRun, display: ProgressDisplay | None,
               lock: OutputLock | None = None) -> None:
    """Rank 0: check the shards cover every prompt once, write the manifest, merge, stats and report
    (of the whole job: the earlier runs' figures are kept in the manifest)."""
    gathered = gather_to_coordinator(run, ctx.rank, ctx.world_size)
    if not ctx.is_coordinator:
        return
    stats = [r.stats for r in gathered]
    if display is not None:
        display.update(sum(s.prompts for s in stats), sum(s.generated_tokens for s in stats), final=True)
    out, cfg = job.out_dir, job.cfg.output
    if lock is not None:
        lock.check_held()
    this_run = summarize(stats, job.prompt_count, resumed=job.resumed, job=job.fingerprint, records=job.record_count)
    coverage = finish_outputs(out, job.fingerprint, job.prompt_count, cfg.format, cfg.merge, ctx.world_size,
                              run=run_figures(this_run, stats), form=job.merge_format, info=merge_info(job),
                              samples=job.samples)
    runs = read_manifest(out).get("runs", [])
    summary = outcomes(whole_job(this_run, runs, coverage.completion_prompt_tokens, coverage.generated_tokens),
                       coverage)
    metadata = run_metadata(job, stats)
    write_stats(out, stats, summary, [r.timeline for r in gathered], metadata)
    if cfg.report:
        write_atomic(out / REPORT_FILE, render_report(
            summary, [s.as_record() for s in stats], [r.timeline for r in gathered],
            np.concatenate(coverage.prompt_tokens or [np.zeros(0, np.int32)]),
            np.concatenate(coverage.completion_tokens or [np.zeros(0, np.int32)]), runs, metadata))
    if cfg.print_table:
        report.info(format_table(stats, summary))
    note = resumed_draws_note(job.resumed, runs)
    if note:
        logger.info(note)
    where = out / MERGED_FILE if cfg.merge else out / OUTPUTS_DIR
    # OpenAI batch output holds a request's samples in one line (its choices).
    lines = f" in {job.prompt_count} lines" if cfg.merge and job.merge_format == "openai_batch" \
        and not job.samples.single else ""
    # With error records the line is a warning: --quiet (output.log_level=warning) still says the job had them.
    report.log(logging.WARNING if summary["errors"] else logging.INFO, "wrote %d records%s to %s (%d errors)",
               job.record_count, lines, where, summary["errors"])


def release_arrow_memory() -> None:
    """Arrow's allocator (mimalloc) keeps what reading and checking the dataset took (the id check
    alone ~24 MiB at 100k prompts, measured on CPU): hand it back before the model and the batches
    come on top, so a rank's memory does not grow with the dataset."""
    import pyarrow
    pyarrow.default_memory_pool().release_unused()


def run_job(job: Job, ctx: DistContext, lock: OutputLock | None = None) -> int:
    release_arrow_memory()
    try:
        return run_steps(job, ctx, lock)
    except OutputSpaceError as err:  # a full disk: the message says what was kept and how to go on
        logger.error(err.strerror)
        return 1


def run_steps(job: Job, ctx: DistContext, lock: OutputLock | None = None) -> int:
    try:
        with saying_no_space(job.out_dir, f"rank {ctx.rank} prepared the job (length table, manifest)",
                             "every record of earlier runs of this job"):
            planned = share_plan(job, ctx)
        if not planned:
            return 0
        release_arrow_memory()
    except ConfigError as err:  # a bad record found while measuring lengths, or dataset.too_long=fail
        if ctx.is_coordinator and job.created_out:
            shutil.rmtree(job.out_dir, ignore_errors=True)  # nothing of an unusable job stays behind
        return config_error(err)
    display = ProgressDisplay(int(job.left[job.todo].sum()), job.cfg.output.progress_every_s,
                              unit="prompt" if job.samples.single else "record") \
        if ctx.is_coordinator else None
    with torch.no_grad():
        run = generate_shard(job, ctx, display)
    with saying_no_space(job.out_dir, f"rank {ctx.rank} closed and merged the shards",
                         "every record of the job, in its shards"):
        coordinate(job, ctx, run, display, lock)
    return 0


def run_ranks(job: Job, local_rank: int | None = None) -> int:
    """This process as one rank of the job: join the process group (from the launcher's environment), run, leave."""
    hf_logging.disable_progress_bar()
    info = discover(os.environ, local_rank)
    # A rank that waits for others (a rendezvous, a collective) exits soon after a signal even inside that call.
    with exit_on_termination(exit_blocked=info.world_size > 1), \
            exit_with_parent() if info.agent_parent else contextlib.nullcontext():
        try:
            # Rank 0 holds output.dir's lock from before the process group to its end.
            with claim_output_dir(job) if info.rank == 0 else contextlib.nullcontext() as lock:
                ctx = init_distributed(job.cfg.device, info=info)
                clean = False
                try:
                    code = run_job(job, ctx, lock)
                    clean = code == 0
                finally:
                    shutdown(clean)
        except ConfigError as err:  # output.dir locked or in the way, or the lock lost before the merge
            return config_error(err)
    return code


def config_error(err: ConfigError) -> int:
    # Every rank says it: torchrun stops the others as soon as the first one exits.
    logger.error("config error: %s", err)
    return 2
