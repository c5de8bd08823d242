"""SLURM: write an sbatch script next to the outputs and submit it; optionally follow the job.

Two ways to start the ranks inside the allocation:
  mode=torchrun  one srun task per node runs torchrun for that node's ranks (c10d rendezvous on
                 the first node);
  mode=srun      one srun task per rank runs distgen.run itself (rank variables from SLURM).
A requeued job (preemption, node failure) reruns the same script and resumes from its journals.
"""
from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from distgen.common.checks import require
from distgen.common.registry import Registry
from distgen.config import LauncherConfig, RunConfig
from distgen.common.errors import ConfigError, LaunchError
from distgen.launchers.base import WORKER_MODULE, Entry, Launcher, register, write_next_to_outputs
from distgen.launchers.torchrun import TorchrunLauncher, torchrun_command

logger = logging.getLogger(__name__)

SCRIPT_NAME = "distgen-slurm.sbatch"
# Job states after which nothing more happens (a requeued job goes back to PENDING instead).
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED")
LOG_TAIL_LINES = 40


@dataclass
class SlurmLauncher(LauncherConfig):
    """An sbatch job: launcher.nodes x ranks per node, srun + torchrun per node or one srun task per rank."""
    name: str = "slurm"
    nodes: int = 1
    # GPUs asked for per node (--gpus-per-node); null or 0: none, a CPU job (device=cuda needs it set).
    gpus_per_node: Optional[int] = None
    # Ranks per node; null: one per GPU asked for (1 in a CPU job).
    ranks_per_node: Optional[int] = None
    # torchrun: srun starts torchrun once per node; srun: one srun task per rank, no torchrun.
    mode: str = "torchrun"
    partition: str = ""
    account: str = ""
    # Time limit (sbatch --time, e.g. 04:00:00); empty: the partition's default.
    time: str = ""
    cpus_per_task: int = 0
    job_name: str = "distgen"
    # Requeue the job when it is preempted; the rerun resumes from the journals in output.dir.
    requeue: bool = False
    # More `#SBATCH` options, e.g. ["--qos=high", "--exclusive"].
    extra_sbatch: list[str] = field(default_factory=list)
    # Shell lines run first on the batch node, e.g. ["source .venv/bin/activate", "module load cuda"].
    setup: list[str] = field(default_factory=list)
    # The job's Python; empty: the one running this launcher (a shared file system is assumed).
    python: str = ""
    # Rendezvous port on the first node; 0: a free one, picked there when the job starts.
    port: int = 0
    # Follow the job to its end and exit with its status (else print the job id and return).
    wait: bool = False
    poll_s: float = 1.0

    def check(self) -> None:
        require(self.nodes >= 1, "launcher.nodes", self.nodes, "must be >= 1")
        require(self.gpus_per_node is None or self.gpus_per_node >= 0, "launcher.gpus_per_node", self.gpus_per_node,
                "must be >= 0 (or null: no GPUs)")
        require(self.ranks_per_node is None or self.ranks_per_node >= 1, "launcher.ranks_per_node",
                self.ranks_per_node, "must be >= 1 (or null: one rank per GPU asked for, 1 in a CPU job)")
        require(self.cpus_per_task >= 0, "launcher.cpus_per_task", self.cpus_per_task, "must be >= 0")
        require(0 <= self.port <= 65535, "launcher.port", self.port, "must be a port, 0-65535")
        require(self.poll_s > 0, "launcher.poll_s", self.poll_s, "must be > 0")
        for line in self.extra_sbatch:
            require(line.startswith("-") and "\n" not in line, "launcher.extra_sbatch", line,
                    "each entry is one sbatch option, e.g. --qos=high")

    @property
    def ranks(self) -> int:
        return self.ranks_per_node or self.gpus_per_node or 1


def check_gpus(cfg: RunConfig) -> None:
    """A job that runs on GPUs (device=cuda) says how many to ask for: SLURM asks for none unless told."""
    gpus = cfg.launcher.gpus_per_node
    require(cfg.device != "cuda" or bool(gpus), "launcher.gpus_per_node", gpus,
            "device=cuda needs the GPUs per node to ask SLURM for (launcher.gpus_per_node=N)")


def shell_word(arg: str) -> str:
    """Quote for bash; `$VAR` references (the rendezvous endpoint) stay expandable."""
    return f'"{arg}"' if re.fullmatch(r"[-\w=.:/]*\$[\w{}$:]*", arg) else shlex.quote(arg)


