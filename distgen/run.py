"""Worker entry point, one process per rank:

    torchrun --nproc_per_node=2 -m distgen.run layout=fsdp dataset=prompts.jsonl output.dir=out/

Everything that can be wrong with the config, the prompts file or the model folder is
reported before the process group starts.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from transformers.utils import logging as hf_logging

from distgen.config import RunConfig
from distgen.coordinator import (OUTPUTS_FILE, format_table, gather_to_coordinator, order_records, summarize,
                                 write_outputs)
from distgen.dist_env import DistContext, discover, init_distributed, shutdown
from distgen.errors import ConfigError
from distgen.load_config import config_to_yaml, help_text, load_config
from distgen.model_loading import check_model_source, load_model_config, load_tokenizer
from distgen.procs import exit_on_termination
from distgen.prompts import Prompt, read_prompts
from distgen.records import ERROR, remove_journals
from distgen.resume import job_complete, job_fingerprint, load_finished, shared_skip
from distgen.screening import context_limit, screen_prompts
from distgen.stats import RankStats
from distgen.worker import Job, generate_shard

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


def check_inputs(cfg: RunConfig) -> tuple[list[Prompt], object]:
    """The prompts and the tokenizer, once the prompts file, the model folder, its tokenizer and the
    output folder are known to be usable."""
    prompts = read_prompts(cfg.dataset)
    check_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    check_output_dir(cfg.output.dir)
    return prompts, tokenizer


def prepare_job(cfg: RunConfig) -> Job:
    """Everything up to the first worker: inputs checked, prompts tokenized and screened."""
    prompts, tokenizer = check_inputs(cfg)
    token_ids = [tokenizer(p.text, add_special_tokens=True)["input_ids"] for p in prompts]
    limit = context_limit(load_model_config(cfg.model, tokenizer))
    screened = screen_prompts(prompts, token_ids, limit, cfg.dataset.too_long, cfg.generation.max_new_tokens)
    return Job(cfg, prompts, tokenizer, screened.token_ids, job_fingerprint(cfg, prompts),
               rejected=screened.rejected)


def finished_message(job: Job) -> str:
    return (f"distgen: job {job.fingerprint} already finished: {len(job.prompts)} prompts in "
            f"{Path(job.cfg.output.dir) / OUTPUTS_FILE}; nothing to do (output.resume=false runs it again)")


def coordinate(job: Job, ctx: DistContext, records: list[dict], stats: RankStats) -> None:
    gathered_records = gather_to_coordinator(records, ctx.rank, ctx.world_size)
    gathered_stats = gather_to_coordinator(stats, ctx.rank, ctx.world_size)
    if not ctx.is_coordinator:
        return
    ordered = order_records([list(job.finished.values()), job.error_records(), *gathered_records],
                            len(job.prompts))
    summary = summarize(gathered_stats, len(job.prompts), resumed=len(job.finished), job=job.fingerprint,
                        errors=sum(r["finish_reason"] == ERROR for r in ordered))
    out_dir = Path(job.cfg.output.dir)
    write_outputs(out_dir, ordered, gathered_stats, summary)
    remove_journals(out_dir)
    if job.cfg.output.print_table:
        print(format_table(gathered_stats, summary))
    print(f"wrote {len(ordered)} records to {out_dir / OUTPUTS_FILE} ({summary['errors']} errors)", flush=True)


def run_job(job: Job, ctx: DistContext) -> None:
    cfg = job.cfg
    finished = load_finished(Path(cfg.output.dir), job.fingerprint, job.prompts) \
        if ctx.is_coordinator and cfg.output.resume else {}
    complete = ctx.is_coordinator and cfg.output.resume and job_complete(Path(cfg.output.dir), job.fingerprint,
                                                                          len(job.prompts))
    job.finished = finished
    job.skip, complete = shared_skip(finished, complete, ctx.is_coordinator)
    if complete:
        if ctx.is_coordinator:
            print(finished_message(job), flush=True)
        return
    if job.finished and ctx.is_coordinator:
        print(f"distgen: resuming: {len(job.finished)} of {len(job.prompts)} prompts already done in "
              f"{cfg.output.dir}", flush=True)
    with torch.no_grad():
        records, stats = generate_shard(job, ctx)
    coordinate(job, ctx, records, stats)


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
        # Every rank says it: torchrun stops the others as soon as the first one exits.
        print(f"distgen: config error: {err}", file=sys.stderr, flush=True)
        return 2
    hf_logging.disable_progress_bar()
    with exit_on_termination():
        ctx = init_distributed(cfg.device, info=discover(os.environ, local_rank))
        clean = False
        try:
            run_job(job, ctx)
            clean = True
        finally:
            shutdown(clean)
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
