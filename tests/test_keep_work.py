"""Finished work is never lost or clobbered (issue 21): two jobs into one folder, reruns with other
settings, output.overwrite, grown and changed datasets, files distgen did not write, torn and
duplicated records, stale locks. Each case starts real
`python -m distgen.run` processes (launcher=none, model=tiny; two concurrent launches: `python -m distgen.launch
launcher=torchrun`) and asserts on the records."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from distgen.catalog.load import load_config
from distgen.outputs.lock import (HANDED_VAR, LOCK_FILE, LockedError, OutputLock, held_for_ranks, lock_status,
                                  this_holder)
from distgen.outputs.resume import job_settings
from distgen.outputs.shards import OPEN_SUFFIX, list_shards
from distgen.run import main as run_in_process
from tests.helpers import (REPO, alive, child_env, descendants, journaled, living, naming, paced_env, read_outputs, read_stats,
                           run_module, stop_pids, wait_until, write_prompts)

PROMPTS = [{"id": f"p{i}", "prompt": f"Prompt number {i}: " + "abc " * (i % 5), "max_new_tokens": 2 + i % 3}
           for i in range(16)]
STARTS_WITHIN_S = 300  # generous: the machine running the tests is shared and loaded


def job(prompts, out, *extra) -> list[str]:
    return ["model=tiny", f"dataset={prompts}", f"output.dir={out}", "generation.batch_size=1",
            "output.print_table=false", *map(str, extra)]


def run(prompts, out, *extra) -> subprocess.CompletedProcess:
    return run_module("distgen.run", job(prompts, out, *extra))


def start_paced(prompts, out, delay_s: float, *extra) -> subprocess.Popen:
    """A job whose every journal append sleeps `delay_s` (tests/slow_journal paces processes with RANK set;
    RANK alone, without MASTER_ADDR, still runs as launcher=none)."""
    return subprocess.Popen([sys.executable, "-m", "distgen.run", *job(prompts, out, *extra)], cwd=REPO,
                            env={**paced_env(delay_s), "RANK": "0"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def start_until_journaled(prompts, out, delay_s: float, count: int) -> subprocess.Popen:
    """A paced job, once it journaled `count` records (killed if it ends or stalls before)."""
    job = start_paced(prompts, out, delay_s)
    try:
        wait_until(lambda: len(journaled(out)) >= count or job.poll() is not None, STARTS_WITHIN_S,
                   f"{count} journaled records")
        assert job.poll() is None, job.communicate()
    except BaseException:
        stop_pids([job.pid], grace_s=0)
        raise
    return job


def ids_once(records) -> bool:
    return sorted(r["id"] for r in records) == sorted(p["id"] for p in PROMPTS)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("keep-prompts") / "p.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def uninterrupted(prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("keep-uninterrupted")
    assert run_in_process(job(prompts, out)) == 0
    return read_outputs(out), read_stats(out)


def test_a_second_job_into_a_locked_folder_refuses_naming_the_holder(prompts, uninterrupted, tmp_path):
    out = tmp_path / "out"
    first = start_until_journaled(prompts, out, 1.0, 1)
    try:
        second = run(prompts, out)
        assert first.poll() is None, "the first job should still run while the second one is refused"
        assert second.returncode == 2, second.stderr
        assert (f"is locked by another job: pid {first.pid} on {socket.gethostname()}" in second.stderr
                and "it is running" in second.stderr), second.stderr
        stdout, stderr = first.communicate(timeout=STARTS_WITHIN_S)
    finally:
        if first.poll() is None:
            stop_pids([first.pid], grace_s=0)
    assert first.returncode == 0, stderr
    assert ids_once(read_outputs(out)) and read_outputs(out) == uninterrupted[0]
    assert not (out / LOCK_FILE).exists()


def start_torchrun_launch(prompts, out, delay_s: float) -> subprocess.Popen:
    """`python -m distgen.launch launcher=torchrun` with 2 ranks, each journal append paced by `delay_s`."""
    return subprocess.Popen([sys.executable, "-m", "distgen.launch", "launcher=torchrun", "launcher.nproc_per_node=2",
                             *job(prompts, out)], cwd=REPO, env=paced_env(delay_s), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_torchrun_launches_at_once_one_runs_and_the_other_starts_no_rank(prompts, uninterrupted, tmp_path):
    """Both launchers' checks pass before either holds the lock: the launcher (not its rank 0) takes it, so the
    second one is refused before it starts torchrun; no rank of it waits for a process group that never forms."""
    out = tmp_path / "out"
    launches = [start_torchrun_launch(prompts, out, 1.0) for _ in range(2)]
    try:
        wait_until(lambda: any(p.poll() is not None for p in launches), STARTS_WITHIN_S, "one launcher to end")
        [refused] = [p for p in launches if p.poll() is not None]
        [survivor] = [p for p in launches if p is not refused]
        running = survivor.poll() is None
        # every process naming the folder now (torchrun, its ranks) is the survivor's
        strays = [pid for pid in living(naming(f"output.dir={out}")) if pid != survivor.pid]
        ours = set(descendants(survivor.pid))
        stdout, stderr = refused.communicate()
        assert refused.returncode == 2, stderr
        assert running, "the refused launcher should end while the other job runs"
        assert (f"is locked by another job: pid {survivor.pid} on {socket.gethostname()}" in stderr
                and "it is running" in stderr), stderr
        assert "launching" not in stdout + stderr and "Traceback" not in stderr, stdout + stderr
        assert set(strays) <= ours, (strays, ours)
        survived = survivor.communicate(timeout=STARTS_WITHIN_S)
    finally:
        stop_pids([p.pid for p in launches if p.poll() is None], grace_s=0)
    assert survivor.returncode == 0, survived[1]
    assert ids_once(read_outputs(out))
    assert [r["completion"] for r in read_outputs(out)] == [r["completion"] for r in uninterrupted[0]]
    assert not (out / LOCK_FILE).exists() and not living(naming(f"output.dir={out}"))


def test_a_lock_the_launcher_holds_is_its_rank_0s_own(tmp_path):
    """The launcher's lock, handed down by its token: its rank 0's checks pass, rank 0 holds it without a heartbeat
    of its own and leaves it to the launcher, which releases it when its ranks end."""
    assert HANDED_VAR not in os.environ
    with held_for_ranks(tmp_path, 0.1, False) as launcher:
        token = os.environ[HANDED_VAR]
        assert token == launcher.me.token and launcher.owned()
        lock_status(tmp_path, 0.1, False)  # rank 0's check before anything starts
        with OutputLock(tmp_path, 0.1, handed=token) as rank0:
            assert rank0.inherited and rank0.thread is None
            rank0.check_held()
        assert launcher.owned(), "rank 0 released its launcher's lock"
        first = (tmp_path / LOCK_FILE).stat().st_mtime_ns
        wait_until(lambda: (tmp_path / LOCK_FILE).stat().st_mtime_ns > first, 10, "the launcher's heartbeat")
        # a token that is not the holder's is no claim on it: another job on this host whose pid runs (pid 1)
        write_lock(tmp_path / "other", socket.gethostname(), 1)
        with pytest.raises(LockedError, match="it is running"):
            OutputLock(tmp_path / "other", 0.1, handed=token).acquire()
    assert HANDED_VAR not in os.environ and not (tmp_path / LOCK_FILE).exists()
    # a lock file that does not read as one (no token) is no launcher's lock: refused
    (tmp_path / LOCK_FILE).write_text("{")
    with pytest.raises(LockedError, match="is locked by another job"):
        lock_status(tmp_path, 30.0, False)


def test_other_settings_refuse_before_loading_and_overwrite_moves_aside(prompts, tmp_path):
    out = tmp_path / "out"
    assert run(prompts, out, "generation.max_new_tokens=8").returncode == 0
    first = read_outputs(out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    refused = run(prompts, out, "generation.max_new_tokens=16")
    assert refused.returncode == 2
    assert "generation.max_new_tokens: 8 -> 16" in refused.stderr and "output.overwrite=true" in refused.stderr
    assert "engine:" not in refused.stdout  # refused before loading anything
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing in output.dir touched

    moved = run(prompts, out, "generation.max_new_tokens=16", "output.overwrite=true")
    assert moved.returncode == 0, moved.stderr
    assert "moved the earlier outputs aside into" in moved.stderr
    [previous] = out.glob("previous-*")
    assert read_outputs(previous) == first and (previous / "stats.json").exists()
    assert ids_once(read_outputs(out)) and read_stats(out)["summary"]["resumed"] == 0


def test_a_grown_dataset_runs_only_its_new_rows_and_a_changed_prompt_again(tmp_path):
    first, grown = PROMPTS[:10], [*PROMPTS[:3], {**PROMPTS[3], "prompt": "A changed prompt"}, *PROMPTS[4:]]
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert run(write_prompts(tmp_path / "first.jsonl", first), out).returncode == 0
    resumed = run(write_prompts(tmp_path / "grown.jsonl", grown), out)
    assert resumed.returncode == 0, resumed.stderr
    assert ("1 earlier record(s) match no prompt of the dataset now (ids 'p3'): its prompt changed (text, per-record "
            "settings or kept columns: a changed prompt runs again) or its row was deleted") in resumed.stdout
    assert "resuming: 9 of 16 prompts already done" in resumed.stdout
    stats = read_stats(out)
    assert stats["ranks"][0]["prompts"] == 7 and stats["summary"]["resumed"] == 9  # 6 new rows + p3
    assert run(tmp_path / "grown.jsonl", fresh).returncode == 0
    assert read_outputs(out) == read_outputs(fresh)
    # the whole job's figures, not only the last run's
    whole, alone = stats["summary"], read_stats(fresh)["summary"]
    assert (whole["generated_tokens"], whole["prompt_tokens"]) == (alone["generated_tokens"], alone["prompt_tokens"])
    assert whole["runs"] == 2 and whole["this_run"]["generated_tokens"] < whole["generated_tokens"]
    [aside] = out.glob("previous-*/set-aside.jsonl")
    [old] = [json.loads(line) for line in aside.read_text().splitlines()]
    assert old["id"] == "p3" and old["prompt"] == PROMPTS[3]["prompt"] and old["set_aside"] == "prompt changed or row deleted"

    # a shrunk dataset: the records of rows no longer there are kept out of outputs.jsonl, not deleted
    shrunk = run(write_prompts(tmp_path / "shrunk.jsonl", grown[:5]), out)
    assert shrunk.returncode == 0, shrunk.stderr
    assert "11 record(s) of prompts no longer in the dataset are not part of the job" in shrunk.stdout
    assert read_outputs(out) == read_outputs(fresh)[:5] and read_stats(out)["ranks"][0]["prompts"] == 0
    assert sum(len(p.read_text().splitlines()) for p in out.glob("previous-*/set-aside.jsonl")) == 1 + 11


def test_files_distgen_did_not_write_are_never_deleted(prompts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "outputs.jsonl"
    mine.write_text('{"my": "own results"}\n')
    refused = run(prompts, out, "output.overwrite=true")
    assert refused.returncode == 2
    assert f"holds {mine}, which distgen did not write" in refused.stderr
    assert mine.read_text() == '{"my": "own results"}\n'
    mine.unlink()
    (out / "outputs").mkdir()
    (out / "outputs" / "notes.txt").write_text("mine")
    refused = run(prompts, out)
    assert refused.returncode == 2 and f"holds {out / 'outputs'}, which distgen did not write" in refused.stderr
    assert (out / "outputs" / "notes.txt").read_text() == "mine"


def test_a_killed_job_leaving_duplicated_and_torn_records_repairs_itself(prompts, uninterrupted, tmp_path):
    out = tmp_path / "out"
    killed = start_until_journaled(prompts, out, 0.5, 3)
    killed.kill()  # SIGKILL: no clean-up; its lock stays behind with a dead pid
    killed.communicate()
    assert (out / LOCK_FILE).exists()
    [journal] = [p for p in list_shards(out) if p.name.endswith(OPEN_SUFFIX)]
    lines = journal.read_text().splitlines(keepends=True)
    assert lines[-1].endswith("\n"), "SIGKILL landed mid-line; this test adds its own torn line"
    # as if two jobs wrote: the last record cut short (a crash mid-write: it runs again), the first one twice
    journal.write_text("".join(lines[:-1]) + lines[-1][:25] + "\n" + lines[0])
    done = {json.loads(line)["index"] for line in lines[:-1]}
    assert 2 <= len(done) < len(PROMPTS)
    again = run(prompts, out)
    assert again.returncode == 0, again.stderr
    assert f"taking over the lock on {out} from pid {killed.pid}" in again.stderr
    assert "its process" in again.stderr and "is gone" in again.stderr
    assert "repaired: 1 torn line(s) dropped" in again.stdout
    assert "repaired: 1 duplicate record(s) of one index" in again.stdout
    assert read_outputs(out) == uninterrupted[0] and ids_once(read_outputs(out))
    summary, alone = read_stats(out)["summary"], uninterrupted[1]["summary"]
    assert summary["resumed"] == len(done) and summary["generated_tokens"] == alone["generated_tokens"]


def write_lock(out, host: str, pid: int, age_s: float = 0.0):
    out.mkdir(parents=True, exist_ok=True)
    holder = {**this_holder(30.0).__dict__, "host": host, "pid": pid, "job_id": "SLURM_JOB_ID=77"}
    path = out / LOCK_FILE
    path.write_text(json.dumps(holder))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_a_lock_from_another_host_refuses_until_stale_and_broken(prompts, tmp_path, capsys):
    out = tmp_path / "out"
    lock = write_lock(out, "elsewhere", 4242)
    assert run_in_process(job(prompts, out)) == 2
    err = capsys.readouterr().err
    assert "locked by another job: pid 4242 on elsewhere, job SLURM_JOB_ID=77" in err and "it is running" in err
    write_lock(out, "elsewhere", 4242, age_s=600)
    assert run_in_process(job(prompts, out)) == 2
    assert "stale after 90s): if that job is gone, rerun with output.break_lock=true" in capsys.readouterr().err
    assert run_in_process(job(prompts, out, "output.break_lock=true")) == 0
    assert "taking over the lock" in capsys.readouterr().err and not lock.exists()
    assert ids_once(read_outputs(out))


def test_lock_heartbeat_and_takeover_rules(tmp_path):
    with OutputLock(tmp_path, heartbeat_s=0.1) as lock:
        first = (tmp_path / LOCK_FILE).stat().st_mtime_ns
        wait_until(lambda: (tmp_path / LOCK_FILE).stat().st_mtime_ns > first, 10, "a heartbeat")
        with pytest.raises(LockedError, match="it is running"):
            # another process on this host (pid 1 is alive): refused
            write_lock(tmp_path / "other", socket.gethostname(), 1)
            OutputLock(tmp_path / "other", 0.1).acquire()
        lock.check_held()
    assert not (tmp_path / LOCK_FILE).exists()
    # a job in another container of this host (another pid namespace) whose pid is not seen here: refused
    lock = write_lock(tmp_path, socket.gethostname(), 2**22 + 7)
    lock.write_text(json.dumps({**json.loads(lock.read_text()), "pid_namespace": "pid:[1]", "job_id": ""}))
    with pytest.raises(LockedError, match="it is running"):
        OutputLock(tmp_path, 30.0).acquire()
    # the same, from this pid namespace (or a lock file of an earlier distgen, without one): its process is gone
    write_lock(tmp_path, socket.gethostname(), 2**22 + 7)
    OutputLock(tmp_path, 30.0).acquire().release()
    old = write_lock(tmp_path, socket.gethostname(), 2**22 + 7)
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k != "pid_namespace"}))
    OutputLock(tmp_path, 30.0).acquire().release()
    # a requeued SLURM job (same job id, a later start) takes its own earlier start's lock
    write_lock(tmp_path, "elsewhere", 4242)
    requeued = OutputLock(tmp_path, 30.0)
    requeued.me = this_holder(30.0, {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"})
    requeued.acquire().release()


def test_only_files_that_decide_outputs_are_in_the_job(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "m")
    settings = job_settings(load_config([f"model={folder}", "dataset=x.jsonl"]))
    (folder / "README.md").write_text("notes")
    (folder / ".git").mkdir()
    assert job_settings(load_config([f"model={folder}", "dataset=x.jsonl"])) == settings
    assert "model.path[model.safetensors]" in settings and "model.path[config.json]" in settings


def test_the_launch_command_says_what_it_did_with_a_finished_job(tiny_model_dir, prompts_file, tmp_path):
    """`python -m distgen.launch` runs launch.py as __main__: its lines are distgen's all the same (prefixed,
    at their level), a finished job's rerun says so and a config error reads `distgen: config error: ...`."""
    args = [f"model.path={tiny_model_dir}", f"dataset.path={prompts_file}", f"output.dir={tmp_path / 'out'}",
            "generation.max_new_tokens=2"]
    assert run_module("distgen.launch", args).returncode == 0
    again = run_module("distgen.launch", args)
    assert again.returncode == 0 and "distgen: job " in again.stdout and "already finished" in again.stdout, \
        again.stdout + again.stderr
    assert "other output settings" not in again.stdout + again.stderr
    # Output settings that do not change the records are not in the job; a finished job is not written again, so
    # they are said not to apply (they were silently ignored), and the outputs stay as they were.
    before = (tmp_path / "out" / "outputs.jsonl").read_bytes()
    other = run_module("distgen.launch", [*args, "output.format=parquet", "output.merge=false"])
    assert other.returncode == 0 and "already finished" in other.stdout, other.stdout + other.stderr
    assert ("does not apply (output.format: jsonl -> parquet; output.merge: true -> false): output.resume=false "
            "output.overwrite=true moves them aside") in other.stdout + other.stderr
    assert (tmp_path / "out" / "outputs.jsonl").read_bytes() == before
    bad = run_module("distgen.launch", [f"model.path={tiny_model_dir}"])
    assert bad.returncode == 2 and "distgen: config error: dataset.path=None" in bad.stderr, bad.stderr


