"""Process trees, signals and terminals: find, wait for and stop exactly the processes a test started."""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Optional


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free a moment ago."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, log: Optional[Path] = None,
               poll_s: float = 0.1) -> float:
    """Seconds until `condition()` held; fails naming `what` (and the tail of `log`) after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")
        time.sleep(poll_s)
    return time.monotonic() - start


def signal_each(pids, signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def stop_pids(pids, grace_s: float = 5.0) -> None:
    """SIGTERM each process we started, then SIGKILL what is left after `grace_s` (0: SIGKILL at once)."""
    pids = list(pids)
    signal_each(pids, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    for pid in pids:
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.1)
    signal_each([pid for pid in pids if alive(pid)], signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def parent_pids() -> dict[int, int]:
    """pid -> parent pid for every process visible in /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # the command name (field 2) may hold spaces; the fields after its ')' are fixed
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    parents = parent_pids()
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found.extend(children)
        frontier = children
    return found


def living(pids) -> list[int]:
    """Those of `pids` still running (a zombie only waits for its new parent to reap it: it has ended)."""
    def state(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return "gone"
    return [pid for pid in pids if state(pid) not in ("gone", "Z")]


def naming(text: str) -> list[int]:
    """Processes whose command line holds `text` (`pgrep -f`), e.g. a job's own output folder."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class Terminal:
    """A pseudo-terminal that a command gets as its controlling terminal, in a session of its own (as a
    login shell's foreground job has); `hang_up` closes it as a closed terminal window or ssh connection
    does: the kernel sends the session leader SIGHUP, and writing to the terminal fails from then on."""

    def __init__(self):
        self.master, self.slave = os.openpty()
        self.output = bytearray()
        self.stopped = threading.Event()
        self.reader = threading.Thread(target=self.drain, daemon=True)  # a full terminal would block writers

    def drain(self) -> None:
        while not self.stopped.is_set():
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.output += os.read(self.master, 1 << 16)
                except OSError:
                    return

    def start(self, argv, **kwargs) -> subprocess.Popen:
        """`argv` as the session leader, on this terminal (setsid --ctty: no fork, so the pid is argv's)."""
        proc = subprocess.Popen(["setsid", "--ctty", *argv], stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                **kwargs)
        os.close(self.slave)
        self.reader.start()
        return proc

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def hang_up(self) -> None:
        self.stopped.set()
        self.reader.join()
        os.close(self.master)


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the distgen workers started under `launcher_pid`."""
    return {int(env["RANK"]): pid for pid in descendants(launcher_pid) if "RANK" in (env := environ_of(pid))}