def shell_line(argv: Sequence[str]) -> str:
    return " ".join(shell_word(a) for a in argv)


@dataclass(frozen=True)
class SlurmMode:
    """How the ranks start inside the allocation (launcher.mode)."""
    # srun tasks per node (sbatch --ntasks-per-node).
    tasks_per_node: Callable[[SlurmLauncher], int]
    # (settings, overrides, python) -> the batch script's lines that start every rank.
    rank_lines: Callable[[SlurmLauncher, Sequence[str], str], list[str]]


SLURM_MODES: Registry[SlurmMode] = Registry("launcher.mode", valued=True, within="slurm")


def sbatch_directives(cfg: SlurmLauncher, log: str, workdir: str) -> list[str]:
    tasks = SLURM_MODES.get(cfg.mode).tasks_per_node(cfg)
    wanted = [
        ("--job-name", cfg.job_name), ("--nodes", cfg.nodes), ("--ntasks-per-node", tasks),
        ("--gpus-per-node", cfg.gpus_per_node or None), ("--cpus-per-task", cfg.cpus_per_task or None),
        ("--partition", cfg.partition or None), ("--account", cfg.account or None), ("--time", cfg.time or None),
    ]
    lines = [f"#SBATCH {key}={value}" for key, value in wanted if value is not None]
    # append: a requeued run adds to the same log
    lines += ["#SBATCH --requeue" if cfg.requeue else "#SBATCH --no-requeue", "#SBATCH --open-mode=append",
              f"#SBATCH --output={log}", f"#SBATCH --chdir={workdir}"]
    return lines + [f"#SBATCH {line}" for line in cfg.extra_sbatch]


SRUN = ("srun", "--kill-on-bad-exit=1")


def torchrun_rank_lines(cfg: SlurmLauncher, overrides: Sequence[str], python: str) -> list[str]:
    """One srun task per node runs torchrun for that node's ranks (c10d rendezvous on the first node)."""
    node = TorchrunLauncher(nproc_per_node=cfg.ranks, nnodes=cfg.nodes, rdzv_endpoint="$HEAD_ADDR:$PORT")
    return [shell_line([*SRUN, *torchrun_command(node, overrides, python)])]


def srun_rank_lines(cfg: SlurmLauncher, overrides: Sequence[str], python: str) -> list[str]:
    """One srun task per rank runs distgen.run itself."""
    # Read by distgen.parallel.env's SLURM row; each task's rank comes from SLURM_PROCID.
    return ['export DISTGEN_MASTER_ADDR="$HEAD_ADDR" DISTGEN_MASTER_PORT="$PORT"',
            shell_line([*SRUN, python, "-m", WORKER_MODULE, *overrides])]


SLURM_MODES.register("torchrun", None, SlurmMode(lambda cfg: 1, torchrun_rank_lines),
                     doc="srun starts torchrun once per node, for that node's ranks")
SLURM_MODES.register("srun", None, SlurmMode(lambda cfg: cfg.ranks, srun_rank_lines),
                     doc="one srun task per rank runs distgen.run (rank variables from SLURM)")


def rank_lines(cfg: SlurmLauncher, overrides: Sequence[str], python: str) -> list[str]:
    """The srun line that starts every rank, and what it needs exported."""
    return SLURM_MODES.get(cfg.mode).rank_lines(cfg, overrides, python)


def sbatch_script(cfg: SlurmLauncher, overrides: Sequence[str], python: str, log: str, workdir: str) -> str:
    """The whole batch script; `sbatch` it again to rerun (or resume) the same job. The config was
    checked before submission, and every rank checks it again before the process group starts."""
    port = str(cfg.port) if cfg.port else (
        "$(" + shell_line([python, "-c", 'import socket; s = socket.socket(); s.bind(("", 0)); '
                                         'print(s.getsockname()[1])']) + ")")
    lines = [
        "#!/bin/bash",
        f"# distgen job (launcher=slurm, mode={cfg.mode}), written by `python -m distgen.launch`.",
        "# Submit it again with `sbatch <this file>`: a rerun resumes from the journals in output.dir.",
        *sbatch_directives(cfg, log, workdir),
        "set -euo pipefail",
        "# A requeued job (preemption, node failure, `scontrol requeue`) starts here again, same job id.",
        'echo "distgen: SLURM job $SLURM_JOB_ID, start $((${SLURM_RESTART_COUNT:-0} + 1)), nodes $SLURM_JOB_NODELIST"',
        *cfg.setup,
        "# The first node (this one) hosts the rendezvous.",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        """HEAD_ADDR=$(scontrol show node "$HEAD_NODE" -o | sed -n 's/.* NodeAddr=\\([^ ]*\\).*/\\1/p')""",
        'HEAD_ADDR=${HEAD_ADDR:-$HEAD_NODE}',
        f"PORT={port}",
        *rank_lines(cfg, overrides, python),
    ]
    return "\n".join(lines) + "\n"