def test_a_finished_jobs_damaged_outputs_jsonl_is_merged_again_from_the_shards(tiny_model_dir, prompts_file, tmp_path):
    """outputs.jsonl cut short, edited or deleted by hand after the job finished: the rerun does not say `already
    finished` (it trusted any file there), it merges it again from the shards and says why (the manifest keeps the
    size and sha256 the merge wrote)."""
    out = tmp_path / "out"
    args = [f"model.path={tiny_model_dir}", f"dataset.path={prompts_file}", f"output.dir={out}",
            "generation.max_new_tokens=2", "output.print_table=false"]
    assert run_module("distgen.launch", args).returncode == 0
    merged = out / "outputs.jsonl"
    whole = merged.read_bytes()
    os.truncate(merged, 100)
    again = run_module("distgen.launch", args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already finished" not in again.stdout and (
        f"the finished job's outputs.jsonl is 100 bytes, not the {len(whole)} the merge wrote: merging it again from "
        "the shards") in again.stdout, again.stdout + again.stderr
    assert merged.read_bytes() == whole and "already finished" in run_module("distgen.launch", args).stdout
    merged.write_bytes(whole.replace(b'"index": 0', b'"index": 9', 1))  # the same size, another content
    edited = run_module("distgen.launch", args)
    assert "outputs.jsonl is not what the merge wrote (another sha256): merging it again" in edited.stdout, edited.stdout
    assert merged.read_bytes() == whole
    merged.unlink()
    gone = run_module("distgen.launch", args)
    assert "outputs.jsonl is missing: merging it again" in gone.stdout and merged.read_bytes() == whole, gone.stdout
    assert not list(out.glob("previous-*"))  # nothing was set aside: every record was still the job's


