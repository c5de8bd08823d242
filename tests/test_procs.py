"""No process outlives its launcher (distgen.common.procs), with small stand-ins for the real ones:
a launcher running `run_process_group`, an agent that, like torchrun, starts its worker in a session
of its own and passes no signal on, and a worker that, like a rank, closes its journal on the way out.
The real launcher, torchrun and ranks: tests/test_faults.py."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import child_env, descendants, living, stop_pids, wait_until

GRACE_S = 2.0
GONE_WITHIN_S = 15  # the grace, a parent poll, a /proc refresh, Python start-up on a loaded machine

WORKER = """
import sys, time
from pathlib import Path
from distgen.common.procs import exit_on_termination, exit_with_parent
journal, stuck = Path(sys.argv[1]), sys.argv[2] == "stuck"
with exit_on_termination(), exit_with_parent(poll_s=0.2, grace_s=float(sys.argv[3])):
    try:
        journal.write_text("running")
        while True:
            time.sleep(0.05)
    finally:
        journal.write_text("closed")
        while stuck:  # a rank that never gets out (a collective that does not return)
            try:
                time.sleep(0.05)
            except BaseException:
                pass
"""
AGENT = """
import signal, subprocess, sys
got = []
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # as torchrun: the signal is caught, the workers end,
    signal.signal(sig, lambda signum, _frame: got.append(signum))  # then its exception gives exit status 1
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], start_new_session=True)
code = worker.wait()
sys.exit(1 if got else code)
"""
LAUNCHER = """
import signal, sys
from distgen.common.procs import run_process_group
if sys.argv[1] == "nohup":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
sys.exit(run_process_group([sys.executable, "-c", *sys.argv[2:]], grace_s=float(sys.argv[-1])))
"""


@pytest.fixture
def started():
    """Every process a test starts, stopped at its end whatever happened (by pid)."""
    procs: list[int] = []
    yield procs
    stop_pids([pid for pid in procs if living([pid])], grace_s=0)


def start_job(tmp_path, started, how: str = "plain", worker: str = "clean") -> tuple[subprocess.Popen, list[int]]:
    """The stand-in launcher, once its agent and worker run: (launcher, [watchdog, agent, worker])."""
    journal = tmp_path / "journal"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, how, AGENT, WORKER, str(journal), worker,
                                 str(GRACE_S)], env=child_env(), stderr=subprocess.PIPE, text=True)
    started.append(launcher.pid)
    wait_until(lambda: journal.exists() and len(descendants(launcher.pid)) == 3 or launcher.poll() is not None,
               60, "the stand-in job to start")
    assert launcher.poll() is None, launcher.communicate()
    job = descendants(launcher.pid)
    started.extend(job)
    return launcher, job


def all_gone(pids) -> None:
    """Closed pipes come a moment before the end: a process closes its files, then exits."""
    wait_until(lambda: not living(pids), GONE_WITHIN_S, f"processes {pids} to end")


def test_a_killed_launcher_takes_its_whole_job_with_it(tmp_path, started):
    launcher, job = start_job(tmp_path, started)
    launcher.kill()  # what the OOM killer does: no handler runs
    _, stderr = launcher.communicate(timeout=GONE_WITHIN_S)  # stderr stays open while any of the job runs
    all_gone(job)
    assert "the launcher is gone" in stderr and "rank got SIGTERM: closing journals" in stderr, stderr
    assert (tmp_path / "journal").read_text() == "closed"


def test_a_killed_launcher_whose_job_ignores_sigterm_gets_it_sigkilled(tmp_path, started):
    launcher, job = start_job(tmp_path, started, worker="stuck")
    launcher.kill()
    _, stderr = launcher.communicate(timeout=GONE_WITHIN_S)
    assert f"still running {GRACE_S:.0f}s after SIGTERM; SIGKILL" in stderr, stderr
    all_gone(job)


def test_sighup_to_the_launcher_is_passed_on_like_sigterm(tmp_path, started):
    launcher, job = start_job(tmp_path, started)
    launcher.send_signal(signal.SIGHUP)
    _, stderr = launcher.communicate(timeout=GONE_WITHIN_S)
    assert launcher.returncode == 128 + signal.SIGHUP, stderr
    assert "got SIGHUP; passing it to job" in stderr and "rank got SIGHUP: closing journals" in stderr, stderr
    assert (tmp_path / "journal").read_text() == "closed"
    all_gone(job)


def test_under_nohup_sighup_stays_ignored(tmp_path, started):
    launcher, job = start_job(tmp_path, started, how="nohup")
    launcher.send_signal(signal.SIGHUP)
    time.sleep(1.5)
    assert launcher.poll() is None and living(job) == job
    launcher.terminate()
    _, stderr = launcher.communicate(timeout=GONE_WITHIN_S)
    assert "got SIGTERM; passing it to job" in stderr and "SIGHUP" not in stderr, stderr


@pytest.mark.parametrize("worker", ["clean", "stuck"])
def test_a_worker_stops_when_its_agent_is_killed(worker, tmp_path, started):
    """torchrun SIGKILLed: nothing passes a signal on; the worker sees its parent gone, stops cleanly,
    or is ended by its alarm when it cannot; the launcher returns once it is gone."""
    launcher, (watchdog, agent, rank) = start_job(tmp_path, started, worker=worker)
    os.kill(agent, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=GONE_WITHIN_S)
    assert launcher.returncode == 128 + signal.SIGKILL, stderr
    assert f"this rank's parent (pid {agent}, the launcher's agent) is gone" in stderr, stderr
    assert (tmp_path / "journal").read_text() == "closed"
    all_gone([rank, watchdog])


BLOCKED_RANK = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
from distgen.common.procs import exit_on_termination
store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=120))
with exit_on_termination():
    print("waiting", flush=True)
    store.get("a key no rank ever sets")  # as rank 1 waits in the rendezvous for a rank 0 that refused
"""


