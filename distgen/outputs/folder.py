"""What distgen owns in output.dir, and what a rerun does with an earlier job's outputs: reuse them,
refuse, or (output.overwrite=true) move them aside. Nothing finished is ever deleted.

    output.dir/distgen.lock                 the lock (distgen/outputs/lock.py)
    output.dir/outputs/manifest.json        the job: its settings, and what distgen wrote
    output.dir/outputs/record-keys.npy      each record's key as of the last start (resume per record)
    output.dir/outputs/part-*.jsonl         the shards (distgen/outputs/shards.py)
    output.dir/outputs.jsonl, stats.json, report.html     claimed by the manifest before they are written
    output.dir/previous-<time>/             what a run moved aside (earlier outputs, set-aside records)

distgen writes into outputs/ only when it holds its own manifest, and replaces a top-level file only
when its manifest claims it; anything else in the way is an error naming it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distgen.common.errors import ConfigError
from distgen.common.files import write_atomic
from distgen.outputs.coordinator import STATS_FILE
from distgen.outputs.report import REPORT_FILE
from distgen.outputs.resume import settings_changes

MANIFEST_VERSION = 2
OUTPUTS_DIR = "outputs"
MANIFEST_FILE = "manifest.json"
MERGED_FILE = "outputs.jsonl"
# The top-level files distgen writes into output.dir (each claimed by the manifest first).
PRODUCTS = (MERGED_FILE, STATS_FILE, REPORT_FILE)
PREVIOUS_PREFIX = "previous-"


def outputs_dir(out_dir: Path) -> Path:
    return Path(out_dir) / OUTPUTS_DIR


def read_manifest(out_dir: Path) -> dict:
    try:
        manifest = json.loads((outputs_dir(out_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def write_manifest(out_dir: Path, manifest: dict) -> None:
    write_atomic(outputs_dir(out_dir) / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def claimed_files(manifest: dict) -> set[str]:
    """The top-level files the manifest says distgen wrote (a manifest of an earlier distgen version
    names only its merged file; it wrote stats and the report too)."""
    if not manifest:
        return set()
    if "files" in manifest:
        return set(manifest["files"]) & set(PRODUCTS)
    return {name for name in PRODUCTS if name != MERGED_FILE or manifest.get("merged")}


def foreign_files(out_dir: Path, manifest: dict) -> list[Path]:
    """What is in distgen's way in output.dir without being distgen's: an outputs/ with content and no
    manifest, or one of distgen's file names that its manifest does not claim."""
    folder = outputs_dir(out_dir)
    found = []
    if folder.exists() and (not folder.is_dir() or not manifest and any(folder.iterdir())):
        found.append(folder)
    claimed = claimed_files(manifest)
    return found + [Path(out_dir) / name for name in PRODUCTS
                    if name not in claimed and os.path.lexists(Path(out_dir) / name)]


def has_earlier_work(out_dir: Path, manifest: dict) -> bool:
    """Whether output.dir holds anything an earlier distgen run finished: a record or a claimed file."""
    folder = outputs_dir(out_dir)
    if not manifest:
        return False
    records = folder.is_dir() and any(p.name.startswith("part-") for p in folder.iterdir())
    return records or any((Path(out_dir) / name).exists() for name in claimed_files(manifest))


def why_not_reused(manifest: dict, settings: dict[str, Any], resume: bool) -> str:
    """Why the earlier outputs cannot be this job's ("" when they can)."""
    if not resume:
        return "and output.resume=false does not reuse them"
    if "settings" not in manifest:
        return "whose settings it did not record (written by an earlier version of distgen)"
    changes = settings_changes(manifest["settings"], settings)
    return f"with other settings: {'; '.join(changes)}" if changes else ""


@dataclass(frozen=True)
class OutputPlan:
    """What a run does with output.dir: start fresh, reuse the earlier outputs, or move them aside first."""
    reuse: bool
    move_aside: bool


def plan_outputs(out_dir: Path, settings: dict[str, Any], resume: bool, overwrite: bool) -> OutputPlan:
    """Read-only: what this run may do with output.dir, or a ConfigError naming what is in its way."""
    manifest = read_manifest(out_dir)
    foreign = foreign_files(out_dir, manifest)
    if foreign:
        raise ConfigError(f"output.dir={str(out_dir)!r} holds {', '.join(str(p) for p in foreign)}, which distgen "
                          "did not write (no distgen manifest claims it); distgen never deletes or replaces it: "
                          "move it away or give another output.dir")
    if not has_earlier_work(out_dir, manifest):
        return OutputPlan(reuse=False, move_aside=False)
    reason = why_not_reused(manifest, settings, resume)
    if not reason:
        return OutputPlan(reuse=True, move_aside=False)
    if overwrite:
        return OutputPlan(reuse=False, move_aside=True)
    raise ConfigError(f"output.dir={str(out_dir)!r} holds the outputs of an earlier job {reason}. distgen does not "
                      "delete them: give another output.dir, or add output.overwrite=true to move them aside into "
                      f"{Path(out_dir) / PREVIOUS_PREFIX}<time>/ and start again")


def previous_folder(out_dir: Path) -> Path:
    """A new output.dir/previous-<time>/ (a suffix when one of that second exists)."""
    stamp = PREVIOUS_PREFIX + time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        folder = Path(out_dir) / (stamp if attempt == 0 else f"{stamp}-{attempt + 1}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot make a {stamp}* folder in {out_dir}")


def move_aside(out_dir: Path) -> Path:
    """The earlier job's outputs (outputs/ and the files its manifest claims) into previous-<time>/."""
    claimed = claimed_files(read_manifest(out_dir))
    target = previous_folder(out_dir)
    for name in (OUTPUTS_DIR, *sorted(claimed)):
        if os.path.lexists(Path(out_dir) / name):
            os.rename(Path(out_dir) / name, target / name)
    return target
