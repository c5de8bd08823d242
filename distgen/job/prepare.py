"""Everything a job needs before any process group exists: the config's inputs checked (model folder,
tokenizer, output folder and what an earlier job left there, dataset), the `Job` every rank then plans
from, and (rank 0) the claim on output.dir: its lock, and earlier outputs moved aside when asked."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from distgen.common.errors import ConfigError
from distgen.common.checks import require
from distgen.config import GenerationConfig, RunConfig, named_adapters
from distgen.inputs.screening import Verdict, context_limit
from distgen.inputs.source import PromptSource, open_prompts, resolve_hub_dataset
from distgen.models.loading import check_model_source, load_model_config, load_tokenizer, resolve_hub_ids
from distgen.outputs.records import error_record, renamed_columns
from distgen.outputs.coordinator import STATS_FILE
from distgen.outputs.folder import MERGED_FILE, OUTPUTS_DIR, OutputPlan, move_aside, plan_outputs
from distgen.outputs.samples import SampleTable
from distgen.outputs.lock import OutputLock, handed_token, lock_status
from distgen.outputs.report import REPORT_FILE
from distgen.outputs.resume import job_fingerprint, job_settings
from distgen.outputs.shards import merge_format, unapplied_output_settings
from distgen.parallel.feed import Screening

logger = logging.getLogger(__name__)

# distgen's own files in output.dir: the length table cache, the progress side channel.
WORK_DIR = ".distgen"


@dataclass
class Job:
    """Everything checked before any process group exists; `lengths` and `skip` are shared once it does."""
    cfg: RunConfig
    source: PromptSource
    tokenizer: object
    fingerprint: str
    # What decides the completions (`key: value`, recorded in the manifest) and the dataset's digest.
    settings: dict = field(default_factory=dict)
    dataset_digest: str = ""
    # What this run does with output.dir's earlier outputs (None: not checked, this rank does not write there).
    plan: Optional[OutputPlan] = None
    # What decides whether a prompt runs (the model's context, dataset.too_long).
    screening: Screening = Screening()
    # Whether this job created output.dir (for the dataset's cache): an unusable job removes it again.
    created_out: bool = False
    # Per prompt: token count as run, the record's own budget (0: generation.max_new_tokens), and
    # its screening verdict (Verdict.RUNS, or an ERROR_RECORD instead of a completion).
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    budgets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    screen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    # Per prompt: its LoRA adapter where records choose one (0: the base model; distgen/inputs/screening.py).
    adapters: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    # The config as composed, before hub ids were resolved to their folders (for the run's metadata).
    composed: Optional[RunConfig] = None
    # Each prompt's records (generation.n or its record's n), and which of them an earlier run of this job
    # finished (a bool per (index, sample_index); read by the coordinator, shared with every rank).
    samples: SampleTable = field(default_factory=lambda: SampleTable.ones(0))
    done: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    # Per prompt: its records not finished yet (`samples_left()`, computed once `done` is known: share_plan).
    left: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def given(self) -> RunConfig:
        """The config as the user gave it (hub ids not resolved), for what the run's metadata names."""
        return self.composed or self.cfg

    @property
    def prompt_count(self) -> int:
        return len(self.source)

    @property
    def record_count(self) -> int:
        """Records of the whole job: n per prompt."""
        return self.samples.total

    @property
    def resumed(self) -> int:
        """Records an earlier run finished."""
        return int(self.done.sum())

    def samples_left(self) -> np.ndarray:
        """(prompts,) each prompt's records not finished yet."""
        if len(self.done) != self.samples.total:  # nothing read yet: all of them
            return self.samples.counts
        return self.samples.counts - self.samples.per_prompt(self.done)

    def sample_indices(self, prompt) -> list[int]:
        """The sample indices of this prompt still to generate."""
        if len(self.done) != self.samples.total:
            return list(range(int(self.samples.counts[prompt.index])))
        return self.samples.left(self.done, prompt.index)

    def not_done(self) -> np.ndarray:
        return self.left > 0

    @property
    def todo(self) -> np.ndarray:
        """Prompts to generate: not finished earlier, not rejected by screening."""
        return np.flatnonzero(self.not_done() & (self.screen == Verdict.RUNS))

    @property
    def rejected(self) -> np.ndarray:
        """Prompts that get an error record and that no earlier run wrote one for."""
        return np.flatnonzero(self.not_done() & (self.screen == Verdict.ERROR_RECORD))

    @property
    def merge_format(self) -> str:
        """outputs.jsonl's form (output.merge_format, auto resolved for the dataset's format)."""
        return merge_format(self.cfg.output.merge_format, self.source.format)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output.dir)

    def work_path(self, *parts: str) -> Path:
        return self.out_dir / WORK_DIR / Path(*parts)

    @property
    def reuses(self) -> bool:
        """Whether this run reuses the records an earlier run of the job left in output.dir."""
        return self.plan is not None and self.plan.reuse

    def start(self) -> dict:
        """The manifest's start: this job, and the top-level files this run will write (claimed first)."""
        out = self.cfg.output
        files = [STATS_FILE] + [MERGED_FILE] * out.merge + [REPORT_FILE] * out.report
        return {"job": self.fingerprint, "settings": self.settings, "dataset": self.dataset_digest, "files": files}

    def error_records(self, indices: np.ndarray) -> list[dict]:
        """Error records for these rejected prompts (each sample not written yet), with the reason screening gives."""
        keep_prompt = self.cfg.output.keep_prompt
        return [error_record(p, self.screening(p, int(self.lengths[p.index])).reason, int(self.lengths[p.index]),
                             keep_prompt, sample)
                for p in self.source.prompts(indices) for sample in self.sample_indices(p)]

    def column_notes(self) -> list[str]:
        """What to say at the start about the input columns the records keep (renamed where they clash)."""
        renamed = renamed_columns(self.source.kept_names() or [])
        if not renamed:
            return []
        return [f"input column(s) {', '.join(renamed)} share a name with an output field: written as "
                f"{', '.join(renamed.values())}"]


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
        source = open_prompts(cfg.dataset, dataset_cache(cfg), tokenizer, cfg.output.columns)
        check_merge_form(cfg, source)
        return source
    except ConfigError:
        if created:
            shutil.rmtree(cfg.output.dir, ignore_errors=True)
        raise


