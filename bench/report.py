"""The pure parts of the bench reports (a library for bench/peers.py and bench/configs.py): the equality
check, the cost floor, the EOS set, each run's figures and usage, medians over the runs that were not
loaded, headline ratios from repeat pairs that were not, the markdown tables and the chart. No
subprocesses here, so tests can check each piece alone."""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

# A greedy step whose top-1/top-2 logit gap (in the batch-1 fp32 reference) is below this is a
# near tie: another kernel, batch shape or padding may pick the other token, and from there on the
# sequences differ without either being wrong.
TIE_MARGIN = 1e-3

# Every figure a run may hold: its column header and format.
COLUMNS = {
    "gen_tok_s": ("gen tok/s", ".1f"),
    "prompt_tok_s": ("prompt tok/s", ".0f"),
    "first_output_s": ("first output s", ".2f"),
    "startup_s": ("startup s", ".2f"),
    "end_to_end_s": ("end to end s", ".2f"),
    "peak_mib": ("peak MiB (tree)", ".0f"),
    "growth_mib": ("RSS growth in generation MiB (rank)", ".1f"),
    "param_mib": ("param MiB (rank)", ".1f"),
    "compile_s": ("compile s", ".1f"),
    "acceptance": ("draft accepted", ".2f"),
    "prefill_s": ("prefill steps s", ".2f"),
    "prefill_tok": ("prompt tokens run", ".0f"),
}
# The peers table's columns (bench/peers.py).
METRICS = ("gen_tok_s", "prompt_tok_s", "first_output_s", "startup_s", "end_to_end_s", "peak_mib")


@dataclass(frozen=True)
class Equality:
    """How one system's tokens compare with the reference, prompt by prompt."""
    same: int
    # Differ first at a near-tie step of the reference: allowed.
    ties: list[int] = field(default_factory=list)
    # Differ first at a clear step: the comparison is unfair (different work was done).
    mismatched: list[int] = field(default_factory=list)

    @property
    def fair(self) -> bool:
        return not self.mismatched

    def summary(self) -> str:
        total = self.same + len(self.ties) + len(self.mismatched)
        text = f"{self.same}/{total}"
        if self.ties:
            text += f" (+{len(self.ties)} ties)"
        if self.mismatched:
            text += f" ({len(self.mismatched)} DIFFER)"
        return text


def first_divergence(reference: Sequence[int], other: Sequence[int]) -> Optional[int]:
    """The first step where the two differ (a length difference counts), None when identical."""
    for step, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return step
    return None if len(reference) == len(other) else min(len(reference), len(other))


def check_equality(reference: Sequence[Sequence[int]], margins: Sequence[Sequence[float]],
                   tokens: Sequence[Sequence[int]], tie_margin: float = TIE_MARGIN) -> Equality:
    """Every prompt's tokens against the reference; a first difference at a near tie is excused."""
    if len(tokens) != len(reference):
        raise ValueError(f"{len(tokens)} completions for {len(reference)} prompts")
    same, ties, mismatched = 0, [], []
    for index, (ref, mine, steps) in enumerate(zip(reference, tokens, margins)):
        step = first_divergence(ref, mine)
        if step is None:
            same += 1
        elif step < len(steps) and steps[step] < tie_margin:
            ties.append(index)
        else:
            mismatched.append(index)
    return Equality(same, ties, mismatched)


def floor_seconds(floor_run: dict) -> float:
    """Bare forwards for exactly the needed tokens: every prompt's prefill plus one forward per
    further generated token (the prefill yields the first), batch 1, no padding."""
    return floor_run["prefill_s"] + floor_run["decode_s"]


def end_on(tokens: Sequence[int], eos_ids: set[int]) -> int:
    """How many tokens a sequence keeps when it stops at the first of `eos_ids`."""
    for step, token in enumerate(tokens):
        if token in eos_ids:
            return step + 1
    return len(tokens)


