"""Processes and signals: no rank outlives its launcher.

Launcher side: `run_process_group` runs a command (torchrun and its workers) as the leader of a
process group of its own and tracks every process started under it (torchrun starts each worker
in a session of its own, outside that group). SIGTERM/SIGINT/SIGHUP sent to the launcher go to the
whole job; what still runs `grace_s` after the signal (or after the leader's own exit) is
SIGKILLed. A watchdog process, in a session of its own, does the same when the launcher dies
without a word (SIGKILL, the OOM killer): it reads a pipe the launcher holds open, and end of
file with the job still running means the launcher is gone.

Rank side: `exit_on_termination` turns the first SIGTERM/SIGINT/SIGHUP into `Terminated`, an
exception, so `with` blocks close (journals are flushed and fsynced) on the way out;
`exit_with_parent` does the same when the agent that started the rank (torchrun) is gone. A rank whose
main thread is inside a C call when the signal comes (a rendezvous or a collective waiting for a rank
that is gone), where Python's handler cannot run, exits `BLOCKED_EXIT_S` later (its wakeup pipe says).

SIGHUP already ignored when distgen starts (`nohup`) stays ignored: nohup keeps its meaning.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from distgen.common import log

# Not __name__: the watchdog runs this module as __main__.
logger = logging.getLogger("distgen.common.procs")

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
POLL_S = 0.2
# How often the launcher looks up the processes under its command again (a scan of /proc).
REFRESH_S = 2.0
GRACE_S = 30.0
# A rank whose main thread is still inside a C call this long after SIGTERM/SIGINT/SIGHUP exits at once.
BLOCKED_EXIT_S = 5.0
# The folder holding the distgen package: the watchdog imports this module from there.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# This process's parent when distgen was imported: a rank imports this module as it starts, before
# its config, dataset and model load.
PARENT_AT_START = os.getppid()


class Terminated(SystemExit):
    """A rank was asked to stop; exits with 128 + the signal number, like a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def say(message: str) -> None:
    """A warning line (stderr), or nothing: after a hangup the terminal is gone and writing to it fails (EIO),
    which must not replace the clean exit the message is about (distgen's handler drops such a line)."""
    logger.warning(message)


def exit_code(returncode: int) -> int:
    """subprocess reports death by signal N as -N; shells and launchers say 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def taken_over(signals: Sequence[signal.Signals]) -> list[signal.Signals]:
    """The signals distgen handles here: all of `signals` but SIGHUP where it is ignored already (nohup)."""
    return [sig for sig in signals if not (sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN)]


def answers(kill: Callable[[int, int], None], target: int) -> bool:
    """Whether signal 0 reaches `target` through `kill` (os.kill: a pid; os.killpg: a group): it exists, even
    where it is not ours to signal (PermissionError)."""
    try:
        kill(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: int) -> bool:
    return answers(os.killpg, pgid)


def pid_alive(pid: int) -> bool:
    return answers(os.kill, pid)


def kill_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


@dataclass(frozen=True)
class Proc:
    """One process: its pid and its start time (clock ticks after boot), so a reused pid is never taken for it."""
    pid: int
    start: int


def stat_of(pid: int) -> Optional[tuple[bytes, int, int]]:
    """(state, parent pid, start time) from /proc/PID/stat; None when there is no such process."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            raw = os.read(fd, 1024)
        finally:
            os.close(fd)
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split(None, 20)  # after the command name, which may hold spaces: field 3 on
    return fields[0], int(fields[1]), int(fields[19])


def running(proc: Proc) -> bool:
    """The same process still exists and has not exited (a zombie waits only to be reaped)."""
    stat = stat_of(proc.pid)
    return stat is not None and stat[0] != b"Z" and stat[2] == proc.start


