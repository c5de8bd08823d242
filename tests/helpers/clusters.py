"""Real clusters on this one machine for the launcher tests: a SLURM controller with several slurmd "nodes", and a Ray
head; each keeps its state under a temp folder, starts its daemons as plain processes and stops exactly those, by PID,
even when a test fails."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .processes import free_ports, stop_pids, wait_until

SLURM_DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch")


def missing_slurm() -> str:
    """Why a local SLURM cluster cannot start here, or "" when it can."""
    absent = [name for name in SLURM_DAEMONS if not shutil.which(name, path=os.environ["PATH"] + ":/usr/sbin")]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} not found; scripts/test.sh installs slurm-wlm and munge)"
    if os.geteuid() != 0:
        return "a local slurmd must run as root"
    return ""


class LocalCluster:
    """Daemons started by `start`, stopped by `stop` on leaving the block, also when start fails."""

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


SLURM_CONF = """\
ClusterName=distgen
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long (+1 s) before it starts again (default 120)
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MinJobAge=600
KillWait=5
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SlurmctldParameters=enable_configless
# A job in `urgent` preempts jobs in `debug` by requeueing them (those submitted with --requeue).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2
"""


class LocalSlurm(LocalCluster):
    """munged, slurmctld and `nodes` slurmd on this machine; `env` lets sbatch/squeue find them."""

    def __init__(self, root: Path, nodes: int = 2, cpus: int = 2):
        self.root = root
        self.node_names = [f"dg{i + 1}" for i in range(nodes)]
        self.pids: list[int] = []
        ctld_port, *slurmd_ports = free_ports(1 + nodes)
        self.munge_socket = root / "munge" / "munge.socket"
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": os.environ["PATH"] + ":/usr/sbin"}
        host = socket.gethostname()
        # Several slurmd on one host (`slurmd -N name`): one port each, every name at 127.0.0.1.
        node_lines = "".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 "
                             f"Port={p} State=UNKNOWN\n" for n, p in zip(self.node_names, slurmd_ports))
        self.conf_text = SLURM_CONF.format(host=host, ctld_port=ctld_port, slurmd_port=slurmd_ports[0],
                                           munge_socket=self.munge_socket, root=root, node_lines=node_lines)

    def start(self) -> "LocalSlurm":
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self.conf.write_text(self.conf_text)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self.spawn(["munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                    f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--log-file={self.root / 'munge' / 'log'}",
                    f"--seed-file={self.root / 'munge' / 'seed'}"], self.root / "munge" / "out")
        wait_until(self.munge_socket.exists, 20, "munged start", self.root / "munge" / "out")
        self.spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], self.root / "slurmctld.out")
        for name in self.node_names:
            (self.root / "spool" / name).mkdir(exist_ok=True)
            self.spawn(["slurmd", "-D", "-N", name, "-f", str(self.conf)], self.root / f"slurmd-{name}.out")
        wait_until(self.nodes_idle, 60, "every slurmd registering as idle", self.root / "slurmctld.log")
        return self

    def spawn(self, argv: list[str], out: Path) -> None:
        with open(out, "wb") as log:
            proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.pids.append(proc.pid)

    def nodes_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return out.returncode == 0 and all(states.get(n) == "idle" for n in self.node_names)

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=10)
        # slurmd first (it ends its job steps), then the controller, then munge.
        stop_pids(list(reversed(self.pids)))
        self.pids.clear()


# Facts measured on this machine: without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray swaps 127.0.0.1
# for the routable address and the driver retries a wrong address forever; a token file left by
# an earlier local ray.init() can switch a new cluster to token auth.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           # a loaded machine starts the dashboard agent slowly; the raylet waits for it this long
           "RAY_raylet_start_wait_time_s": "600", "RAY_agent_register_timeout_ms": "600000"}


def missing_ray() -> str:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (it is pinned in requirements.txt)"
    return ""


class LocalRay(LocalCluster):
    """`ray start --head --block` in its own process group and temp dir; stopped by killing that group
    (never `ray stop`, which ends every Ray process on the machine)."""

    def __init__(self, root: Path, cpus: int = 2, dashboard: bool = False, env: Optional[dict] = None):
        self.root = root
        # Every port our own: Ray's defaults (8265, 52365, ...) are fixed and would clash with
        # another head on the machine.
        self.port, self.dashboard_port, *self.agent_ports = free_ports(6)
        self.dashboard = dashboard
        self.cpus = cpus
        self.proc: Optional[subprocess.Popen] = None
        # The actors inherit the head's environment (PYTHONPATH, OMP_NUM_THREADS).
        self.env = {**os.environ, **(env or {}), **RAY_ENV}
        self.address = f"127.0.0.1:{self.port}"
        self.job_server = f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> "LocalRay":
        ray_bin = Path(sys.executable).parent / "ray"
        argv = [str(ray_bin), "start", "--head", "--block", f"--num-cpus={self.cpus}", "--num-gpus=0",
                f"--port={self.port}", "--node-ip-address=127.0.0.1", f"--temp-dir={self.root}",
                "--object-store-memory=100000000", "--disable-usage-stats",
                f"--include-dashboard={str(self.dashboard).lower()}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}"]
        argv += [f"--{flag}={port}" for flag, port in zip(
            ("metrics-export-port", "dashboard-agent-grpc-port", "dashboard-agent-listen-port",
             "runtime-env-agent-port"), self.agent_ports)]
        with open(self.root / "head.out", "wb") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(self.ready, 120, "the Ray head starting", self.root / "head.out")
        return self

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError("ray start exited:\n" + (self.root / "head.out").read_text()[-3000:])
        probe = self.job_server + "/api/version" if self.dashboard else None
        if b"Ray runtime started" not in (self.root / "head.out").read_bytes():
            return False
        if probe is None:
            return True
        import urllib.request
        try:
            with urllib.request.urlopen(probe, timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        # Daemons that outlive `ray start` (raylet, gcs, workers) are still in its process group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None
