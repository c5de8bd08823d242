"""What the benchmarks share: a prompts file with varied lengths and budgets, and one job run
through `distgen.launch` whose stats.json comes back."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = "the model reads a prompt and writes a completion one token at a time until it is done".split()


def write_prompts(path: Path, count: int, new_tokens: int) -> None:
    """Prompts of varied length and varied budgets (1/4 to all of new_tokens), as real jobs have."""
    lines = [json.dumps({"id": i, "prompt": " ".join(WORDS[: 4 + (i * 7) % len(WORDS)]),
                         "max_new_tokens": max(1, new_tokens * (1 + (i * 5) % 4) // 4)}) for i in range(count)]
    path.write_text("\n".join(lines) + "\n")


def run_job(name: str, nproc: int, overrides: list[str], work: Path) -> dict:
    out = work / name
    launcher = ["launcher=torchrun", f"launcher.nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, "-m", "distgen.launch", *launcher, *overrides, f"output.dir={out}",
           "output.print_table=false", "output.resume=false"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
    return json.loads((out / "stats.json").read_text())
