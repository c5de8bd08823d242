"""What each launcher produces (commands, hostfile, sbatch script, Ray plan) against golden text,
its config checks, and the rank table. Pure: no process is started here.
Regenerate the golden files after an intended change: DISTGEN_UPDATE_GOLDEN=1 pytest tests/test_launchers.py"""
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distgen.parallel.env import ALONE, RANK_ENV, discover, first_host, port_for_job, tasks_per_node
from distgen.common.errors import ConfigError
from distgen.launchers import LAUNCHERS
from distgen.launchers.base import free_port
from distgen.launchers.deepspeed import DeepspeedLauncher, deepspeed_command, hostfile_text
from distgen.launchers.ray import RankWorker, RayLauncher, bundles, collect, job_submit_command, local_ranks, rank_env
from distgen.launch import main as launch_main
from distgen.launchers.slurm import SlurmLauncher, job_restarts, job_state, sbatch_script
from distgen.launchers.torchrun import TorchrunLauncher, torchrun_command
from distgen.catalog.load import load_config
from distgen.run import split_local_rank
from tests.helpers import REPO

GOLDEN = Path(__file__).resolve().parent / "golden"
JOB = ["model=/models/llama", "layout=fsdp", "dataset=my prompts.jsonl", "output.dir=out"]


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("DISTGEN_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; if intended, rerun with DISTGEN_UPDATE_GOLDEN=1"


def command_text(*commands) -> str:
    return "".join(shlex.join(c) + "\n" for c in commands)


def test_every_launcher_is_a_hydra_option_with_its_own_settings():
    assert LAUNCHERS.names() == ("none", "torchrun", "deepspeed", "slurm", "ray")
    for name in LAUNCHERS.names():
        chosen = load_config(["model=tiny", "dataset=demo", f"launcher={name}"], check=False).launcher
        assert type(chosen) is LAUNCHERS.entry(name).config
    with pytest.raises(ConfigError, match="unknown config key 'launcher.nodes'.*nproc_per_node"):
        load_config(["model=tiny", "dataset=demo", "launcher=torchrun", "launcher.nodes=2"])


def test_torchrun_commands():
    golden("torchrun.txt", command_text(
        torchrun_command(TorchrunLauncher(nproc_per_node=2), JOB, python="python"),
        torchrun_command(TorchrunLauncher(nproc_per_node=8, nnodes=2, rdzv_endpoint="head:29500"), JOB,
                         python="python")))


def test_max_restarts_reaches_torchrun():
    cmd = torchrun_command(TorchrunLauncher(max_restarts=3), [], python="py")
    assert "--max-restarts=3" in cmd
    assert not any(arg.startswith("--max-restarts") for arg in torchrun_command(TorchrunLauncher(), [], python="py"))


def test_deepspeed_commands_and_hostfile():
    one_node = deepspeed_command(DeepspeedLauncher(num_gpus=2), JOB, None, 29600, python="python")
    two_nodes = DeepspeedLauncher(num_gpus=8, num_nodes=2, hosts=["gpu1", "gpu2"], master_addr="gpu1")
    golden("deepspeed.txt", command_text(one_node, deepspeed_command(two_nodes, JOB, "out/deepspeed.hostfile",
                                                                     29500, python="python")))
    assert hostfile_text(two_nodes.hosts, two_nodes.num_gpus) == "gpu1 slots=8\ngpu2 slots=8\n"


def test_slurm_scripts():
    torchrun_mode = SlurmLauncher(nodes=2, gpus_per_node=8, partition="gpu", account="proj", time="04:00:00",
                                  cpus_per_task=32, requeue=True, extra_sbatch=["--qos=high"],
                                  setup=["source .venv/bin/activate"])
    golden("slurm_torchrun.sbatch", sbatch_script(torchrun_mode, JOB, "python", "/job/out/slurm-%j.log", "/job"))
    srun_mode = SlurmLauncher(nodes=2, gpus_per_node=0, ranks_per_node=1, mode="srun", port=29500)
    golden("slurm_srun.sbatch", sbatch_script(srun_mode, JOB, "/venv/bin/python", "/job/out/slurm-%j.log", "/job"))


def test_ray_plan_and_job_submit_command():
    cfg = RayLauncher(ranks=3, cpus_per_rank=2, gpus_per_rank=1)
    assert bundles(cfg) == [{"CPU": 2, "GPU": 1}] * 3
    assert bundles(RayLauncher(ranks=2)) == [{"CPU": 1}] * 2
    assert local_ranks(["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2", "10.0.0.1"]) == [0, 0, 1, 1, 2]
    golden("ray_job_submit.txt", command_text(job_submit_command(
        "http://head:8265", ["launcher=ray", "launcher.ranks=2", "launcher.submit=http://head:8265", *JOB])))


@pytest.mark.parametrize("overrides, message", [
    (["launcher=slurm", "launcher.mode=mpi"], "launcher.mode='mpi' is not allowed: expected one of torchrun, srun"),
    (["launcher=slurm", "launcher.ranks_per_node=0"], "launcher.ranks_per_node=0 is not allowed: must be >= 1"),
    (["launcher=slurm", "device=cuda"], "launcher.gpus_per_node=None is not allowed: device=cuda needs the GPUs per "
                                        "node to ask SLURM for"),
    (["launcher=torchrun", "device=cpu"], "launcher.nproc_per_node='gpu' is not allowed: one worker per GPU, but "
                                          "this job runs on CPU"),
    (["launcher=torchrun", "launcher.nproc_per_node=auto"], "expected gpu (one worker per GPU) or an integer >= 1"),
    (["launcher=slurm", "launcher.extra_sbatch=[qos]"], "each entry is one sbatch option"),
    (["launcher=deepspeed", "device=cpu"], "launcher.num_gpus='gpu' is not allowed: one worker per GPU, but "
                                           "this job runs on CPU"),
    (["launcher=deepspeed", "launcher.num_gpus=0"], "expected gpu (one rank per GPU) or an integer >= 1"),
    (["launcher=deepspeed", "launcher.num_gpus=2", "launcher.num_nodes=2"],
     "launcher.num_nodes=2 is not allowed: needs launcher.hosts"),
    (["launcher=deepspeed", "launcher.num_gpus=2", "launcher.hosts=[a]", "launcher.hostfile=h"], "not both"),
    (["launcher=ray", "launcher.placement=RANDOM"], "launcher.placement='RANDOM' is not allowed: expected one of"),
    (["launcher=ray", "launcher.submit=head:8265"], "the job server's URL"),
    (["launcher=ray", "launcher.nodes=2"], "unknown config key 'launcher.nodes'"),
])
def test_launcher_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(["model=tiny", "dataset=demo", *overrides])


def test_slurm_asks_for_gpus_only_when_told(tmp_path):
    cpu_job = load_config(["model=tiny", "dataset=demo", "launcher=slurm", "launcher.nodes=2"]).launcher
    script = sbatch_script(cpu_job, JOB, "python", "/job/out/slurm-%j.log", "/job")
    assert "--gpus-per-node" not in script and "--nproc-per-node=1" in script
    gpu_job = load_config(["model=tiny", "dataset=demo", "launcher=slurm", "launcher.gpus_per_node=4"]).launcher
    assert "#SBATCH --gpus-per-node=4" in sbatch_script(gpu_job, JOB, "python", "/l", "/job")
    assert "--nproc-per-node=4" in sbatch_script(gpu_job, JOB, "python", "/l", "/job")


def test_a_refused_sbatch_is_a_message_in_its_own_words(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Invalid generic resource (gres) specification' >&2\n"
                                 "exit 1\n")
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    status = launch_main(["model=tiny", "dataset=demo", "launcher=slurm", "launcher.gpus_per_node=8",
                          f"output.dir={tmp_path / 'out'}"])
    assert status == 1
    err = capsys.readouterr().err
    assert "distgen: launch failed: sbatch refused the job" in err
    assert "Invalid generic resource (gres) specification" in err and "Traceback" not in err


@pytest.mark.parametrize("sbatch, scontrol, message", [
    ("echo 4242", "echo 'scontrol: error: Unable to contact slurm controller' >&2; exit 1",
     r"launch failed: scontrol could not report SLURM job 4242 \(exit status 1: scontrol: error: Unable to contact "
     r"slurm controller\); the job may still run"),
    ("echo 4242", "echo 'JobId=4242 JobName=distgen'",
     r"launch failed: cannot read the job state from scontrol: 'JobId=4242 JobName=distgen'; the job may still run"),
    ("echo", "exit 1", r"launch failed: sbatch gave no job id for .*distgen-slurm.sbatch \(sbatch --parsable printed ''"),
])
def test_slurm_tools_that_answer_oddly_are_a_message_not_a_traceback(sbatch, scontrol, message, tmp_path,
                                                                      monkeypatch, capsys):
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in (("sbatch", sbatch), ("scontrol", scontrol)):
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    status = launch_main(["model=tiny", "dataset=demo", "launcher=slurm", "launcher.wait=true", "launcher.poll_s=0.1",
                          f"output.dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err and re.search(message, err), err


def test_sbatch_job_state_and_exit_status():
    assert job_state("JobId=3 JobState=COMPLETED Reason=None ExitCode=0:0 RunTime=1") == ("COMPLETED", 0)
    assert job_state("JobId=3 JobState=FAILED ExitCode=2:0") == ("FAILED", 2)
    assert job_state("JobId=3 JobState=CANCELLED ExitCode=0:15") == ("CANCELLED", 143)
    assert job_state("JobId=3 JobState=PENDING Reason=Priority") == ("PENDING", 0)
    # a requeued job is PENDING again under the same id, with a restart count
    assert job_restarts("JobId=3 JobState=PENDING Reason=BeginTime Requeue=1 Restarts=1 BatchFlag=1") == 1
    assert job_restarts("JobId=3 JobState=RUNNING") == 0


SLURM_STEP = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
              "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4"}
TORCH = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}


def test_rank_table_covers_every_launcher():
    assert [row.launcher for row in RANK_ENV] == ["torchrun", "deepspeed", "ray", "slurm", "env"]
    assert discover({}) == ALONE
    torchrun = discover({**TORCH, "TORCHELASTIC_RUN_ID": "x"})
    assert (torchrun.launcher, torchrun.rank, torchrun.world_size, torchrun.init_method) == ("torchrun", 1, 2, "env://")
    # deepspeed's `--local_rank=N` argument wins over the environment
    deepspeed = discover({**TORCH, "CROSS_RANK": "0"}, local_rank_arg=0)
    assert (deepspeed.launcher, deepspeed.rank, deepspeed.local_rank) == ("deepspeed", 1, 0)
    # one srun task per rank: SLURM's variables; the address falls back to the first node, the port to the job id
    slurm = discover(SLURM_STEP)
    assert (slurm.launcher, slurm.rank, slurm.world_size, slurm.local_rank) == ("slurm", 3, 4, 1)
    assert slurm.init_method == f"tcp://gpu07:{port_for_job('4242')}"
    exported = discover({**SLURM_STEP, "DISTGEN_MASTER_ADDR": "10.0.0.7", "DISTGEN_MASTER_PORT": "29511"})
    assert exported.init_method == "tcp://10.0.0.7:29511"
    # torchrun started by srun (one per node): torchrun's variables win over SLURM's
    assert discover({**SLURM_STEP, **TORCH, "TORCHELASTIC_RUN_ID": "x"}).launcher == "torchrun"
    ray = discover(rank_env(1, 2, 0, 2, "10.0.0.9", 41000))
    assert (ray.launcher, ray.rank, ray.world_size, ray.local_rank, ray.init_method) == (
        "ray", 1, 2, 0, "tcp://10.0.0.9:41000")
    with pytest.raises(RuntimeError, match="SLURM_PROCID=None is not a number"):
        discover({"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1"})


def test_each_launcher_row_says_how_many_ranks_share_this_host():
    assert discover({}).local_world_size == 1
    torchrun = {**TORCH, "TORCHELASTIC_RUN_ID": "x"}
    assert discover({**torchrun, "LOCAL_WORLD_SIZE": "4"}).local_world_size == 4
    assert discover(torchrun).local_world_size == 1  # not said: 1
    # deepspeed's launcher calls it LOCAL_SIZE; torch's name is not read under deepspeed
    assert discover({**TORCH, "CROSS_RANK": "0", "LOCAL_SIZE": "3", "LOCAL_WORLD_SIZE": "8"}).local_world_size == 3
    assert discover(rank_env(1, 3, 0, 2, "10.0.0.9", 41000)).local_world_size == 2
    # srun: the step's tasks per node in nodelist order, this node picked by SLURM_NODEID
    uneven = {**SLURM_STEP, "SLURM_STEP_TASKS_PER_NODE": "2(x2),1"}
    assert [discover({**uneven, "SLURM_NODEID": str(n)}).local_world_size for n in range(3)] == [2, 2, 1]
    assert discover({**SLURM_STEP, "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NODEID": "0"}).local_world_size == 4
    assert discover(SLURM_STEP).local_world_size == 1
    assert discover({**TORCH, "LOCAL_WORLD_SIZE": "2"}).local_world_size == 2  # the plain env row
    assert tasks_per_node("3,2(x2), 1") == [3, 2, 2, 1]
    with pytest.raises(RuntimeError, match=r"SLURM_STEP_TASKS_PER_NODE='2\(x\)' is not a number of ranks per node"):
        discover({**uneven, "SLURM_STEP_TASKS_PER_NODE": "2(x)"})
    with pytest.raises(RuntimeError, match="LOCAL_WORLD_SIZE='two' is not a number"):
        discover({**torchrun, "LOCAL_WORLD_SIZE": "two"})


def test_first_host_of_a_slurm_nodelist():
    assert first_host("gpu[03-04,7],cpu1") == "gpu03"
    assert first_host("a,b") == "a"
    assert first_host("rack[1-2]-node[5-6]") == "rack1-node5"


def test_deepspeed_local_rank_argument():
    assert split_local_rank(["--local_rank=1", "layout=fsdp"]) == (["layout=fsdp"], 1)
    assert split_local_rank(["--local_rank", "0", "layout=fsdp"]) == (["layout=fsdp"], 0)
    assert split_local_rank(["layout=fsdp"]) == (["layout=fsdp"], None)
    with pytest.raises(ConfigError, match="--local_rank='x' is not allowed"):
        split_local_rank(["--local_rank=x"])


class FakeRay:
    """ray.wait/ray.get over results known in advance (an exception: that actor failed)."""

    def __init__(self, results):
        self.results = results

    def wait(self, pending, num_returns):
        return pending[:num_returns], pending[num_returns:]

    def get(self, ref):
        if isinstance(self.results[ref], Exception):
            raise self.results[ref]
        return self.results[ref]


def test_ray_driver_prints_the_coordinators_report(capsys):
    fake = FakeRay({"r1": (0, ""), "r0": (0, "the table\n")})
    assert collect(fake, {"r1": 1, "r0": 0}, "out") == 0
    assert capsys.readouterr().out == "the table\n"


def test_a_ray_rank_returns_its_closing_lines_and_prints_the_others_live(capsys):
    def entry(overrides: list[str]) -> int:
        logging.getLogger("distgen.job.run").info("a live line")
        logging.getLogger("distgen.report").info("the table")
        return 0

    assert RankWorker().run({}, [], entry) == (0, "distgen: the table\n")
    assert capsys.readouterr() == ("distgen: a live line\n", "")


def test_a_failing_ray_actor_ends_the_job_naming_its_rank(capsys):
    fake = FakeRay({"r1": RuntimeError("boom"), "r0": (0, "")})
    assert collect(fake, {"r1": 1, "r0": 0}, "out") == 1
    err = capsys.readouterr().err
    assert "rank 1 (Ray actor) failed: RuntimeError: boom" in err and "journaled in out" in err
    assert collect(FakeRay({"r0": (2, "")}), {"r0": 0}, "out") == 2


def test_ray_and_deepspeed_are_imported_only_when_chosen():
    code = "import sys, distgen.launch; print(sorted({'ray', 'deepspeed'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_ray_address_nothing_listens_on_is_a_clear_error_at_once(tmp_path, capsys):
    """ray.init retries such an address for minutes, printing its own warnings; distgen names the address first."""
    port = free_port()  # bound and closed again: nothing listens there
    started = time.monotonic()
    assert launch_main(["model=tiny", "dataset=demo", "launcher=ray", f"launcher.address=127.0.0.1:{port}",
                        f"output.dir={tmp_path / 'out'}"]) == 1
    assert time.monotonic() - started < 60
    assert (f"launch failed: launcher.address='127.0.0.1:{port}' could not be reached (ConnectionRefusedError"
            in capsys.readouterr().err)


@pytest.mark.parametrize("overrides, holds", [
    (["launcher=none"], True),
    (["launcher=torchrun", "launcher.nproc_per_node=2"], True),
    (["launcher=torchrun", "launcher.nproc_per_node=2", "launcher.nnodes=2", "launcher.rdzv_endpoint=h:1"], False),
    (["launcher=deepspeed", "launcher.num_gpus=2"], True),
    (["launcher=deepspeed", "launcher.num_gpus=2", "launcher.num_nodes=2", "launcher.hosts=[a,b]"], False),
    (["launcher=slurm"], False),
    (["launcher=ray"], False),
])
def test_the_launcher_holds_the_lock_only_where_rank_0_runs_under_it(overrides, holds, monkeypatch):
    """distgen/outputs/lock.py: the launcher takes output.dir's lock where its rank 0 runs under it on this node."""
    for row in RANK_ENV:
        monkeypatch.delenv(row.marker, raising=False)
    cfg = load_config(["model=tiny", "dataset=x.jsonl", *overrides], check=False)
    assert LAUNCHERS.get(cfg.launcher.name).holds_lock(cfg) is holds
    if cfg.launcher.name == "none":  # rank 1 of a launcher that started `distgen.launch launcher=none` itself
        for name, value in {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
            monkeypatch.setenv(name, value)
        assert not LAUNCHERS.get("none").holds_lock(cfg)
