"""Check a run's config, then start its workers with the configured launcher:

    python -m distgen.launch launcher=torchrun launcher.nproc_per_node=2 layout=fsdp dataset=prompts.jsonl

With launcher=none the job runs in this process (one rank). --quiet (-q): only warnings and errors.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from distgen.common import log
from distgen.common.errors import ConfigError, LaunchError
from distgen.config import RunConfig
from distgen.launchers import get_launcher
from distgen.catalog.load import job_file_args, load_config, split_job_file
from distgen.outputs.lock import held_for_ranks
from distgen.outputs.shards import job_complete
from distgen.job.prepare import prepare_job, say_finished
from distgen.run import FLAGS, main as run_main, quiet_as_override

logger = logging.getLogger("distgen.launch")  # not __name__: `python -m distgen.launch` runs it as __main__


def launch_job(cfg: RunConfig, overrides: Sequence[str], job_file: Optional[Path] = None) -> int:
    """Start the checked job `cfg` (composed from `job_file` and `overrides`) with its launcher; its exit status.
    Raises ConfigError for what can be found wrong before any rank starts."""
    launcher, out = get_launcher(cfg.launcher.name), cfg.output
    # Refuses here, before any worker, what rank 0 would refuse (a lock, a changed job).
    job = prepare_job(cfg, checks_output=launcher.checks_output(cfg))
    # Where rank 0 runs under this process, the lock is this process's until the ranks end: a second job
    # started at the same moment is refused here, before it starts any process.
    with (held_for_ranks(job.out_dir, out.lock_heartbeat_s, out.break_lock) if launcher.holds_lock(cfg)
          else contextlib.nullcontext()):
        if job.reuses and job_complete(job.out_dir, job.fingerprint) and not launcher.one_of_several(cfg):
            say_finished(job)
            return 0
        # The ranks read the same job file (by its absolute path) and the same overrides.
        return launcher.launch(cfg, job_file_args(job_file) + list(overrides), run_main)


def main(argv: Sequence[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    log.configure()
    if any(flag in overrides for flag in ("--help", "-h", *FLAGS)):
        if "--help" in overrides or "-h" in overrides:
            print(__doc__)
        return run_main(overrides)
    try:
        overrides, job_file = split_job_file(quiet_as_override(overrides))
        cfg = load_config(overrides, job_file=job_file)
        log.configure(cfg.output.log_level)
        return launch_job(cfg, overrides, job_file)
    except ConfigError as err:
        logger.error("config error: %s", err)
        return 2
    except LaunchError as err:
        logger.error("launch failed: %s", err)
        return 1


def cli() -> None:
    sys.exit(log.exit_status(main, "the launcher"))


if __name__ == "__main__":
    cli()
