"""Rank 0 gathers every rank's stats (never its completions: those are in the shards) and reports them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist

from distgen.common.clock import timestamp
from distgen.common.files import write_atomic
from distgen.outputs.stats import RankStats

STATS_FILE = "stats.json"


def gather_to_coordinator(obj, rank: int, world_size: int) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0; None elsewhere."""
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered



def write_stats(out_dir: Path, stats: Sequence[RankStats], summary: dict, timelines: Sequence[list[dict]],
                run: Optional[dict] = None) -> None:
    """stats.json: the summary, what produced the run (`run`: config, model, versions, devices, date), each
    rank's figures and each rank's sampled timeline."""
    write_atomic(out_dir / STATS_FILE, json.dumps(
        {"summary": summary, "run": run or {}, "ranks": [s.as_record() for s in stats], "timelines": list(timelines)},
        indent=2, ensure_ascii=False) + "\n")


def summarize(stats: Sequence[RankStats], prompt_count: int, resumed: int = 0, job: str = "",
              records: Optional[int] = None) -> dict:
    """`resumed` records were finished by an earlier run of `job` (its fingerprint); `records`: the job's records
    (n per prompt, generation.n; default one per prompt). `errors` is counted from the records once they are
    merged (distgen.job.run.outcomes)."""
    generated = sum(s.generated_tokens for s in stats)
    slowest = max((s.generate_seconds for s in stats), default=0.0)
    wall = max((s.wall_seconds for s in stats), default=0.0)
    return {
        "job": job,
        "world_size": len(stats),
        "prompts": prompt_count,
        "records": prompt_count if records is None else records,
        "resumed": resumed,
        "errors": 0,
        "prompt_tokens": sum(s.prompt_tokens for s in stats),
        "generated_tokens": generated,
        "generate_seconds": round(slowest, 3),
        "wall_seconds": round(wall, 3),
        # generated tokens per second of generation (the slowest rank's), and per second of the whole run (load too)
        "tokens_per_second": round(generated / slowest, 2) if slowest > 0 else 0.0,
        "tokens_per_wall_second": round(generated / wall, 2) if wall > 0 else 0.0,
        "oom_backoffs": sum(s.oom_backoffs for s in stats),
    }


# A run's figures kept in the manifest's runs list (a resumed job's stats add them up).
RUN_KEYS = ("world_size", "resumed", "prompt_tokens", "generated_tokens", "generate_seconds", "tokens_per_second",
            "oom_backoffs")


def run_figures(summary: dict, stats: Sequence[RankStats]) -> dict:
    """This run's entry in the manifest's runs list: when it ended, what it generated and how fast, how many
    completions drew their tokens, and whether every rank's rows were batch-invariant."""
    return {"ended": timestamp(), "prompts": sum(s.prompts for s in stats),
            "forward_steps": sum(s.forward_steps for s in stats), **{k: summary[k] for k in RUN_KEYS},
            "sampled_completions": sum(s.sampled_completions for s in stats),
            "batch_invariant": all(s.batch_invariant for s in stats)}


def resumed_draws_note(resumed: int, runs: Sequence[dict]) -> Optional[str]:
    """What the closing lines say when a job that samples (a run counted completions that drew their tokens)
    resumed (`resumed` records were done earlier) over runs whose rows were not batch-invariant (a run entry from
    before the key existed counts as not): its records are valid draws, not necessarily an uninterrupted run's
    tokens. `runs`: the manifest's entries, this run's last. A run that crashed left no entry; it ran this job's
    settings (the kernels may differ: generation.cpu_kernels does not change the job), judged by the others."""
    if not resumed or not any(r.get("sampled_completions", 0) for r in runs):
        return None
    if all(r.get("batch_invariant", False) for r in runs):
        return None
    return ("note: this job samples and was resumed on rows that are not batch-invariant (a row's logits depend on "
            "the rows sharing its forward: torch's kernels, or distgen's CPU kernels without their own decoder "
            "stack): its records are valid draws, but not necessarily the tokens an uninterrupted run would have "
            "drawn (docs/outputs.md, resume)")


