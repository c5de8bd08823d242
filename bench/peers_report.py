"""Pure parts of bench/peers.py: the equality check, the cost floor, medians, ratios, the
markdown table and the chart. No subprocesses here, so tests can check each piece alone."""
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

# Figures per run; `better` says which way is good, for the ratio column.
METRICS = (  # key, header, format, higher is better
    ("gen_tok_s", "gen tok/s", ".1f", True),
    ("prompt_tok_s", "prompt tok/s", ".0f", True),
    ("first_output_s", "first output s", ".2f", False),
    ("startup_s", "startup s", ".2f", False),
    ("end_to_end_s", "end to end s", ".2f", False),
    ("peak_mib", "peak MiB", ".0f", False),
)


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


def median_run(runs: Sequence[dict]) -> dict:
    """Each figure's median over the repeats (each figure on its own)."""
    keys = [key for key, *_ in METRICS] + ["gen_s", "floor_fraction"]
    return {key: statistics.median(run[key] for run in runs) for key in keys if all(key in r for r in runs)}


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


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def markdown_table(rows: Sequence[dict], base: str) -> str:
    """rows: {"system", "equality": Equality | None, "figures": median figures, "note"}. Each figure is
    followed by its ratio to the `base` system's; `vs floor` is floor time / generation time."""
    by_name = {row["system"]: row for row in rows}
    base_figures = by_name[base]["figures"] if base in by_name else {}
    header = ["system", "same tokens", *[f"{title} (x {base})" for _, title, _, _ in METRICS], "vs floor"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        figures = row["figures"]
        cells = [row["system"], row["equality"].summary() if row["equality"] else "reference"]
        for key, _, spec, _ in METRICS:
            if key in figures:
                cells.append(f"{figures[key]:{spec}} ({ratio(figures[key], base_figures.get(key, 0.0))})")
            else:
                cells.append("-")
        cells.append(f"{figures['floor_fraction']:.2f}" if "floor_fraction" in figures else "-")
        lines.append("| " + " | ".join(cells) + " |")
    unfair = [row["system"] for row in rows if row["equality"] and not row["equality"].fair]
    if unfair:
        lines.append("")
        lines.append(f"**The comparison is unfair**: {', '.join(unfair)} produced different greedy tokens "
                     f"(not at near ties) on some prompts, so they did different work.")
    return "\n".join(lines)


README_MARKERS = ("<!-- peers-table -->", "<!-- /peers-table -->")


def replace_block(text: str, block: str, markers: tuple[str, str] = README_MARKERS) -> str:
    """`text` with what lies between the two markers replaced by `block`."""
    start, end = markers
    if start not in text or end not in text:
        raise ValueError(f"markers {start} ... {end} not found")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{block.strip()}\n{end}{rest.split(end, 1)[1]}"


def write_chart(tables: dict[str, Sequence[dict]], base: str, path: Path) -> Path:
    """One panel per (model, dataset): each system's generated tokens/s as a ratio to `base`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(4.5 * len(tables), 4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], tables.items()):
        base_tps = next((r["figures"]["gen_tok_s"] for r in rows if r["system"] == base), 0.0)
        names = [r["system"] for r in rows]
        values = [r["figures"]["gen_tok_s"] / base_tps if base_tps else 0.0 for r in rows]
        colors = ["tab:red" if r["equality"] and not r["equality"].fair else "tab:blue" for r in rows]
        ax.barh(names[::-1], values[::-1], color=colors[::-1])
        ax.axvline(1.0, color="gray", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"generated tok/s, x {base}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
