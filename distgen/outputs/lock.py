"""One job at a time in an output folder: `output.dir/distgen.lock`.

The lock is a file made by exclusive create (O_CREAT | O_EXCL: atomic on local disks and on
NFS v3+/Lustre, unlike flock), holding who made it: host, pid, scheduler job id, start time and a
random token. Its holder touches it every `heartbeat_s` from a thread; a lock whose file was not
touched for 3 heartbeats is stale (the mtime is the file server's clock; clocks are assumed within
a heartbeat of each other). Another job refuses while the lock is held, naming the holder. A lock
is taken over, saying so, only when its holder is surely gone:

  - the same host and its pid no longer runs (a crash, a SIGKILL; torchrun's restarted rank 0);
  - the same scheduler job id at another start (a requeued SLURM job: a job id runs once at a time);
  - stale, and `output.break_lock=true` (a holder on another host that vanished).

Rank 0 holds it (or the only process, launcher=none): the one process that writes the manifest,
moves earlier outputs aside and merges. The other ranks write only after rank 0 has shared the
plan, which it does once it holds the lock. Where the launcher (distgen.launch) runs rank 0 under
itself on this node (launcher=none, torchrun and deepspeed on one node), the launcher takes the lock
before it starts any process and holds it until its ranks end: of two jobs started at once the second
is refused before any rank exists (no rank left waiting for a process group whose rank 0 refused). It
hands the lock to its ranks by its token in HANDED_VAR, which they inherit; a rank 0 that finds the
lock file holding that token holds it as its launcher's (no heartbeat of its own, no release). Where
rank 0 runs elsewhere or after the launcher returned (slurm, ray, several nodes), the launcher only
looks and rank 0 takes the lock itself.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

from distgen.common.clock import timestamp
from distgen.common.errors import ConfigError
from distgen.common.procs import carrying, pid_alive

logger = logging.getLogger(__name__)

LOCK_FILE = "distgen.lock"
STALE_HEARTBEATS = 3
# The batch scheduler's job id, where one is set: the first of these present names the job (not torchrun's
# run id: without --standalone every torchrun job has the run id "none").
JOB_ID_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")
# A requeued SLURM job keeps its id and counts its starts here.
RESTART_VARS = ("SLURM_RESTART_COUNT",)
# A launcher holding the lock for its ranks puts its token here; its ranks inherit it.
HANDED_VAR = "DISTGEN_LOCK_TOKEN"
# How long a job waits for the processes of a launcher that died holding the lock (its watchdog stops them,
# SIGKILL 30 s after its SIGTERM: distgen.common.procs.GRACE_S), and how often it looks.
CARRIERS_WAIT_S = 45.0
CARRIERS_POLL_S = 0.5


class LockedError(ConfigError):
    """output.dir is locked by another job (exit status 2, like every refusal before the start)."""


@dataclass(frozen=True)
class Holder:
    """What a lock file says about the job that made it."""
    host: str
    pid: int
    job_id: str
    start: int  # the scheduler's start count of job_id (0 without one)
    started: str  # local time the lock was taken, ISO 8601
    heartbeat_s: float
    token: str
    # The pid namespace `pid` is in (/proc/self/ns/pid): two containers may share a host name, not their pids.
    # "" where unknown (a lock of an earlier distgen, no /proc).
    pid_namespace: str = ""

    def describe(self) -> str:
        job = f", job {self.job_id}" if self.job_id else ""
        return f"pid {self.pid} on {self.host}{job}, started {self.started}"


def scheduler_job(environ: Mapping[str, str]) -> tuple[str, int]:
    """(job id, start count) from the scheduler's variables; ("", 0) outside a scheduler."""
    job_id = next((f"{name}={environ[name]}" for name in JOB_ID_VARS if environ.get(name)), "")
    start = next((int(environ[name]) for name in RESTART_VARS if environ.get(name, "").isdigit()), 0)
    return job_id, start


def pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def this_holder(heartbeat_s: float, environ: Mapping[str, str] = os.environ) -> Holder:
    job_id, start = scheduler_job(environ)
    return Holder(socket.gethostname(), os.getpid(), job_id, start, timestamp(),
                  heartbeat_s, secrets.token_hex(8), pid_namespace())


