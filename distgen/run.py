"""Worker entry point, one process per rank:

    torchrun --nproc_per_node=2 -m distgen.run layout=fsdp dataset=prompts.jsonl output.dir=out/

Everything that can be wrong with the config, the dataset or the model folder is reported
before the process group starts (a bad record: while the ranks measure prompt lengths).
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

from distgen.catalog.load import config_to_yaml, help_text, load_config, split_job_file
from distgen.common import log
from distgen.common.errors import ConfigError
from distgen.job.prepare import check_inputs, prepare_job, resolve_sources
from distgen.job.run import config_error, run_ranks
from distgen.parallel.env import discover

USAGE = __doc__ + """
Options:
  --config-dir DIR --config-name NAME
                  a job file: NAME.yaml in DIR (default: here), composed over the defaults; the key=value
                  overrides after it win. What --print-config prints is a job file (print, edit, run).
  --print-config  show the composed config (unchecked, so it works before a model is named) and exit
  --check         check the config, the prompts file, the model folder (config, weight file headers, remote
                  code), its tokenizer and what an earlier job left in output.dir, then exit
  --quiet, -q     only warnings and errors (output.log_level=warning; it wins over a log_level given with it):
                  no progress, no table, no `wrote N records` line unless some records are error records
                  (stats.json and the exit status say how it went)
  --help          this text, the config groups and every key with its default

Lines: info to stdout, warnings and errors to stderr; `distgen[rank N]: ` on each line a rank of a job of several
ranks prints, `distgen: ` on the launcher's and a one-rank job's (docs/outputs.md).
"""
FLAGS = ("--print-config", "--check")
QUIET_FLAGS = ("--quiet", "-q")
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


def quiet_as_override(args: Sequence[str]) -> list[str]:
    """The arguments with --quiet (-q) as `output.log_level=warning`, last, so that it wins and reaches every rank
    with the other overrides."""
    rest = [arg for arg in args if arg not in QUIET_FLAGS]
    return rest + ["output.log_level=warning"] if len(rest) < len(args) else rest


def name_rank(environ: Mapping[str, str]) -> None:
    """Each line names this rank from here on, when its launcher says it is one of several."""
    try:
        info = discover(environ, 0)  # the rank and world size only (deepspeed gives the local rank as an argument)
    except RuntimeError:  # a launcher's variables that do not read as numbers: the rank reports it when it starts
        return
    log.name_rank(info.rank, info.world_size)


def usage() -> str:
    return USAGE + "\n" + help_text()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    log.configure()
    name_rank(os.environ)
    if "--help" in args or "-h" in args:
        print(usage())
        return 0
    try:
        args, local_rank = split_local_rank(args)
        args, job_file = split_job_file(quiet_as_override(args))
        overrides = [a for a in args if a not in FLAGS]
        if "--print-config" in args:
            print(config_to_yaml(load_config(overrides, check=False, job_file=job_file)))
            return 0
        cfg = load_config(overrides, job_file=job_file)
        log.configure(cfg.output.log_level)
        if "--check" in args:
            print(f"distgen: config ok, {len(check_inputs(resolve_sources(cfg))[0])} prompts")
            return 0
        # Rank 0 checks what an earlier job left in output.dir (it alone writes there before the start).
        job = prepare_job(cfg, checks_output=discover(os.environ, local_rank).rank == 0)
    except ConfigError as err:
        return config_error(err)
    return run_ranks(job, local_rank)


def cli() -> None:
    sys.exit(log.exit_status(main, "this rank"))


if __name__ == "__main__":
    cli()
