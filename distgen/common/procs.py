"""Processes and signals.

Launcher side: `run_process_group` runs a command (torchrun and its workers) in a process group
of its own, passes SIGTERM/SIGINT on to the whole group, waits a bounded time for it to exit,
then SIGKILLs what is left, so nothing outlives the launcher as an orphan.

Rank side: `exit_on_termination` turns the first SIGTERM/SIGINT into `Terminated`, an exception,
so `with` blocks close (journals are flushed and fsynced) on the way out.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator, Sequence

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_S = 0.2


class Terminated(SystemExit):
    """A rank was asked to stop; exits with 128 + the signal number, like a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def exit_code(returncode: int) -> int:
    """subprocess reports death by signal N as -N; shells and launchers say 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def wait_for_group(child: subprocess.Popen, signalled: list[float], grace_s: float) -> int:
    """The leader's exit code, once the whole group is gone; SIGKILL for what outlives `grace_s`
    after the first forwarded signal or after the leader's own exit."""
    killed = False
    while True:
        returncode = child.poll()
        if returncode is not None and not group_alive(child.pid):
            return exit_code(returncode)
        since = signalled[0] if signalled else None
        if returncode is not None:
            signalled.append(time.monotonic())  # leader gone: its group gets grace_s to follow
            since = signalled[0]
        if not killed and since is not None and time.monotonic() - since > grace_s:
            print(f"distgen: process group {child.pid} still running {grace_s:.0f}s after the signal; SIGKILL",
                  file=sys.stderr, flush=True)
            kill_group(child.pid, signal.SIGKILL)
            killed = True
        time.sleep(POLL_S)


def run_process_group(command: Sequence[str], grace_s: float = 30.0) -> int:
    """Run `command` as the leader of a new process group and return its exit code (128 + N if
    signal N ended it). SIGTERM/SIGINT sent to this process go to the whole group."""
    child = subprocess.Popen(list(command), start_new_session=True)
    signalled: list[float] = []

    def forward(signum: int, _frame) -> None:
        print(f"distgen: got {signal.Signals(signum).name}; passing it to process group {child.pid}",
              file=sys.stderr, flush=True)
        signalled.append(time.monotonic())
        kill_group(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        return wait_for_group(child, signalled, grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def exit_on_termination() -> Iterator[None]:
    """Inside: the first SIGTERM/SIGINT raises `Terminated`; later ones are ignored, so the
    clean-up the first one started is not cut short (the launcher SIGKILLs what hangs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, _frame) -> None:
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        print(f"distgen: rank got {signal.Signals(signum).name}: closing journals and exiting",
              file=sys.stderr, flush=True)
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, terminate) for sig in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
