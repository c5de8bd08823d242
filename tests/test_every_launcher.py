"""The same job (2 ranks, fsdp, tiny model) through every launcher, each started for real on this
machine: torchrun, deepspeed, SLURM (a local controller with two slurmd "nodes", both modes) and
Ray (a local head, directly and through `ray job submit`). Every outputs.jsonl is byte-identical
to the one the job writes in a single process."""
import subprocess
import sys

import pytest

from distgen.run import main as run_in_process
from tests.helpers import DEFAULT_BUDGET, PROMPTS, REPO, child_env, read_stats, write_prompts

SLURM_CPU_JOB = ["launcher=slurm", "launcher.nodes=2", "launcher.gpus_per_node=0", "launcher.ranks_per_node=1",
                 "launcher.wait=true", "launcher.poll_s=0.2"]
LAUNCHES = {
    "torchrun": (None, ["launcher=torchrun", "launcher.nproc_per_node=2"]),
    "deepspeed": (None, ["launcher=deepspeed", "launcher.num_gpus=2"]),
    "slurm-torchrun": ("slurm_cluster", [*SLURM_CPU_JOB, "launcher.mode=torchrun"]),
    "slurm-srun": ("slurm_cluster", [*SLURM_CPU_JOB, "launcher.mode=srun"]),
    "ray": ("ray_head", ["launcher=ray", "launcher.ranks=2"]),
    "ray-job-submit": ("ray_head", ["launcher=ray", "launcher.ranks=2"]),
}


@pytest.fixture(scope="module")
def job(tiny_model_dir, tmp_path_factory):
    """The job's arguments, and the outputs.jsonl it writes in this process (one rank)."""
    folder = tmp_path_factory.mktemp("every-launcher")
    prompts = write_prompts(folder / "prompts.jsonl", PROMPTS)
    args = [f"model={tiny_model_dir}", f"dataset={prompts}", "layout=fsdp", "generation.batch_size=2",
            f"generation.max_new_tokens={DEFAULT_BUDGET}", "output.progress_every_s=0"]
    assert run_in_process([*args, f"output.dir={folder / 'one-process'}"]) == 0
    return args, (folder / "one-process" / "outputs.jsonl").read_bytes()


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_same_outputs_whichever_launcher(name, job, tmp_path, request):
    cluster_fixture, launcher_args = LAUNCHES[name]
    cluster = request.getfixturevalue(cluster_fixture) if cluster_fixture else None
    env = {**(cluster.env if cluster else {}), **child_env()}  # the cluster's settings, then ours
    if name == "ray":
        launcher_args = [*launcher_args, f"launcher.address={cluster.address}"]
    if name == "ray-job-submit":
        if not cluster.dashboard:
            pytest.skip("`ray job submit` needs the job server, whose dependencies are missing here "
                        "(requirements.txt pins ray[default]; scripts/setup.sh installs it)")
        launcher_args = [*launcher_args, f"launcher.submit={cluster.job_server}"]
    args, want = job
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "distgen.launch", *launcher_args, *args, f"output.dir={out}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    assert (out / "outputs.jsonl").read_bytes() == want
    assert [s["rank"] for s in read_stats(out)["ranks"]] == [0, 1]
    assert all(s["prompts"] > 0 for s in read_stats(out)["ranks"])
    assert f"total: {len(PROMPTS)} prompts" in result.stdout  # the coordinator's table reached the user
    if name.startswith("slurm"):
        assert "submitted SLURM job" in result.stdout and (out / "distgen-slurm.sbatch").exists()