def test_launch_as_each_rank_of_torchrun_lets_rank_0_hold_the_lock(prompts, uninterrupted, tmp_path):
    """`torchrun -m distgen.launch launcher=none`: every rank runs the launcher's checks, and rank 0 (as its own
    launcher) takes the lock first. Rank 1, started after that (here: 4 s later), must not read that lock as
    another job's (it did: rc 2 `is locked by another job: pid <its rank 0>`). A rerun of the finished job ends at
    once on every rank (no rank 0 returning early while rank 1 waits for it in the process group)."""
    out = tmp_path / "out"
    late = tmp_path / "late-rank-1.sh"
    late.write_text(f'#!/bin/sh\n[ "$RANK" = 1 ] && sleep 4\nexec {sys.executable} -m distgen.launch "$@"\n')
    late.chmod(0o755)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--no-python",
               str(late), "launcher=none", *job(prompts, out)]
    for _ in range(2):
        done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True,
                              timeout=STARTS_WITHIN_S)
        assert done.returncode == 0, done.stderr
        assert "is locked by another job" not in done.stderr, done.stderr
        assert read_outputs(out) == uninterrupted[0] and ids_once(read_outputs(out))
    assert "already finished" in done.stdout + done.stderr
    assert not (out / LOCK_FILE).exists()