def carrying(name: str, value: str) -> list[int]:
    """The processes here (other than this one) whose environment holds `name=value` (their own, as started:
    /proc/PID/environ; another user's are not readable and not counted); none where there is no /proc."""
    needle = f"{name}={value}".encode()
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                with open(os.path.join(entry.path, "environ"), "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry.name))
            except OSError:  # gone meanwhile, or another user's
                continue
    return found


def children_table() -> dict[int, list[Proc]]:
    """Parent pid -> its live child processes, from one scan of /proc (~5 ms for 130 processes)."""
    table: dict[int, list[Proc]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := stat_of(int(name))) is not None and stat[0] != b"Z":
            table.setdefault(stat[1], []).append(Proc(int(name), stat[2]))
    return table


def descendants(roots: set[int], table: dict[int, list[Proc]]) -> set[Proc]:
    found, frontier = set(), set(roots)
    while frontier:
        children = {child for pid in frontier for child in table.get(pid, [])} - found
        found |= children
        frontier = {child.pid for child in children}
    return found


class LaunchedJob:
    """A launched command's processes: its leader's process group, and every process seen under it
    so far. A process stays known after its parent is gone, so torchrun's workers (each the leader
    of a session of its own) are still found and stopped when torchrun itself has died."""

    def __init__(self, leader: int):
        self.leader = leader
        self.seen: set[Proc] = set()
        self.refreshed = float("-inf")

    def refresh(self) -> None:
        self.seen = {proc for proc in self.seen if running(proc)}
        self.seen |= descendants({self.leader} | {proc.pid for proc in self.seen}, children_table())
        self.refreshed = time.monotonic()

    def refresh_every(self, seconds: float) -> None:
        if time.monotonic() - self.refreshed >= seconds:
            self.refresh()

    def alive(self) -> bool:
        return group_alive(self.leader) or any(running(proc) for proc in self.seen)

    def signal(self, signum: int) -> None:
        kill_group(self.leader, signum)
        for proc in self.seen:
            if running(proc):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(proc.pid, signum)


def wait_for_job(child: subprocess.Popen, job: LaunchedJob, signalled: list[float], grace_s: float) -> int:
    """The leader's exit code, once the whole job is gone; SIGKILL for what outlives `grace_s`
    after the first forwarded signal or after the leader's own exit."""
    killed = False
    while True:
        job.refresh_every(REFRESH_S)
        returncode = child.poll()
        if returncode is not None and not job.alive():
            return exit_code(returncode)
        if returncode is not None and not signalled:
            signalled.append(time.monotonic())  # leader gone: what it started gets grace_s to follow
        if not killed and signalled and time.monotonic() - signalled[0] > grace_s:
            say(f"job {child.pid} still running {grace_s:.0f}s after the signal; SIGKILL")
            job.refresh()
            job.signal(signal.SIGKILL)
            killed = True
        time.sleep(POLL_S)


def stop_job(job: LaunchedJob, signum: int, grace_s: float) -> None:
    """`signum` to the whole job, SIGKILL to what still runs `grace_s` later; returns once it is gone."""
    job.refresh()
    job.signal(signum)
    deadline = time.monotonic() + grace_s
    while job.alive() and time.monotonic() < deadline:
        job.refresh_every(REFRESH_S)
        time.sleep(POLL_S)
    if job.alive():
        say(f"job {job.leader} still running {grace_s:.0f}s after SIGTERM; SIGKILL")
        job.refresh()
        job.signal(signal.SIGKILL)


def start_watchdog(grace_s: float) -> tuple[subprocess.Popen, int]:
    """The watchdog (`python -m distgen.common.procs`, a session of its own: a signal to the launcher's
    group or terminal does not reach it) and the write end of its pipe, which only this process holds."""
    read_end, write_end = os.pipe()  # not inherited by the job: only the watchdog gets read_end, as stdin
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        level = str(logging.getLogger(log.ROOT).getEffectiveLevel())  # the launcher's output.log_level
        watchdog = subprocess.Popen([sys.executable, "-m", "distgen.common.procs", str(grace_s), level],
                                    stdin=read_end, stdout=subprocess.DEVNULL, env=env, start_new_session=True)
    finally:
        os.close(read_end)
    return watchdog, write_end


def watch_launcher(pipe: int, grace_s: float) -> None:
    """The watchdog's work: the launcher writes its job's leader pid to `pipe`, then holds the pipe
    open until the job is over. End of file while the job still runs: the launcher died; stop the job.
    (The job's tree is looked up then: torchrun outlives the launcher, so its workers are still its
    children; a worker orphaned earlier stops by itself, `exit_with_parent`.)"""
    line = b""
    while not line.endswith(b"\n") and (part := os.read(pipe, 64)):
        line += part
    if not line.strip().isdigit():
        return  # the launcher ended before its job started
    while os.read(pipe, 64):
        pass
    job = LaunchedJob(int(line))
    job.refresh()
    if job.alive():
        say(f"the launcher is gone (killed?); stopping its job {job.leader}: SIGTERM, SIGKILL after "
            f"{grace_s:.0f}s")
        stop_job(job, signal.SIGTERM, grace_s)


def run_process_group(command: Sequence[str], grace_s: float = GRACE_S) -> int:
    """Run `command` as the leader of a new process group and return its exit code (128 + N if
    signal N ended it). SIGTERM/SIGINT/SIGHUP sent to this process go to the whole job, and the job
    is stopped the same way (by the watchdog) if this process dies."""
    watchdog, pipe = start_watchdog(grace_s)
    try:
        child = subprocess.Popen(list(command), start_new_session=True)
        os.write(pipe, f"{child.pid}\n".encode())
        job, signalled, received = LaunchedJob(child.pid), [], []

        def forward(signum: int, _frame) -> None:
            say(f"got {signal.Signals(signum).name}; passing it to job {child.pid}")
            signalled.append(time.monotonic())
            received.append(signum)
            job.refresh()
            job.signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in taken_over(FORWARDED_SIGNALS)}
        try:
            code = wait_for_job(child, job, signalled, grace_s)
            # A job stopped by a signal passed on ends as that signal, whatever its leader says (torchrun
            # turns SIGTERM/SIGHUP into its own exception and exit status 1).
            return 128 + received[0] if received and code != 0 else code
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        os.close(pipe)  # the job is over (or this process failed): the watchdog stops what is left and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=grace_s + 10)