def read_holder(path: Path) -> Optional[tuple[Holder, float]]:
    """The lock's holder and seconds since its last heartbeat; None when there is no lock file.
    A file that cannot be read as a lock (cut short by a crash mid-write) counts as a holder
    with no process: stale once its mtime is."""
    try:
        with path.open("rb") as f:  # open, then fstat: NFS revalidates attributes on open
            age = time.time() - os.fstat(f.fileno()).st_mtime
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    try:
        fields = json.loads(text)
        return Holder(**{k: fields[k] for k in Holder.__dataclass_fields__ if k != "pid_namespace"},
                      pid_namespace=str(fields.get("pid_namespace", ""))), age
    except (ValueError, KeyError, TypeError):
        return Holder("?", 0, "", 0, "?", 0.0, ""), age


def same_pids(holder: Holder, me: Holder) -> bool:
    """Whether the holder's pid names a process here (this host, this pid namespace)."""
    return holder.host == me.host and (holder.pid_namespace == me.pid_namespace
                                       or "" in (holder.pid_namespace, me.pid_namespace))


def carriers(token: str) -> list[int]:
    """The processes here (other than this one) started with `token` in HANDED_VAR: the ranks, torchrun and the
    watchdog of a launcher that held the lock by that token. They outlive a launcher killed by SIGKILL by up to
    the watchdog's grace (a rank stuck in a forward or a collective), and may still write into output.dir."""
    return carrying(HANDED_VAR, token)


def takeover(holder: Holder, age: float, me: Holder, break_lock: bool) -> Optional[str]:
    """Why this job may take the lock from `holder`, or None when it must refuse."""
    stale = age > STALE_HEARTBEATS * max(holder.heartbeat_s, me.heartbeat_s)
    if same_pids(holder, me) and (holder.pid == me.pid or not pid_alive(holder.pid)):
        return f"its process {holder.pid} on this host is gone"
    if holder.job_id and holder.job_id == me.job_id and holder.start != me.start:
        return f"{holder.job_id} started again (start {me.start + 1}): its earlier start is over"
    if stale and break_lock:
        return f"its last heartbeat was {age:.0f}s ago and output.break_lock=true"
    return None


def refusal(path: Path, holder: Holder, age: float, break_lock: bool) -> LockedError:
    stale_s = STALE_HEARTBEATS * holder.heartbeat_s
    if age > stale_s:
        how = (f"its last heartbeat was {age:.0f}s ago (stale after {stale_s:.0f}s): if that job is gone, "
               "rerun with output.break_lock=true to take the lock")
    else:
        how = (f"it is running (last heartbeat {age:.0f}s ago); wait for it to end, stop it, or give another "
               "output.dir" + (" (output.break_lock=true breaks only a stale lock)" if break_lock else ""))
    return LockedError(f"output.dir={str(path.parent)!r} is locked by another job: {holder.describe()} "
                       f"({path}); {how}")


def create(path: Path, me: Holder) -> bool:
    """Exclusive create of the lock file holding `me`; False when one exists. The file is written whole
    under a name of its own, then linked as the lock (atomic, and exclusive on NFS too), so a job that
    finds the lock always reads its holder, never a file still empty; where the file system has no
    hard links, exclusive create of the lock itself."""
    mine = path.with_name(f"{path.name}.{me.token}")
    write_holder(os.open(mine, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), me)
    try:
        os.link(mine, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here
        try:
            write_holder(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), me)
            return True
        except FileExistsError:
            return False
    finally:
        mine.unlink(missing_ok=True)


def write_holder(fd: int, me: Holder) -> None:
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(json.dumps(asdict(me), indent=1) + "\n")
        out.flush()
        os.fsync(out.fileno())


def handed_token(environ: Mapping[str, str] = os.environ) -> str:
    """The token of the lock this process's launcher holds for it ("" where none)."""
    return environ.get(HANDED_VAR, "")


