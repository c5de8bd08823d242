"""Worker entry point, one process per rank:

    torchrun --nproc_per_node=2 -m distgen.run layout=fsdp dataset=prompts.jsonl output.dir=out/

Everything that can be wrong with the config, the dataset or the model folder is reported
before the process group starts (a bad record: while the ranks measure prompt lengths).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from distgen.config import RunConfig
from distgen.coordinator import format_table, gather_to_coordinator, summarize, write_atomic, write_stats
from distgen.dist_env import DistContext, discover, init_distributed, shutdown
from distgen.errors import ConfigError
from distgen.feed import BUDGET, LENGTH, SCREEN, Screening, broadcast_flag, check_fits, shared_lengths
from distgen.inputs import PromptSource, open_prompts
from distgen.load_config import config_to_yaml, help_text, load_config
from distgen.model_loading import check_model_source, load_model_config, load_tokenizer
from distgen.procs import exit_on_termination
from distgen.progress import ProgressDisplay
from distgen.report import REPORT_FILE, render_report
from distgen.resume import job_fingerprint, shared_skip
from distgen.screening import context_limit
from distgen.shards import MERGED_FILE, OUTPUTS_DIR, finish_outputs, job_complete, start_outputs
from distgen.worker import WORK_DIR, Job, RankRun, generate_shard

USAGE = __doc__ + """
Options:
  --print-config  show the composed config (unchecked, so it works before a model is named) and exit
  --check         check the config, the prompts file, the model folder and its tokenizer, then exit
  --help          this text, the config groups and every key with its default
"""
FLAGS = ("--print-config", "--check")
# deepspeed's launcher passes one of these to the module it starts, before the user's arguments.
LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")


def split_local_rank(args: Sequence[str]) -> tuple[list[str], int | None]:
    """The arguments without deepspeed's `--local_rank=N` (or `--local_rank N`), and N."""
    rest, local_rank, values = [], None, iter(args)
    for arg in values:
        key, sep, value = arg.partition("=")
        if key in LOCAL_RANK_FLAGS:
            value = value if sep else next(values, "")
            if not value.isdigit():
                raise ConfigError(f"{key}={value!r} is not allowed: must be a rank number")
            local_rank = int(value)
        else:
            rest.append(arg)
    return rest, local_rank


def usage() -> str:
    return USAGE + "\n" + help_text()