def choose_eos_ids(reference: Sequence[Sequence[int]], always: Sequence[int], seed: int = 0,
                   early_fraction: float = 0.75, most: int = 12) -> list[int]:
    """EOS ids that end most sequences early, each at its own step: for prompts (in a seeded
    order) that would still run to their budget, a token from their own greedy continuation
    (past its first quarter) joins the set, until `early_fraction` of them end early."""
    rng = random.Random(seed)
    eos = set(always)
    order = list(range(len(reference)))
    rng.shuffle(order)

    def early() -> int:
        return sum(end_on(seq, eos) < len(seq) for seq in reference)

    for index in order:
        if len(eos) >= most + len(set(always)) or early() >= early_fraction * len(reference):
            break
        seq = reference[index]
        if len(seq) < 4 or end_on(seq, eos) < len(seq):
            continue
        eos.add(seq[rng.randrange(len(seq) // 4, len(seq) - 1)])
    return sorted(eos)


# ---------------------------------------------------------------- runs, medians, headlines

@dataclass(frozen=True)
class Run:
    """One launch of one system: its figures (METRICS keys) and its usage (bench.common.Usage.record():
    wall and CPU seconds of its process tree, load before/after, load from elsewhere, loaded)."""
    system: str
    repeat: int
    figures: dict
    usage: dict

    @property
    def loaded(self) -> bool:
        return bool(self.usage["loaded"])

    def record(self) -> dict:
        return {"system": self.system, "repeat": self.repeat, "figures": self.figures, "usage": self.usage}


def run_figures(generated: int, prompt_tokens: int, gen_s: float, launch: float, ready: float,
                first_output: float, done: float, peak_mib: float, floor_s: float) -> dict:
    """One run's figures from its stamps (seconds since the epoch: process launch, model loaded /
    engine built, first completion available, every completion available) and counts."""
    return {
        "gen_s": gen_s,
        "gen_tok_s": generated / gen_s if gen_s > 0 else 0.0,
        "prompt_tok_s": prompt_tokens / gen_s if gen_s > 0 else 0.0,
        "first_output_s": first_output - launch,
        "startup_s": ready - launch,
        "end_to_end_s": done - launch,
        "peak_mib": peak_mib,
        "floor_fraction": floor_s / gen_s if gen_s > 0 else 0.0,
    }


def clean_runs(runs: Sequence[Run]) -> list[Run]:
    return [run for run in runs if not run.loaded]


def median_figures(runs: Sequence[Run]) -> dict:
    """Each figure's median (each on its own) over the runs that were not loaded; over all of them when
    every one was (the table then says so and no headline uses them)."""
    pool = clean_runs(runs) or list(runs)
    keys = [key for key in pool[0].figures if all(key in run.figures for run in pool)] if pool else []
    return {key: statistics.median(run.figures[key] for run in pool) for key in keys}


def pair_ratios(runs: Sequence[Run], system: str, base: str, key: str = "gen_tok_s") -> list[float]:
    """`system`'s figure over `base`'s, one ratio per repeat in which neither run was loaded (the repeats
    alternate the systems, so a pair ran minutes apart at most)."""
    by_repeat: dict[int, dict[str, Run]] = {}
    for run in runs:
        by_repeat.setdefault(run.repeat, {})[run.system] = run
    ratios = []
    for pair in by_repeat.values():
        mine, theirs = pair.get(system), pair.get(base)
        if mine and theirs and not mine.loaded and not theirs.loaded and theirs.figures.get(key):
            ratios.append(mine.figures[key] / theirs.figures[key])
    return ratios


def headline(runs: Sequence[Run], system: str, base: str, key: str = "gen_tok_s") -> str:
    """`system` against `base` from the clean repeat pairs only: their median ratio and range."""
    ratios = sorted(pair_ratios(runs, system, base, key))
    pairs = len({run.repeat for run in runs if run.system in (system, base)})
    if not ratios:
        return f"{system} vs {base}: no headline: every one of {pairs} repeat pair(s) had load from elsewhere"
    spread = f", pairs {ratios[0]:.2f}x-{ratios[-1]:.2f}x" if len(ratios) > 1 else ""
    return (f"{system} vs {base}: {statistics.median(ratios):.2f}x {key} (median of {len(ratios)} clean "
            f"repeat pair(s) of {pairs}{spread})")


# ---------------------------------------------------------------- tables and chart

def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def clean_cell(runs: Sequence[Run]) -> str:
    clean = len(clean_runs(runs))
    return f"{clean}/{len(runs)}" if clean else f"0/{len(runs)} LOADED"


def markdown_table(rows: Sequence[dict], base: str, metrics: Sequence[str] = METRICS, unfair_note: bool = True) -> str:
    """rows: {"system", "equality": Equality | None, "runs": [Run]}. Each figure is the median over the
    system's clean runs, followed by its ratio to the `base` system's; `vs floor` (where a floor ran) is
    floor time / generation time. A system whose every run was loaded shows medians of its loaded runs,
    marked. `unfair_note`: say so under the table when a system's tokens differ (not at near ties)."""
    medians = {row["system"]: median_figures(row["runs"]) for row in rows}
    base_figures = medians.get(base, {})
    metrics = [key for key in metrics if any(key in figures for figures in medians.values())]
    floor = any("floor_fraction" in figures for figures in medians.values())
    header = ["system", "same tokens", "clean runs", *[f"{COLUMNS[key][0]} (x {base})" for key in metrics],
              *(["vs floor"] if floor else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        figures = medians[row["system"]]
        cells = [row["system"], row["equality"].summary() if row["equality"] else "reference", clean_cell(row["runs"])]
        for key in metrics:
            spec = COLUMNS[key][1]
            if key in figures:
                cells.append(f"{figures[key]:{spec}} ({ratio(figures[key], base_figures.get(key, 0.0))})")
            else:
                cells.append("-")
        if floor:
            cells.append(f"{figures['floor_fraction']:.2f}" if "floor_fraction" in figures else "-")
        lines.append("| " + " | ".join(cells) + " |")
    unfair = [row["system"] for row in rows if unfair_note and row["equality"] and not row["equality"].fair]
    if unfair:
        lines.append("")
        lines.append(f"**The comparison is unfair**: {', '.join(unfair)} produced different greedy tokens "
                     f"(not at near ties) on some prompts, so they did different work.")
    return "\n".join(lines)


def usage_table(runs: Sequence[Run]) -> str:
    """Every run, in the order it ran: what it measured, what its process tree cost, the load around it,
    and whether the rest of the machine kept more than LOADED_ABOVE cores busy meanwhile (LOADED)."""
    lines = ["| # | system | gen tok/s | wall s | CPU s (tree) | cores used | load avg before -> after | "
             "load from elsewhere | |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        u = run.usage
        mark = "**LOADED**" if run.loaded else "clean"
        lines.append(f"| {run.repeat} | {run.system} | {run.figures.get('gen_tok_s', 0.0):.1f} | {u['wall_s']:.1f} | "
                     f"{u['cpu_s']:.1f} | {u['cores_used']:.2f} | {u['load_before']:.2f} -> {u['load_after']:.2f} | "
                     f"{u['other_load']:.2f} | {mark} |")
    return "\n".join(lines)


def write_chart(jobs: dict[str, Sequence[Run]], base: str, path: Path) -> Path:
    """One panel per job: every run's generated tok/s as a ratio to `base`'s clean median, a dot per clean
    run, a red cross per loaded one (its load from elsewhere written beside it), a bar at the clean median."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(jobs), figsize=(5 * len(jobs), 0.5 + 0.45 * max(
        len({r.system for r in runs}) for runs in jobs.values())), squeeze=False)
    for ax, (title, runs) in zip(axes[0], jobs.items()):
        systems = list(dict.fromkeys(run.system for run in runs))
        by_system = {name: [run for run in runs if run.system == name] for name in systems}
        unit = median_figures(by_system[base]).get("gen_tok_s", 0.0) if base in by_system else 0.0
        unit = unit or 1.0
        for y, name in enumerate(reversed(systems)):
            median = median_figures(by_system[name]).get("gen_tok_s", 0.0) / unit
            ax.barh(y, median, color="tab:blue" if clean_runs(by_system[name]) else "lightgray", alpha=0.35)
            for run in by_system[name]:
                x = run.figures.get("gen_tok_s", 0.0) / unit
                if run.loaded:
                    ax.plot(x, y, "x", color="tab:red")
                    ax.annotate(f"{run.usage['other_load']:.1f}", (x, y), fontsize=6, color="tab:red",
                                xytext=(3, 3), textcoords="offset points")
                else:
                    ax.plot(x, y, "o", color="tab:blue", markersize=4)
        ax.set_yticks(range(len(systems)), list(reversed(systems)), fontsize=8)
        ax.axvline(1.0, color="gray", linewidth=0.8)
        ax.set_title(f"{title}: o clean run, x loaded (its load from elsewhere)", fontsize=9)
        ax.set_xlabel(f"generated tok/s, x {base}'s median (bar: a system's median)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