def whole_job(summary: dict, runs: Sequence[dict], prompt_tokens: int, generated_tokens: int) -> dict:
    """The summary of the whole job, over every run that wrote its records: tokens counted from the
    records (so a run that crashed counts too), seconds and tokens/s over the runs that finished (each
    kept its figures in `runs`, this one last); `this_run` is the last run's own. A job that ran once
    reads as before."""
    seconds = sum(r["generate_seconds"] for r in runs)
    measured = sum(r["generated_tokens"] for r in runs)
    this_run = {k: summary[k] for k in RUN_KEYS if k != "resumed"}
    return {**summary, "prompt_tokens": prompt_tokens, "generated_tokens": generated_tokens,
            "generate_seconds": round(seconds, 3),
            "tokens_per_second": round(measured / seconds, 2) if seconds else 0.0,
            "oom_backoffs": sum(r["oom_backoffs"] for r in runs), "runs": len(runs), "this_run": this_run}


TABLE_COLUMNS = (  # header, width, format spec, value
    ("rank", 4, "", lambda s: s.rank), ("device", 7, "", lambda s: s.device),
    ("prompts", 7, "", lambda s: s.prompts), ("prompt_tok", 10, "", lambda s: s.prompt_tokens),
    ("gen_tok", 8, "", lambda s: s.generated_tokens), ("steps", 6, "", lambda s: s.forward_steps),
    ("idle", 5, "", lambda s: s.idle_steps), ("gen_tok/s", 9, ".1f", lambda s: s.tokens_per_second),
    ("gen_s", 7, ".2f", lambda s: s.generate_seconds), ("param_MiB", 9, ".1f", lambda s: s.param_mib),
    ("disk_MiB", 8, ".1f", lambda s: s.disk_param_mib), ("rss_MiB", 8, ".0f", lambda s: s.peak_rss_mib),
    ("cuda_alloc", 10, ".0f", lambda s: s.cuda_peak_allocated_mib),
    ("cuda_rsv", 8, ".0f", lambda s: s.cuda_peak_reserved_mib),
)


def format_table(stats: Sequence[RankStats], summary: dict) -> str:
    header = " ".join(f"{name:>{width}}" for name, width, _, _ in TABLE_COLUMNS)
    rows = [" ".join(f"{value(s):>{width}{spec}}" for _, width, spec, value in TABLE_COLUMNS) for s in stats]
    total = (f"total: {summary['prompts']} prompts, {summary['generated_tokens']} tokens generated in "
             f"{summary['generate_seconds']:.2f}s of generation ({summary['tokens_per_second']:.1f} generated tok/s; "
             f"{summary['tokens_per_wall_second']:.1f} per wall second, {summary['wall_seconds']:.1f}s with loading) "
             f"over {summary['world_size']} ranks")
    if summary.get("resumed") or summary.get("runs", 1) > 1:
        run, runs = summary["this_run"], summary["runs"]
        total += (f"\nthis run: {sum(s.prompts for s in stats)} prompts ({summary['resumed']} done earlier; "
                  f"{runs} run{'s' * (runs != 1)} finished in all), {run['generated_tokens']} tokens in "
                  f"{run['generate_seconds']:.2f}s ({run['tokens_per_second']:.1f} generated tok/s)")
    maps = [f"rank {s.rank} device map: {compact_map(s.device_map)}" for s in stats if s.device_map]
    drafts = [f"rank {s.rank} assisted: {s.draft_accepted} of {s.draft_proposed} draft tokens accepted "
              f"({100 * s.acceptance_rate:.1f}%)" for s in stats if s.draft_proposed]
    return "\n".join([header, *rows, *maps, *drafts, total])


def compact_map(device_map: dict[str, str]) -> str:
    """`model.layers.0..3: cpu, lm_head: disk`: consecutive modules on one device in one run."""
    runs: list[list] = []  # [first name, last name, where]
    for name, where in device_map.items():
        if runs and runs[-1][2] == where:
            runs[-1][1] = name
        else:
            runs.append([name, name, where])
    return ", ".join(f"{first}: {where}" if first == last else f"{first}..{last}: {where}"
                     for first, last, where in runs)