HOLDS_FOR_A_RANK = """
import subprocess, sys, time
from distgen.outputs.lock import held_for_ranks
with held_for_ranks(sys.argv[1], 0.2, False):
    rank = subprocess.Popen(["sleep", "120"])  # started with the token, as torchrun and the ranks are
    print(rank.pid, flush=True)
    time.sleep(120)
"""


def test_the_lock_of_a_killed_launcher_waits_for_its_ranks(tmp_path, monkeypatch):
    """A launcher killed by SIGKILL leaves its lock with a dead pid, and its ranks run on until its watchdog
    stops them (up to its 30 s grace for a rank stuck in a forward or a collective). A rerun took that lock at
    once ("its process is gone") and could write into the folder the old ranks still wrote. Now it waits for the
    processes carrying the lock's token to end, and refuses naming them if they outlive the wait."""
    from distgen.outputs import lock as lock_module
    out = tmp_path / "out"
    launcher = subprocess.Popen([sys.executable, "-c", HOLDS_FOR_A_RANK, str(out)], cwd=REPO, env=child_env(),
                                stdout=subprocess.PIPE, text=True)
    rank = int(launcher.stdout.readline())
    launcher.kill()
    launcher.wait()
    try:
        monkeypatch.setattr(lock_module, "CARRIERS_WAIT_S", 1.0, raising=False)
        with pytest.raises(LockedError, match=f"whose launcher is gone .* but whose processes \\[{rank}\\] still run"):
            OutputLock(out, 0.2).acquire()
        assert alive(rank) and (out / LOCK_FILE).exists()
        monkeypatch.setattr(lock_module, "CARRIERS_WAIT_S", 60.0, raising=False)
        threading.Timer(2.0, lambda: stop_pids([rank], grace_s=0)).start()
        started = time.monotonic()
        OutputLock(out, 0.2).acquire().release()
        assert time.monotonic() - started >= 1.5 and not living([rank])
    finally:
        stop_pids([rank], grace_s=0)


