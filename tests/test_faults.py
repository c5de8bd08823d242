"""Faults under torchrun: a rank SIGKILLed, SIGTERM/SIGINT/SIGHUP to the launcher, the launcher
SIGKILLed (the OOM killer) or its terminal closed, torchrun itself SIGKILLed, torchrun restarts.

Each job is paced (tests/slow_journal: every journal append sleeps) so that the fault surely
lands part way through; each ends within a bound, leaves no process behind, keeps its finished
completions, and a rerun resumes to the outputs of an uninterrupted run.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from distgen.outputs.shards import OPEN_SUFFIX, list_shards
from distgen.run import main as run_in_process
from tests.helpers import (REPO, Terminal, descendants, journaled, living, naming, paced_env, read_outputs, stop_pids,
                           wait_until, worker_pids, write_prompts)

PROMPTS = [{"id": f"p{i}", "prompt": f"Prompt number {i}: " + "abc " * (i % 5), "max_new_tokens": 3 + i % 4}
           for i in range(12)]
APPEND_DELAY_S = 0.4  # each finished completion holds its rank this long
ENDS_WITHIN_S = 120  # generous: the machine running the tests is shared and loaded
STARTS_WITHIN_S = 300
# A launcher gone without a word: its whole job ends this soon (the ranks close their journals on SIGTERM).
ORPHANS_GONE_WITHIN_S = 20


@pytest.fixture(scope="module")
def fault_prompts(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("fault-prompts") / "p.jsonl", PROMPTS)


def job_args(model_dir, prompts, out, *extra):
    return [f"model={model_dir}", f"dataset={prompts}", f"output.dir={out}", "generation.batch_size=1",
            "output.print_table=false", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, fault_prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert run_in_process(job_args(tiny_model_dir, fault_prompts, out)) == 0
    return read_outputs(out)


def start(command, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *command, *map(str, args)], cwd=REPO, env=paced_env(APPEND_DELAY_S),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def launcher_args(model_dir, prompts, out, *extra) -> list[str]:
    return job_args(model_dir, prompts, out, "launcher=torchrun", "launcher.nproc_per_node=2", *extra)


def start_launcher(model_dir, prompts, out, *extra) -> subprocess.Popen:
    """`python -m distgen.launch launcher=torchrun`: distgen starts torchrun in a process group of its own."""
    return start(["distgen.launch"], *launcher_args(model_dir, prompts, out, *extra))


def start_torchrun(model_dir, prompts, out, torchrun_args=(), *extra) -> subprocess.Popen:
    """torchrun itself, as a cluster script runs it (one process less to start than the launcher)."""
    return start(["torch.distributed.run", "--standalone", "--nproc-per-node=2", *torchrun_args, "-m", "distgen.run"],
                 *job_args(model_dir, prompts, out, *extra))


def wait_for_progress(launcher: subprocess.Popen, out) -> dict[int, int]:
    """The worker pids, once both ranks are generating and some completions are journaled."""
    wait_until(lambda: len(worker_pids(launcher.pid)) == 2 and len(journaled(out)) >= 2 or launcher.poll() is not None,
               STARTS_WITHIN_S, "two workers and two journaled completions")
    assert launcher.poll() is None, launcher.communicate()
    return worker_pids(launcher.pid)


def finish(launcher: subprocess.Popen) -> tuple[int, str, str, float]:
    """Exit code, stdout, stderr and seconds until the launcher and everything under it are gone."""
    start = time.monotonic()
    try:
        stdout, stderr = launcher.communicate(timeout=ENDS_WITHIN_S)
    finally:
        stop_pids(descendants(launcher.pid), grace_s=0)
        launcher.kill()
    return launcher.returncode, stdout, stderr, time.monotonic() - start


def assert_resumes_to(uninterrupted, model_dir, prompts, out, capsys):
    kept = journaled(out)
    assert 2 <= len(kept) < len(PROMPTS), "the fault should land part way through"
    assert all(record == uninterrupted[record["index"]] for record in kept)
    assert run_in_process(job_args(model_dir, prompts, out)) == 0
    assert f"resuming: {len({r['index'] for r in kept})} of {len(PROMPTS)} prompts" in capsys.readouterr().out
    assert read_outputs(out) == uninterrupted and not any(p.name.endswith(OPEN_SUFFIX) for p in list_shards(out))


def test_sigkill_of_one_rank_ends_the_job_and_a_rerun_resumes(tiny_model_dir, fault_prompts, uninterrupted, tmp_path,
                                                              capsys):
    out = tmp_path / "out"
    # fsdp: the surviving rank is inside a collective with the killed one
    launcher = start_torchrun(tiny_model_dir, fault_prompts, out, (), "layout=fsdp")
    workers = wait_for_progress(launcher, out)
    os.kill(workers[1], signal.SIGKILL)
    code, _, stderr, seconds = finish(launcher)
    assert code != 0 and seconds < ENDS_WITHIN_S, stderr
    assert not any(pid in descendants(os.getpid()) for pid in workers.values())
    assert_resumes_to(uninterrupted, tiny_model_dir, fault_prompts, out, capsys)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_to_the_launcher_stops_every_rank_and_a_rerun_resumes(signum, tiny_model_dir, fault_prompts,
                                                                     uninterrupted, tmp_path, capsys):
    out = tmp_path / "out"
    launcher = start_launcher(tiny_model_dir, fault_prompts, out)
    workers = wait_for_progress(launcher, out)
    launcher.send_signal(signum)
    code, _, stderr, seconds = finish(launcher)
    assert code == 128 + signum and seconds < ENDS_WITHIN_S, (code, stderr)  # torchrun itself exits 1
    assert f"got {signum.name}; passing it to job" in stderr
    assert stderr.count(f"rank got {signum.name}: closing journals and exiting") == 2, stderr
    for pid in workers.values():
        assert not os.path.exists(f"/proc/{pid}"), "a worker outlived the launcher"
    assert_resumes_to(uninterrupted, tiny_model_dir, fault_prompts, out, capsys)


def orphans_gone(pids, out, since: float) -> float:
    """Seconds from `since` until none of `pids` and no process naming `out` (torchrun, a rank) runs;
    what is left when the test fails is SIGKILLed."""
    try:
        wait_until(lambda: not living(pids) and not naming(str(out)), ORPHANS_GONE_WITHIN_S,
                   f"every process of the job ({pids}, or naming {out}) to end")
    finally:
        stop_pids(living([*pids, *naming(str(out))]), grace_s=0)
    return time.monotonic() - since


def ended(proc: subprocess.Popen, since: float) -> tuple[str, str]:
    """What `proc` and everything that inherited its pipes wrote, once all of them closed them."""
    try:
        return proc.communicate(timeout=max(1.0, since + ORPHANS_GONE_WITHIN_S - time.monotonic()))
    except subprocess.TimeoutExpired:
        return "", f"still open {ORPHANS_GONE_WITHIN_S} s after the kill"


def test_sigkill_of_the_launcher_leaves_no_process_and_a_rerun_resumes(tiny_model_dir, fault_prompts, uninterrupted,
                                                                       tmp_path, capsys):
    """The OOM killer's SIGKILL reaches only the launcher: its watchdog stops torchrun and the ranks."""
    out = tmp_path / "out"
    launcher = start_launcher(tiny_model_dir, fault_prompts, out)
    wait_for_progress(launcher, out)
    job = descendants(launcher.pid)  # the watchdog, torchrun, its ranks
    launcher.kill()
    killed = time.monotonic()
    _, stderr = ended(launcher, killed)
    orphans_gone(job, out, killed)
    assert "the launcher is gone" in stderr, stderr
    assert stderr.count("rank got SIGTERM: closing journals and exiting") == 2, stderr
    assert_resumes_to(uninterrupted, tiny_model_dir, fault_prompts, out, capsys)