@contextlib.contextmanager
def exit_on_termination(exit_blocked: bool = True) -> Iterator[None]:
    """Inside: the first SIGTERM/SIGINT/SIGHUP raises `Terminated`; later ones are ignored, so the
    clean-up the first one started is not cut short (the launcher SIGKILLs what hangs). `exit_blocked`: a main
    thread still inside a C call `BLOCKED_EXIT_S` after the signal exits the process (a rank waiting for others);
    false where the process is not ours to end (distgen.generate's one rank runs in the caller's process, a
    notebook's kernel: its interrupt during a long forward or load must not kill it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = taken_over(FORWARDED_SIGNALS)
    handled = threading.Event()

    def terminate(signum: int, _frame) -> None:
        handled.set()
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        say(f"rank got {signal.Signals(signum).name}: closing journals and exiting")
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, terminate) for sig in signals}
    try:
        with exiting_if_blocked(signals, handled) if exit_blocked else contextlib.nullcontext():
            yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def exiting_if_blocked(signals: Sequence[signal.Signals], handled: threading.Event) -> Iterator[None]:
    """Inside: the signals' wakeup pipe read by a watcher thread (`exit_if_blocked`)."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    wakeup = signal.set_wakeup_fd(write_end)
    watcher = threading.Thread(target=exit_if_blocked, args=(read_end, {int(s) for s in signals}, handled),
                               name="distgen-blocked-exit", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(wakeup)
        os.close(write_end)  # the watcher reads end of file and returns


def exit_if_blocked(read_end: int, signals: set[int], handled: threading.Event,
                    grace_s: Optional[float] = None) -> None:
    """The C-level signal handler writes each signal's number to the wakeup pipe even while the main thread
    is inside a C call (a rendezvous waiting for a rank 0 that refused, a collective waiting for a dead peer),
    where the Python handler cannot run until the call returns (30 min for a rendezvous). Once one of `signals`
    came and the handler has not run `grace_s` later, the rank exits at once: what it journaled is flushed
    already (every append is), and its launcher would SIGKILL it after its own grace anyway."""
    grace_s = BLOCKED_EXIT_S if grace_s is None else grace_s
    try:
        while data := os.read(read_end, 64):
            got = [n for n in data if n in signals]
            if got and not handled.wait(grace_s):
                say(f"rank still inside a call {grace_s:.0f}s after {signal.Signals(got[0]).name} (waiting for "
                    "other ranks: a rendezvous or a collective); exiting now")
                os._exit(128 + got[0])
    finally:
        os.close(read_end)


def watch_parent(parent: int, stopped: threading.Event, poll_s: float, grace_s: float) -> None:
    while not stopped.wait(poll_s):
        if os.getppid() != parent:
            say(f"this rank's parent (pid {parent}, the launcher's agent) is gone; stopping (SIGTERM), "
                f"ended by SIGALRM if still running {grace_s:.0f}s later")
            # SIGALRM's default action ends the process even where Python cannot run a handler any
            # more (stuck in a collective, or in interpreter shutdown).
            signal.alarm(max(1, round(grace_s)))
            os.kill(os.getpid(), signal.SIGTERM)
            return


@contextlib.contextmanager
def exit_with_parent(parent: int = PARENT_AT_START, poll_s: float = 1.0, grace_s: float = GRACE_S) -> Iterator[None]:
    """Inside: once `parent` (the agent that started this rank: torchrun, deepspeed's launch) is gone,
    the rank stops as if it had passed a SIGTERM on; with nothing above it left to SIGKILL it, an
    alarm ends it `grace_s` later. Use with `exit_on_termination`."""
    stopped = threading.Event()
    watcher = threading.Thread(target=watch_parent, args=(parent, stopped, poll_s, grace_s),
                               name="distgen-parent-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stopped.set()


if __name__ == "__main__":
    # The launcher's watchdog (start_watchdog): the job's leader pid, then end of file, on stdin.
    log.configure()
    logging.getLogger(log.ROOT).setLevel(int(sys.argv[2]))
    watch_launcher(sys.stdin.fileno(), float(sys.argv[1]))