def break_lock_file(path: Path, holder: Holder) -> None:
    """Remove `holder`'s lock, and only it: renamed aside (atomic; of two jobs breaking it at once,
    one gets it), then put back if what was renamed is another holder's (a job that took it meanwhile)."""
    aside = path.with_name(f"{path.name}.broken-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    found = read_holder(aside)
    if found is not None and found[0].token != holder.token:
        try:
            os.link(aside, path)  # never replaces a lock taken since
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


class OutputLock:
    """The lock on output.dir, held from `acquire` to `release` with a heartbeat thread."""

    def __init__(self, out_dir: Path, heartbeat_s: float, break_lock: bool = False, handed: str = ""):
        """`handed`: the token of the lock this process's launcher holds for it (handed_token())."""
        self.path = Path(out_dir) / LOCK_FILE
        self.heartbeat_s, self.break_lock, self.handed = heartbeat_s, break_lock, handed
        self.me = this_holder(heartbeat_s)
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.lost = False
        # Held by this process's launcher, for this job: its heartbeat and its release are the launcher's.
        self.inherited = False

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # each pass: create, or judge the holder (which may change under us)
            if self.adopt():
                return self
            if create(self.path, self.me):
                self.thread = threading.Thread(target=self.beat, name="distgen-lock", daemon=True)
                self.thread.start()
                return self
            found = read_holder(self.path)
            if found is None:
                continue
            holder, age = found
            reason = takeover(holder, age, self.me, self.break_lock)
            if reason is not None and holder.token and same_pids(holder, self.me):
                self.wait_for_carriers(holder)
            if reason is None:
                raise refusal(self.path, holder, age, self.break_lock)
            logger.warning("taking over the lock on %s from %s: %s", self.path.parent, holder.describe(), reason)
            break_lock_file(self.path, holder)
        raise LockedError(f"output.dir={str(self.path.parent)!r}: could not take the lock {self.path}; other jobs "
                          "keep taking it")

    def wait_for_carriers(self, holder: Holder) -> None:
        """Before taking the lock of a launcher that is gone (or stale, with output.break_lock=true): its job's
        processes still running here end first
        (its watchdog stops them, SIGKILL after its grace), so none of them writes into the folder this job writes."""
        deadline = time.monotonic() + CARRIERS_WAIT_S
        left = carriers(holder.token)
        if left:
            logger.warning("the job holding the lock on %s (%s) is gone but its processes %s still run; waiting up to "
                           "%.0fs for them to end", self.path.parent, holder.describe(), left, CARRIERS_WAIT_S)
        while left and time.monotonic() < deadline:
            time.sleep(CARRIERS_POLL_S)
            left = carriers(holder.token)
        if left:
            launcher = "is stale" if pid_alive(holder.pid) else "is gone"  # output.break_lock=true on a stale lock
            raise LockedError(f"output.dir={str(self.path.parent)!r} is locked by a job whose launcher {launcher} "
                              f"({holder.describe()}) but whose processes {left} still run after "
                              f"{CARRIERS_WAIT_S:.0f}s; stop them (kill {' '.join(map(str, left))}), then rerun")

    def adopt(self) -> bool:
        """Hold the lock as this job's launcher's, where the lock file holds the token it handed down."""
        found = read_holder(self.path) if self.handed else None
        if found is None or found[0].token != self.handed:
            return False
        self.me, self.inherited = found[0], True
        logger.debug("holding the lock on %s for its launcher: %s", self.path.parent, self.me.describe())
        return True

    def owned(self) -> bool:
        found = read_holder(self.path)
        return found is not None and found[0].token == self.me.token

    def beat(self) -> None:
        while not self.stop.wait(self.heartbeat_s):
            try:
                if not self.owned():
                    self.lost = True
                    logger.error("lost the lock %s (another job broke it); this job's outputs are no longer "
                                 "protected", self.path)
                    return
                os.utime(self.path)
            except OSError as err:  # a file server hiccup: the next beat tries again
                logger.warning("lock heartbeat on %s failed: %s", self.path, err)

    def check_held(self) -> None:
        """Before writing the manifest and merging: still ours (another job may have broken it)."""
        if self.lost or not self.owned():
            raise LockedError(f"output.dir={str(self.path.parent)!r}: this job lost its lock {self.path} to another "
                              "job (output.break_lock=true); not merging into a folder another job writes")

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        try:
            if self.owned() and not self.inherited:
                self.path.unlink()
        except OSError:
            pass

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_status(out_dir: Path, heartbeat_s: float, break_lock: bool) -> None:
    """For a launcher (which does not hold the lock): refuse now if its ranks would be refused."""
    path = Path(out_dir) / LOCK_FILE
    found = read_holder(path)
    if found is None:
        return
    holder, age = found
    handed = handed_token()
    if not (handed and holder.token == handed) and takeover(holder, age, this_holder(heartbeat_s), break_lock) is None:
        raise refusal(path, holder, age, break_lock)


@contextlib.contextmanager
def held_for_ranks(out_dir: Path, heartbeat_s: float, break_lock: bool) -> Iterator[OutputLock]:
    """A launcher whose ranks run under it on this node: the lock, taken before any of them starts and held
    (with its heartbeat) until they end, handed to them by its token in HANDED_VAR, which they inherit."""
    with OutputLock(out_dir, heartbeat_s, break_lock, handed_token()) as lock:
        before = os.environ.get(HANDED_VAR)
        os.environ[HANDED_VAR] = lock.me.token
        try:
            yield lock
        finally:
            if before is None:
                os.environ.pop(HANDED_VAR, None)
            else:
                os.environ[HANDED_VAR] = before
