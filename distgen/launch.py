"""Check a run's config, then start its workers with the configured launcher:

    python -m distgen.launch launcher=torchrun launcher.nproc_per_node=2 layout=fsdp dataset=prompts.jsonl

With launcher=none the job runs in this process (one rank).
"""
from __future__ import annotations

import sys
from typing import Sequence

from distgen.errors import ConfigError
from distgen.launchers import get_launcher
from distgen.load_config import load_config
from distgen.run import check_inputs


def main(argv: Sequence[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(overrides)
        check_inputs(cfg)
        return get_launcher(cfg.launcher.name).launch(cfg, overrides)
    except ConfigError as err:
        print(f"distgen: config error: {err}", file=sys.stderr)
        return 2


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