def test_closing_the_launchers_terminal_leaves_no_process_and_a_rerun_resumes(tiny_model_dir, fault_prompts,
                                                                              uninterrupted, tmp_path, capsys):
    """A closed terminal or ssh connection: the launcher gets SIGHUP and passes it on; from then on
    every write to the terminal fails (EIO), which must not stop the ranks closing their journals."""
    out = tmp_path / "out"
    terminal = Terminal()
    launcher = terminal.start([sys.executable, "-m", "distgen.launch",
                               *map(str, launcher_args(tiny_model_dir, fault_prompts, out))],
                              cwd=REPO, env=paced_env(APPEND_DELAY_S))
    try:
        wait_for_progress(launcher, out)
    except AssertionError:
        raise AssertionError(terminal.text()[-3000:])
    job = descendants(launcher.pid)
    terminal.hang_up()
    orphans_gone([launcher.pid, *job], out, time.monotonic())
    assert launcher.wait() != 0
    assert_resumes_to(uninterrupted, tiny_model_dir, fault_prompts, out, capsys)


def test_sigkill_of_torchrun_stops_its_ranks_and_a_rerun_resumes(tiny_model_dir, fault_prompts, uninterrupted, tmp_path,
                                                                  capsys):
    """torchrun itself killed (as a cluster script runs it): each rank sees its parent gone and stops."""
    out = tmp_path / "out"
    torchrun = start_torchrun(tiny_model_dir, fault_prompts, out)
    workers = wait_for_progress(torchrun, out)
    torchrun.kill()
    killed = time.monotonic()
    _, stderr = ended(torchrun, killed)
    orphans_gone(list(workers.values()), out, killed)
    assert stderr.count("parent (pid") == 2 and stderr.count("rank got SIGTERM: closing journals") == 2, stderr
    assert_resumes_to(uninterrupted, tiny_model_dir, fault_prompts, out, capsys)


def test_torchrun_max_restarts_brings_the_job_back(tiny_model_dir, fault_prompts, uninterrupted, tmp_path):
    out = tmp_path / "out"
    # 2, not 1: on a heavily loaded machine a restarted gloo group has been seen to fail its first
    # connect (rank 0 not listening yet within gloo's 3 retries); the next restart then joins
    launcher = start_torchrun(tiny_model_dir, fault_prompts, out, ["--max-restarts=2"])
    workers = wait_for_progress(launcher, out)
    os.kill(workers[1], signal.SIGKILL)
    code, stdout, stderr, _ = finish(launcher)
    assert code == 0, stderr
    assert "distgen[rank 0]: resuming: " in stdout  # 2 ranks: each line names its rank
    assert read_outputs(out) == uninterrupted