def check_output_dir(out_dir: str) -> None:
    """The folder, or the nearest one above it that exists, must be writable; nothing is created."""
    existing = Path(out_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir={out_dir!r} cannot be written: {existing} is not a writable folder")


def dataset_cache(cfg: RunConfig) -> str:
    """Where the datasets library keeps the Arrow form of a converted file: reused by later runs."""
    return str(Path(cfg.output.dir) / WORK_DIR / "datasets")


def open_checked(cfg: RunConfig, tokenizer=None) -> PromptSource:
    """The dataset (its columns and ids; each record is checked when the ranks measure lengths,
    a JSON-lines file line by line when Arrow cannot read it). An unusable dataset leaves no
    output folder behind: the Arrow cache is removed with the folder it created."""
    created = not Path(cfg.output.dir).exists()
    try:
        return open_prompts(cfg.dataset, dataset_cache(cfg), tokenizer)
    except ConfigError:
        if created:
            shutil.rmtree(cfg.output.dir, ignore_errors=True)
        raise


def check_inputs(cfg: RunConfig) -> tuple[PromptSource, object, bool]:
    """The dataset and the tokenizer, once the model folder, its tokenizer, the output folder and
    the dataset are known to be usable; and whether output.dir was created for the dataset's cache."""
    check_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    check_output_dir(cfg.output.dir)
    created = not Path(cfg.output.dir).exists()
    return open_checked(cfg, tokenizer), tokenizer, created


def prepare_job(cfg: RunConfig) -> Job:
    """Everything up to the first worker: inputs checked; prompts are tokenized and screened by the ranks."""
    source, tokenizer, created = check_inputs(cfg)
    screening = Screening(context_limit(load_model_config(cfg.model, tokenizer)), cfg.dataset.too_long,
                          cfg.generation.max_new_tokens)
    return Job(cfg, source, tokenizer, job_fingerprint(cfg, source.digest()), screening, created_out=created)


def finished_message(job: Job) -> str:
    return (f"distgen: job {job.fingerprint} already finished: {job.prompt_count} prompts in "
            f"{job.out_dir / OUTPUTS_DIR}; nothing to do (output.resume=false runs it again)")


def share_plan(job: Job, ctx: DistContext) -> bool:
    """Every prompt's length and screening, and the finished prompts (rank 0 reads the shards), on
    every rank; False when an earlier run already finished the whole job (nothing to do)."""
    resume = job.cfg.output.resume
    complete = ctx.is_coordinator and resume and job_complete(job.out_dir, job.fingerprint)
    if broadcast_flag(complete, ctx):
        if ctx.is_coordinator:
            print(finished_message(job), flush=True)
        return False
    table = shared_lengths(job.source, job.tokenizer, ctx, job.work_path(f"lengths-{job.fingerprint}.npy"),
                           job.screening)
    check_fits(table, job.source, job.tokenizer, job.screening)
    job.lengths, job.budgets, job.screen = table[LENGTH], table[BUDGET], table[SCREEN]
    finished = start_outputs(job.out_dir, job.fingerprint, resume) if ctx.is_coordinator else set()
    job.skip = shared_skip(finished, ctx.is_coordinator)
    if job.skip and ctx.is_coordinator:
        print(f"distgen: resuming: {len(job.skip)} of {job.prompt_count} prompts already done in "
              f"{job.cfg.output.dir}", flush=True)
    return True


def coordinate(job: Job, ctx: DistContext, run: RankRun, display: ProgressDisplay | None) -> None:
    """Rank 0: check the shards cover every prompt once, write the manifest, merge, stats and report."""
    gathered = gather_to_coordinator(run, ctx.rank, ctx.world_size)
    if not ctx.is_coordinator:
        return
    stats = [r.stats for r in gathered]
    if display is not None:
        display.update(sum(s.prompts for s in stats), sum(s.generated_tokens for s in stats), final=True)
    out, cfg = job.out_dir, job.cfg.output
    coverage = finish_outputs(out, job.fingerprint, job.prompt_count, cfg.format, cfg.merge, ctx.world_size)
    summary = summarize(stats, job.prompt_count, resumed=len(job.skip), job=job.fingerprint,
                        errors=job.error_count)
    write_stats(out, stats, summary, [r.timeline for r in gathered])
    if cfg.report:
        write_atomic(out / REPORT_FILE, render_report(
            summary, [s.as_record() for s in stats], [r.timeline for r in gathered],
            np.concatenate(coverage.prompt_tokens or [np.zeros(0, np.int32)]),
            np.concatenate(coverage.completion_tokens or [np.zeros(0, np.int32)])))
    if cfg.print_table:
        print(format_table(stats, summary))
    where = out / MERGED_FILE if cfg.merge else out / OUTPUTS_DIR
    print(f"wrote {job.prompt_count} records to {where} ({summary['errors']} errors)", flush=True)


def run_job(job: Job, ctx: DistContext) -> int:
    try:
        if not share_plan(job, ctx):
            return 0
    except ConfigError as err:  # a bad record found while measuring lengths, or dataset.too_long=fail
        if ctx.is_coordinator and job.created_out:
            shutil.rmtree(job.out_dir, ignore_errors=True)  # nothing of an unusable job stays behind
        return config_error(err)
    display = ProgressDisplay(len(job.todo), job.cfg.output.progress_every_s) if ctx.is_coordinator else None
    with torch.no_grad():
        run = generate_shard(job, ctx, display)
    coordinate(job, ctx, run, display)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(usage())
        return 0
    try:
        args, local_rank = split_local_rank(args)
        overrides = [a for a in args if a not in FLAGS]
        if "--print-config" in args:
            print(config_to_yaml(load_config(overrides, check=False)))
            return 0
        cfg = load_config(overrides)
        if "--check" in args:
            print(f"distgen: config ok, {len(check_inputs(cfg)[0])} prompts")
            return 0
        job = prepare_job(cfg)
    except ConfigError as err:
        return config_error(err)
    hf_logging.disable_progress_bar()
    with exit_on_termination():
        ctx = init_distributed(cfg.device, info=discover(os.environ, local_rank))
        clean = False
        try:
            code = run_job(job, ctx)
            clean = code == 0
        finally:
            shutdown(clean)
    return code


def config_error(err: ConfigError) -> int:
    # Every rank says it: torchrun stops the others as soon as the first one exits.
    print(f"distgen: config error: {err}", file=sys.stderr, flush=True)
    return 2


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
