"""SLURM requeue on preemption, for real, on the local cluster (tests/helpers/clusters.py LocalSlurm): a job
submitted with launcher.requeue=true is preempted part way through (a job in the higher-priority
`urgent` partition takes both nodes), SLURM requeues it under the same job id, the rerun resumes
from its journals, and launcher.wait=true follows the job through the requeue to its end. The
outputs equal an uninterrupted run's, every id once."""
import re
import subprocess
import sys

from distgen.run import main as run_in_process
from tests.helpers import REPO, journaled, paced_env, read_outputs, wait_until, write_prompts

PROMPTS = [{"id": f"p{i}", "prompt": f"Prompt number {i}: " + "abc " * (i % 5), "max_new_tokens": 3 + i % 4}
           for i in range(12)]
APPEND_DELAY_S = 1.0  # each finished completion holds its rank this long: the preemption lands part way
STARTS_WITHIN_S = 300  # generous: the machine running the tests is shared and loaded
ENDS_WITHIN_S = 400
# One srun task per rank on two fake nodes; follow the job to its end.
REQUEUED_JOB = ["launcher=slurm", "launcher.mode=srun", "launcher.nodes=2", "launcher.gpus_per_node=0",
                "launcher.ranks_per_node=1", "launcher.requeue=true", "launcher.wait=true", "launcher.poll_s=0.2"]
# Both nodes, whole, in the partition whose PriorityTier preempts `debug` (PreemptMode=REQUEUE).
URGENT_JOB = ["--parsable", "--partition=urgent", "--nodes=2", "--exclusive", "--output=/dev/null", "--wrap=true"]


def read_job_id(launcher: subprocess.Popen) -> str:
    """The job id the launcher prints once sbatch accepted the script."""
    for line in launcher.stdout:
        if found := re.search(r"submitted SLURM job (\d+)", line):
            return found.group(1)
    raise AssertionError(f"the launcher ended ({launcher.wait()}) without submitting a job")


def test_a_preempted_job_is_requeued_and_resumes_from_its_journals(slurm_cluster, tiny_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    args = [f"model={tiny_model_dir}", f"dataset={prompts}", "generation.batch_size=1", "output.print_table=false"]
    assert run_in_process([*args, f"output.dir={tmp_path / 'uninterrupted'}"]) == 0
    uninterrupted = read_outputs(tmp_path / "uninterrupted")
    out = tmp_path / "out"
    launcher = subprocess.Popen([sys.executable, "-m", "distgen.launch", *REQUEUED_JOB, *args, f"output.dir={out}"],
                                cwd=REPO, env={**slurm_cluster.env, **paced_env(APPEND_DELAY_S)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job_id = None
    try:
        job_id = read_job_id(launcher)
        wait_until(lambda: len(journaled(out)) >= 2 or launcher.poll() is not None, STARTS_WITHIN_S,
                   "two journaled completions", out / f"slurm-{job_id}.log")
        assert launcher.poll() is None, launcher.communicate()[0]
        urgent = subprocess.run(["sbatch", *URGENT_JOB], env=slurm_cluster.env, capture_output=True, text=True)
        assert urgent.returncode == 0, urgent.stderr
        rest, _ = launcher.communicate(timeout=ENDS_WITHIN_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            if job_id:
                subprocess.run(["scancel", job_id], env=slurm_cluster.env, timeout=30)
    assert launcher.returncode == 0, rest[-5000:]

    # launcher.wait followed the job through the requeue (same id) to its end
    assert f"SLURM job {job_id} was requeued (restart 1)" in rest, rest[-5000:]
    assert f"SLURM job {job_id} ended COMPLETED, exit status 0" in rest
    log = (out / f"slurm-{job_id}.log").read_text()  # --open-mode=append: both starts in one log
    assert re.search(rf"JOB {job_id} ON \S+ CANCELLED AT \S+ DUE TO PREEMPTION", log), log[-3000:]
    assert f"SLURM job {job_id}, start 1," in log and f"SLURM job {job_id}, start 2," in log
    resumed = re.search(r"resuming: (\d+) of 12 prompts", log)
    assert resumed and 2 <= int(resumed.group(1)) < len(PROMPTS), log[-3000:]

    outputs = read_outputs(out)
    assert sorted(r["id"] for r in outputs) == sorted(p["id"] for p in PROMPTS)
    assert outputs == uninterrupted
