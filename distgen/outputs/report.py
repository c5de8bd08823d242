"""report.html: the run at a glance, one self-contained page with inline SVG charts (no
plotting dependency): per-rank memory and tokens/s over time, forward vs idle steps per
rank, and prompt / completion length histograms; the records by finish reason and the
commonest errors; what produced the run (model and revision, versions, devices, date, and the
composed config)."""
from __future__ import annotations

import html
from typing import Optional, Sequence

import numpy as np

from distgen.common.yaml_text import job_file_yaml

REPORT_FILE = "report.html"
WIDTH, HEIGHT, MARGIN = 640, 240, 48
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def scale(value: float, low: float, high: float, out_low: float, out_high: float) -> float:
    return out_low if high <= low else out_low + (value - low) * (out_high - out_low) / (high - low)


def frame(title: str, x_label: str, y_label: str, x_max: float, y_max: float, body: str, legend: str = "") -> str:
    axes = (f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - 10}" y2="{HEIGHT - MARGIN}" stroke="#333"/>'
            f'<line x1="{MARGIN}" y1="10" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#333"/>'
            f'<text x="{MARGIN}" y="{HEIGHT - MARGIN + 14}" font-size="10">0</text>'
            f'<text x="{WIDTH - 10}" y="{HEIGHT - MARGIN + 14}" font-size="10" text-anchor="end">{x_max:.4g}</text>'
            f'<text x="{MARGIN - 4}" y="16" font-size="10" text-anchor="end">{y_max:.4g}</text>'
            f'<text x="{WIDTH / 2}" y="{HEIGHT - 8}" font-size="11" text-anchor="middle">{html.escape(x_label)}</text>'
            f'<text x="12" y="{HEIGHT / 2}" font-size="11" text-anchor="middle" '
            f'transform="rotate(-90 12 {HEIGHT / 2})">{html.escape(y_label)}</text>')
    return (f'<figure><figcaption>{html.escape(title)}</figcaption>'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}">{axes}{body}</svg>{legend}</figure>')


def legend(names: Sequence[str]) -> str:
    return "<div>" + " ".join(f'<span style="color:{COLORS[k % len(COLORS)]}">&#9632; {html.escape(n)}</span>'
                              for k, n in enumerate(names)) + "</div>"


def line_chart(title: str, x_label: str, y_label: str, series: dict[str, Sequence[tuple[float, float]]]) -> str:
    points = [p for line in series.values() for p in line]
    x_max = max((x for x, _ in points), default=0.0)
    y_max = max((y for _, y in points), default=0.0) * 1.05 or 1.0
    body = ""
    for k, line in enumerate(series.values()):
        coords = " ".join(f"{scale(x, 0, x_max, MARGIN, WIDTH - 10):.1f},{scale(y, 0, y_max, HEIGHT - MARGIN, 10):.1f}"
                          for x, y in line)
        body += f'<polyline fill="none" stroke="{COLORS[k % len(COLORS)]}" stroke-width="1.5" points="{coords}"/>'
    return frame(title, x_label, y_label, x_max, y_max, body, legend(list(series)))


def bar_chart(title: str, y_label: str, groups: Sequence[str], bars: dict[str, Sequence[float]]) -> str:
    """Bars side by side per group (e.g. forward and idle steps per rank)."""
    y_max = max((v for values in bars.values() for v in values), default=0) * 1.05 or 1.0
    slot = (WIDTH - 10 - MARGIN) / max(len(groups), 1)
    width = slot * 0.8 / max(len(bars), 1)
    body = ""
    for g, group in enumerate(groups):
        left = MARGIN + g * slot + slot * 0.1
        for k, values in enumerate(bars.values()):
            top = scale(values[g], 0, y_max, HEIGHT - MARGIN, 10)
            body += (f'<rect x="{left + k * width:.1f}" y="{top:.1f}" width="{width:.1f}" '
                     f'height="{HEIGHT - MARGIN - top:.1f}" fill="{COLORS[k % len(COLORS)]}"/>')
        body += (f'<text x="{left + slot * 0.4:.1f}" y="{HEIGHT - MARGIN + 26}" font-size="10" '
                 f'text-anchor="middle">{html.escape(group)}</text>')
    return frame(title, "", y_label, 0, y_max, body, legend(list(bars))).replace(
        'text-anchor="end">0</text>', 'text-anchor="end"></text>', 1)


def histogram(title: str, x_label: str, values: np.ndarray, bins: int = 30) -> str:
    if len(values) == 0:
        return frame(title, x_label, "records", 0, 0, "")
    counts, edges = np.histogram(values, bins=min(bins, max(int(values.max() - values.min()) + 1, 1)))
    y_max = counts.max() * 1.05 or 1.0
    body = ""
    for count, low, high in zip(counts, edges[:-1], edges[1:]):
        x0 = scale(low, edges[0], edges[-1], MARGIN, WIDTH - 10)
        x1 = scale(high, edges[0], edges[-1], MARGIN, WIDTH - 10)
        top = scale(count, 0, y_max, HEIGHT - MARGIN, 10)
        body += (f'<rect x="{x0:.1f}" y="{top:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                 f'height="{HEIGHT - MARGIN - top:.1f}" fill="{COLORS[0]}"><title>{low:.0f}-{high:.0f}: {count}'
                 f'</title></rect>')
    return frame(f"{title} (min {values.min()}, median {int(np.median(values))}, max {values.max()})",
                 x_label, "records", float(edges[-1]), float(y_max), body)