def test_a_rank_blocked_in_a_rendezvous_exits_soon_after_sigterm(tmp_path):
    """A rank inside a C call (waiting in a rendezvous or a collective for a rank that is gone) cannot run Python's
    signal handler until the call returns: it stayed up to torchrun's 30 s SIGKILL (`torchrun -m distgen.run` into
    a locked folder: rank 0 refused at once, rank 1 waited). Now it exits 5 s after the signal, saying why."""
    rank = subprocess.Popen([sys.executable, "-c", BLOCKED_RANK], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert rank.stdout.readline().strip() == "waiting"
        time.sleep(0.5)
        rank.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, stderr = rank.communicate(timeout=25)
        assert rank.returncode == 128 + signal.SIGTERM and time.monotonic() - sent < 20
        assert "rank still inside a call 5s after SIGTERM" in stderr, stderr
    finally:
        stop_pids([rank.pid], grace_s=0)


ALONE_IN_A_CALL = """
from datetime import timedelta
import torch.distributed as dist
from distgen.common.procs import exit_on_termination
store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=8))
with exit_on_termination(exit_blocked=False):
    print("waiting", flush=True)
    try:
        store.get("a key no one sets")  # a long C call: a forward or a load in a notebook's distgen.generate
    except RuntimeError:  # the call's own timeout, 8 s in; then the signal's Terminated
        pass
"""


def test_a_process_not_ours_to_end_is_not_exited_inside_a_call():
    """distgen.generate's one rank runs in the caller's process (a notebook's kernel): a signal that comes while it
    is inside a long C call raises Terminated once the call returns, as before, and never ends the process
    (exit_on_termination(exit_blocked=False), run_ranks with one rank): it exited 5 s after the signal."""
    rank = subprocess.Popen([sys.executable, "-c", ALONE_IN_A_CALL], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert rank.stdout.readline().strip() == "waiting"
        time.sleep(0.5)
        rank.send_signal(signal.SIGTERM)
        _, stderr = rank.communicate(timeout=30)
        assert rank.returncode == 128 + signal.SIGTERM, stderr
        assert "rank still inside a call" not in stderr and "rank got SIGTERM: closing journals" in stderr, stderr
    finally:
        stop_pids([rank.pid], grace_s=0)