def job_state(scontrol_line: str) -> tuple[str, int]:
    """(JobState, exit status) from one `scontrol show job -o` line; a signal counts as 128 + signal."""
    state = re.search(r"\bJobState=(\S+)", scontrol_line)
    code = re.search(r"\bExitCode=(\d+):(\d+)", scontrol_line)
    if not state:
        raise LaunchError(f"cannot read the job state from scontrol: {scontrol_line.strip()[:200]!r}; the job may "
                          "still run: its log and finished outputs stay in output.dir")
    status, signal = (int(code.group(1)), int(code.group(2))) if code else (0, 0)
    return state.group(1), status or (128 + signal if signal else 0)


def job_restarts(scontrol_line: str) -> int:
    """How often the job was requeued so far (`Restarts=` of `scontrol show job -o`)."""
    found = re.search(r"\bRestarts=(\d+)", scontrol_line)
    return int(found.group(1)) if found else 0


def slurm_command(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise ConfigError(f"launcher=slurm is not allowed here: `{name}` is not on PATH (run it on a SLURM "
                          "login node, or use launcher=torchrun)")
    return found


def submit(script: Path) -> str:
    result = subprocess.run([slurm_command("sbatch"), "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise LaunchError(f"sbatch refused the job ({script}, exit status {result.returncode}): "
                          f"{result.stderr.strip() or result.stdout.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    if not re.fullmatch(r"\d+(_\d+)?", job_id):
        raise LaunchError(f"sbatch gave no job id for {script} (sbatch --parsable printed {result.stdout.strip()!r}; "
                          f"stderr: {result.stderr.strip()!r}); see squeue before submitting again")
    return job_id


def follow(job_id: str, poll_s: float) -> tuple[str, int]:
    """Poll the controller until the job reaches a final state (no accounting database needed).
    A requeue is not an end: the job goes back to PENDING under the same id, and is followed on."""
    scontrol = slurm_command("scontrol")
    restarts = 0
    while True:
        result = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True)
        if result.returncode != 0:
            raise LaunchError(f"scontrol could not report SLURM job {job_id} (exit status {result.returncode}: "
                              f"{result.stderr.strip() or result.stdout.strip()}); the job may still run: its log "
                              "and finished outputs stay in output.dir")
        state, status = job_state(result.stdout)
        if job_restarts(result.stdout) > restarts:
            restarts = job_restarts(result.stdout)
            logger.warning("SLURM job %s was requeued (restart %d); its next start resumes from the journals",
                           job_id, restarts)
        if state in FINAL_STATES:
            return state, status
        time.sleep(poll_s)


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-lines:]) if log.exists() else ""


def launch(cfg: RunConfig, overrides: Sequence[str], entry: Entry) -> int:
    settings: SlurmLauncher = cfg.launcher
    out_dir = Path(cfg.output.dir).absolute()
    log = out_dir / "slurm-%j.log"
    text = sbatch_script(settings, overrides, settings.python or sys.executable, str(log), str(Path.cwd()))
    script = write_next_to_outputs(str(out_dir), SCRIPT_NAME, text)
    job_id = submit(script)
    job_log = Path(str(log).replace("%j", job_id))
    logger.info("submitted SLURM job %s (%s); log: %s", job_id, script, job_log)
    if not settings.wait:
        return 0
    try:
        state, status = follow(job_id, settings.poll_s)
    except KeyboardInterrupt:
        subprocess.run([slurm_command("scancel"), job_id])
        logger.warning("cancelled SLURM job %s", job_id)
        return 130
    # The job's own lines (its ranks', prefixed by them), relayed as they are.
    print(log_tail(job_log), end="", flush=True)
    logger.log(logging.INFO if state == "COMPLETED" and status == 0 else logging.ERROR,
               "SLURM job %s ended %s, exit status %s", job_id, state, status)
    return status if state == "COMPLETED" or status else 1


register(Launcher("slurm", launch), SlurmLauncher, check=check_gpus)
