"""Everything a job needs before any process group exists: the config's inputs checked (model folder,
tokenizer, output folder, dataset), and the `Job` every rank then plans from."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from distgen.common.errors import ConfigError
from distgen.config import RunConfig
from distgen.inputs.screening import ERROR_RECORD, RUNS, context_limit
from distgen.inputs.source import PromptSource, open_prompts
from distgen.models.loading import check_model_source, load_model_config, load_tokenizer, resolve_hub_ids
from distgen.outputs.records import error_record
from distgen.outputs.resume import job_fingerprint
from distgen.outputs.shards import OUTPUTS_DIR
from distgen.parallel.feed import Screening

# distgen's own files in output.dir: the length table cache, the progress side channel.
WORK_DIR = ".distgen"


@dataclass
class Job:
    """Everything checked before any process group exists; `lengths` and `skip` are shared once it does."""
    cfg: RunConfig
    source: PromptSource
    tokenizer: object
    fingerprint: str
    # What decides whether a prompt runs (the model's context, dataset.too_long).
    screening: Screening = Screening()
    # Whether this job created output.dir (for the dataset's cache): an unusable job removes it again.
    created_out: bool = False
    # Prompt indices every rank skips: finished by an earlier run of this job (read by the coordinator).
    skip: frozenset[int] = frozenset()
    # Per prompt: token count as run, the record's own budget (0: generation.max_new_tokens), and
    # its screening verdict (RUNS, or an ERROR_RECORD instead of a completion).
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    budgets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    screen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))

    @property
    def prompt_count(self) -> int:
        return len(self.source)

    def not_done(self) -> np.ndarray:
        mask = np.ones(self.prompt_count, dtype=bool)
        mask[list(self.skip)] = False
        return mask

    @property
    def todo(self) -> np.ndarray:
        """Prompts to generate: not finished earlier, not rejected by screening."""
        return np.flatnonzero(self.not_done() & (self.screen == RUNS))

    @property
    def rejected(self) -> np.ndarray:
        """Prompts that get an error record and that no earlier run wrote one for."""
        return np.flatnonzero(self.not_done() & (self.screen == ERROR_RECORD))

    @property
    def error_count(self) -> int:
        return int((self.screen == ERROR_RECORD).sum())

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output.dir)

    def work_path(self, *parts: str) -> Path:
        return self.out_dir / WORK_DIR / Path(*parts)

    def error_records(self, indices: np.ndarray) -> list[dict]:
        """Error records for these rejected prompts, with the reason screening gives."""
        return [error_record(p, self.screening(p, int(self.lengths[p.index])).reason, int(self.lengths[p.index]))
                for p in self.source.prompts(indices)]


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


def check_inputs(cfg: RunConfig) -> tuple[RunConfig, PromptSource, object, bool]:
    """The config with hub ids resolved to their cached folders, the dataset and the tokenizer, once the model
    folder, its tokenizer, the output folder and the dataset are known to be usable; and whether output.dir was
    created for the dataset's cache."""
    cfg = replace(cfg, model=resolve_hub_ids(cfg.model))
    check_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    check_output_dir(cfg.output.dir)
    created = not Path(cfg.output.dir).exists()
    return cfg, open_checked(cfg, tokenizer), tokenizer, created


def prepare_job(cfg: RunConfig) -> Job:
    """Everything up to the first worker: inputs checked; prompts are tokenized and screened by the ranks."""
    cfg, source, tokenizer, created = check_inputs(cfg)
    screening = Screening(context_limit(load_model_config(cfg.model, tokenizer)), cfg.dataset.too_long,
                          cfg.generation.max_new_tokens)
    return Job(cfg, source, tokenizer, job_fingerprint(cfg, source.digest()), screening, created_out=created)


def finished_message(job: Job) -> str:
    return (f"distgen: job {job.fingerprint} already finished: {job.prompt_count} prompts in "
            f"{job.out_dir / OUTPUTS_DIR}; nothing to do (output.resume=false runs it again)")