def throughput(timeline: Sequence[dict]) -> list[tuple[float, float]]:
    """tokens/s between successive samples."""
    return [(b["t"], (b["generated_tokens"] - a["generated_tokens"]) / (b["t"] - a["t"]))
            for a, b in zip(timeline, timeline[1:]) if b["t"] > a["t"]]


def runs_table(runs: Sequence[dict]) -> str:
    """One row per run of the job (a job resumed after a crash or with a grown dataset ran more than once)."""
    if len(runs) < 2:
        return ""
    keys = list(runs[-1])
    return "<h2>Runs of this job (charts and ranks: the last run)</h2>" + table(
        [[n + 1, *(r.get(k, "") for k in keys)] for n, r in enumerate(runs)], ["run", *keys])


def table(rows: Sequence[Sequence], head: Sequence[str] = ()) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" if head else ""
    return f"<table>{header}{cells}</table>"


def key_values(items) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in items) + "</table>"


# Summary entries shown as tables of their own.
OWN_TABLES = ("finish_reasons", "commonest_errors")


def outcomes_section(summary: dict) -> str:
    """The records by finish reason, and the commonest error messages (numbers aside) with their counts."""
    reasons = summary.get("finish_reasons")
    if not reasons:
        return ""
    total = sum(reasons.values()) or 1
    found = "<h2>Records by finish reason</h2>" + table(
        [(reason, count, f"{100 * count / total:.1f}%") for reason, count in reasons.items()],
        ("finish_reason", "records", "share"))
    errors = summary.get("commonest_errors") or []
    if errors:
        found += "<h2>Commonest errors</h2>" + table([(e["count"], e["message"]) for e in errors],
                                                     ("records", "message (the first of its kind)"))
    return found


def engine_section(ranks: Sequence[dict]) -> str:
    """Each decision of the coordinator's engine plan with its reason (stats.json's ranks[i].engine), and the ranks
    whose engine line differs from it."""
    plans = [(r["rank"], r.get("engine") or {}) for r in ranks]
    if not plans or not plans[0][1]:
        return ""
    first = plans[0][1]
    others = [(f"rank {rank}", plan.get("line", "")) for rank, plan in plans[1:] if plan.get("line") != first["line"]]
    said = [(name, f"{d['value']}: {d['reason']}" if d["reason"] else d["value"]) for name, d in first.items()
            if name != "line"]
    return f"<h2>Engine (rank {plans[0][0]})</h2>" + key_values(said + others)


def run_section(run: Optional[dict]) -> str:
    """What produced the outputs: model, dataset, versions, devices, hosts, date, and the composed config."""
    if not run:
        return ""
    model = run.get("model", {})
    facts = [("date", run.get("date")), ("host", run.get("hostname")), ("hosts", ", ".join(run.get("hosts", []))),
             ("devices", ", ".join(run.get("devices", []))),
             *((f"model.{k}", v) for k, v in model.items()),
             *((f"dataset.{k}", v) for k, v in run.get("dataset", {}).items()),
             *((f"{name} version", v) for name, v in run.get("versions", {}).items())]
    config = job_file_yaml(run.get("config", {}))
    return ("<h2>Run</h2>" + key_values([(k, v) for k, v in facts if v not in (None, "")])
            + f"<details><summary>Config (as composed; --print-config)</summary><pre>{html.escape(config)}</pre>"
            "</details>")


def render_report(summary: dict, ranks: Sequence[dict], timelines: Sequence[Sequence[dict]],
                  prompt_tokens: np.ndarray, completion_tokens: np.ndarray, runs: Sequence[dict] = (),
                  run: Optional[dict] = None) -> str:
    """`run`: what produced the outputs (stats.json's `run`)."""
    names = [f"rank {r['rank']}" for r in ranks]
    memory = {n: [(s["t"], s["rss_mib"]) for s in line] for n, line in zip(names, timelines)}
    cuda = {n: [(s["t"], s["cuda_mib"]) for s in line] for n, line in zip(names, timelines)}
    rows = key_values((k, v) for k, v in summary.items() if k not in OWN_TABLES)
    charts = [
        line_chart("Resident memory per rank", "seconds", "RSS MiB", memory),
        line_chart("Generated tokens/s per rank", "seconds", "tokens/s",
                   {n: throughput(line) for n, line in zip(names, timelines)}),
        bar_chart("Forward vs idle steps per rank", "steps", names,
                  {"forward": [r["forward_steps"] for r in ranks], "idle": [r["idle_steps"] for r in ranks]}),
        histogram("Prompt length", "prompt tokens", prompt_tokens),
        histogram("Completion length", "completion tokens", completion_tokens),
    ]
    if any(s["cuda_mib"] for line in timelines for s in line):
        charts.insert(1, line_chart("CUDA memory allocated per rank", "seconds", "MiB", cuda))
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>distgen report</title>"
            "<style>body{font-family:sans-serif;margin:2em}figure{margin:1em 0}figcaption{font-weight:bold}"
            "td,th{text-align:left;padding:0 1em}</style></head><body><h1>distgen report</h1>"
            f"{rows}{outcomes_section(summary)}{runs_table(runs)}{engine_section(ranks)}{''.join(charts)}"
            f"{run_section(run)}</body></html>\n")