def test_reordered_inserted_deleted_rows_keep_their_records_and_one_changed_setting_runs_one(tmp_path):
    """A finished record belongs to its prompt (id, text, settings), not to its row: rows reordered, a row inserted
    or deleted before it keep it (every later row ran again: a record was reused only at its old index). One record
    gaining a per-record setting runs again alone (every record ran again: the field, null in every other record
    as Arrow reads JSON lines, was a kept column of each)."""
    first = PROMPTS[:8]
    edited = [{"id": "new", "prompt": "A new first row"},
              *[{**p, "seed": 3} if p["id"] == "p5" else p for p in reversed(first) if p["id"] != "p2"]]
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert run(write_prompts(tmp_path / "first.jsonl", first), out).returncode == 0
    again = run(write_prompts(tmp_path / "edited.jsonl", edited), out)
    assert again.returncode == 0, again.stderr
    assert "5 finished record(s) found at another row of the dataset" in again.stdout, again.stdout
    assert "resuming: 6 of 8 prompts already done" in again.stdout, again.stdout
    assert read_stats(out)["ranks"][0]["prompts"] == 2  # the new row and p5 (p4 stayed at its row, 5 moved)
    assert run(tmp_path / "edited.jsonl", fresh).returncode == 0
    got, want = read_outputs(out), read_outputs(fresh)
    assert [r["id"] for r in got] == [p["id"] for p in edited]
    # whole records, key order too: the kept ones have p5's new field, null, as every freshly run record has it
    assert got == want and [list(r) for r in got] == [list(r) for r in want]
    assert [r["seed"] for r in got] == [None] * 3 + [3] + [None] * 4
    # p2's row was deleted and another prompt is at its index now: its record is not said to run again
    assert "2 earlier record(s) match no prompt of the dataset now (ids 'p" in again.stdout, again.stdout
    assert "run again" not in again.stdout.replace("a changed prompt runs again", "")
    whole, alone = read_stats(out)["summary"], read_stats(fresh)["summary"]
    assert (whole["generated_tokens"], whole["prompt_tokens"]) == (alone["generated_tokens"], alone["prompt_tokens"])
    aside = [json.loads(line) for p in out.glob("previous-*/set-aside.jsonl") for line in p.read_text().splitlines()]
    assert sorted(r["id"] for r in aside) == ["p2", "p5"]