def check_merge_form(cfg: RunConfig, source: PromptSource) -> None:
    """OpenAI batch output lines tell chat from text completions by each request's url column."""
    keep = cfg.output.columns
    if (source.format == "openai_batch" and merge_format(cfg.output.merge_format, source.format) == "openai_batch"
            and cfg.output.merge and keep is not None and "url" not in keep):
        raise ConfigError(f"output.columns={list(keep)!r} is not allowed with OpenAI batch output lines "
                          "(output.merge_format): each request's `url` column says whether it is a chat or a text "
                          "completion; add 'url' (or output.merge_format=distgen)")


def check_output_plan(cfg: RunConfig, settings: dict) -> OutputPlan:
    """Read-only, without the lock: a job holding output.dir is named first (what it writes meanwhile
    is no verdict on the folder), then what an earlier job left there is checked against this one."""
    out = cfg.output
    lock_status(Path(out.dir), out.lock_heartbeat_s, out.break_lock)
    return plan_outputs(Path(out.dir), settings, out.resume, out.overwrite)


def check_inputs(cfg: RunConfig, checks_output: bool = True
                 ) -> tuple[PromptSource, object, bool, dict, Optional[OutputPlan], object]:
    """The dataset, the tokenizer, whether output.dir was created for the dataset's cache, the job's
    settings, what it may do with output.dir, and the model's config: the model folder, its tokenizer and the output
    folder are checked (and what an earlier job left there, where `checks_output`: rank 0, a launcher)
    before the dataset is opened, so a refusal touches nothing in output.dir."""
    check_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    model_config = load_model_config(cfg.model, tokenizer)
    check_token_ids(cfg.generation, model_config)
    check_output_dir(cfg.output.dir)
    settings = job_settings(cfg)
    plan = check_output_plan(cfg, settings) if checks_output else None
    created = not Path(cfg.output.dir).exists()
    return open_checked(cfg, tokenizer), tokenizer, created, settings, plan, model_config


def check_token_ids(gen: GenerationConfig, model_config) -> None:
    """generation.logit_bias names tokens of the model's vocabulary (known from its config before any weight loads):
    one ConfigError here rather than an error record for every record of the job."""
    vocab = getattr(model_config.get_text_config(), "vocab_size", None)
    past = sorted(int(token) for token in (gen.logit_bias or {}) if vocab and int(token) >= vocab)
    require(not past, "generation.logit_bias", gen.logit_bias,
            f"token ids must be below the model's vocabulary size {vocab} (not {', '.join(map(str, past))})")


def resolve_sources(cfg: RunConfig) -> RunConfig:
    """The config with hub ids (model.path, tokenizer_path, assistant_path, dataset.path) resolved to their cached
    folders."""
    return replace(cfg, model=resolve_hub_ids(cfg.model), dataset=resolve_hub_dataset(cfg.dataset))


def prepare_job(cfg: RunConfig, checks_output: bool = True) -> Job:
    """Everything up to the first worker: inputs checked; prompts are tokenized and screened by the ranks."""
    composed, cfg = cfg, resolve_sources(cfg)
    source, tokenizer, created, settings, plan, model_config = check_inputs(cfg, checks_output)
    adapters = named_adapters(cfg.model.lora)
    screening = Screening(context_limit(model_config), cfg.dataset.too_long,
                          cfg.generation.max_new_tokens, tuple(adapters) if adapters is not None else None)
    digest = source.digest()
    return Job(cfg, source, tokenizer, job_fingerprint(cfg, digest), settings=settings, dataset_digest=digest,
               plan=plan, screening=screening, created_out=created, composed=composed)


@contextlib.contextmanager
def claim_output_dir(job: Job) -> Iterator[OutputLock]:
    """Rank 0, before any process group: hold output.dir's lock for the whole run (released on the way
    out, also on an exception or SIGTERM; a lock its launcher holds for it stays the launcher's), check
    again under it what the earlier outputs allow, and with output.overwrite=true move them aside.
    Nothing in output.dir changes before the lock is held."""
    out = job.cfg.output
    with OutputLock(job.out_dir, out.lock_heartbeat_s, out.break_lock, handed_token()) as lock:
        job.plan = plan_outputs(job.out_dir, job.settings, out.resume, out.overwrite)
        if job.plan.move_aside:
            where = move_aside(job.out_dir)
            logger.warning("output.overwrite=true: moved the earlier outputs aside into %s", where)
        yield lock


def say_finished(job: Job) -> None:
    """A finished job's rerun: nothing to do, and the output settings its outputs were not written with (a finished
    job is not written again), as a warning."""
    logger.info(finished_message(job))
    out = job.cfg.output
    unapplied = unapplied_output_settings(job.out_dir, out.format, out.merge, job.merge_format)
    if unapplied:
        logger.warning("the finished outputs were written with other output settings, which this run does not apply "
                       "(%s): output.resume=false output.overwrite=true moves them aside and runs the job again with "
                       "these", "; ".join(unapplied))


def finished_message(job: Job) -> str:
    return (f"job {job.fingerprint} already finished: {job.prompt_count} prompts in "
            f"{job.out_dir / OUTPUTS_DIR}; nothing to do (output.resume=false output.overwrite=true moves it aside "
            "and runs it again)")


