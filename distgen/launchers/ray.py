"""Ray: one actor per rank in one placement group, on a running Ray cluster or a local one.

Rank 0's actor picks a free port on its node; every actor sets the Ray row of the rank table
(distgen.parallel.env.RANK_ENV) and runs the same worker code as a torchrun rank, so the actors form
one torch.distributed group (gloo or NCCL). The driver prints the coordinator's report. Inside a
cluster, `ray job submit --address http://HEAD:8265 -- python -m distgen.launch launcher=ray ...`
runs this driver on the head (`launcher.submit=http://HEAD:8265` writes that command for you).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from distgen.common import log
from distgen.common.checks import require
from distgen.common.registry import Registry
from distgen.config import LauncherConfig, RunConfig
from distgen.parallel.env import RANK_VARS
from distgen.common.errors import ConfigError, LaunchError
from distgen.launchers.base import Entry, Launcher, free_port, register, run_command

logger = logging.getLogger(__name__)

# Ray's placement-group strategies (launcher.placement), by Ray's own names.
PLACEMENT_STRATEGIES: Registry[str] = Registry("launcher.placement", valued=True, within="ray")
PLACEMENT_STRATEGIES.register("STRICT_PACK", None, "STRICT_PACK", doc="every rank on one node")
PLACEMENT_STRATEGIES.register("PACK", None, "PACK", doc="on as few nodes as possible (best effort)")
PLACEMENT_STRATEGIES.register("SPREAD", None, "SPREAD", doc="over as many nodes as possible (best effort)")
PLACEMENT_STRATEGIES.register("STRICT_SPREAD", None, "STRICT_SPREAD", doc="every rank on a node of its own")
CONNECT_TIMEOUT_S = 10.0
SUBMIT_KEY = "launcher.submit"


@dataclass
class RayLauncher(LauncherConfig):
    """Ray: launcher.ranks actors in one placement group on launcher.address (or a local cluster)."""
    name: str = "ray"
    # The cluster (host:6379, or "auto"); empty: the one ray.init() finds (RAY_ADDRESS, a cluster
    # started on this machine), else a new local one.
    address: str = ""
    ranks: int = 2
    # One bundle per rank; gpus_per_rank=0 runs on CPUs (gloo).
    cpus_per_rank: float = 1.0
    gpus_per_rank: float = 0.0
    # STRICT_PACK: every rank on one node; SPREAD: over as many nodes as possible.
    placement: str = "STRICT_PACK"
    placement_timeout_s: float = 300.0
    # A job server (http://HEAD:8265): run this driver there with `ray job submit` instead of here.
    submit: str = ""

    def check(self) -> None:
        require(self.ranks >= 1, "launcher.ranks", self.ranks, "must be >= 1")
        require(self.cpus_per_rank >= 0, "launcher.cpus_per_rank", self.cpus_per_rank, "must be >= 0")
        require(self.gpus_per_rank >= 0, "launcher.gpus_per_rank", self.gpus_per_rank, "must be >= 0")
        require(self.cpus_per_rank > 0 or self.gpus_per_rank > 0, "launcher.cpus_per_rank", self.cpus_per_rank,
                "a rank needs some resources: cpus_per_rank > 0 or gpus_per_rank > 0")
        require(self.placement_timeout_s > 0, "launcher.placement_timeout_s", self.placement_timeout_s, "must be > 0")
        require(not self.submit or self.submit.startswith(("http://", "https://")), SUBMIT_KEY, self.submit,
                "the job server's URL, e.g. http://HEAD:8265")


def bundles(cfg: RayLauncher) -> list[dict[str, float]]:
    """One placement-group bundle per rank."""
    bundle = {"CPU": cfg.cpus_per_rank, "GPU": cfg.gpus_per_rank}
    return [{k: v for k, v in bundle.items() if v > 0} for _ in range(cfg.ranks)]


def local_ranks(nodes: Sequence[str]) -> list[int]:
    """Each rank's index among the ranks on its node (ranks in order)."""
    seen: Counter[str] = Counter()
    ranks = []
    for node in nodes:
        ranks.append(seen[node])
        seen[node] += 1
    return ranks


def rank_env(rank: int, world_size: int, local_rank: int, local_world_size: int, master_addr: str,
             master_port: int) -> dict[str, str]:
    """What an actor sets before it runs the worker: the Ray row of the rank table."""
    row = RANK_VARS["ray"]
    return {row.rank: str(rank), row.world_size: str(world_size), row.local_rank: str(local_rank),
            row.local_world_size: str(local_world_size), row.master_addr: master_addr,
            row.master_port: str(master_port)}


def job_submit_command(job_server: str, overrides: Sequence[str], python: str = "python",
                       ray: Sequence[str] = ("ray",)) -> list[str]:
    """`ray job submit`: the driver (`python -m distgen.launch launcher=ray ...`) runs on the cluster,
    with the cluster's `python`."""
    entrypoint = [python, "-m", "distgen.launch", *(o for o in overrides if not o.startswith(SUBMIT_KEY + "="))]
    return [*ray, "job", "submit", f"--address={job_server}", "--", *entrypoint]


class RankWorker:
    """One rank, as a Ray actor (wrapped with ray.remote when the launcher runs)."""

    def node_address(self) -> str:
        import ray
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        return free_port()

    def run(self, env: dict[str, str], overrides: list[str], entry: Entry) -> tuple[int, str]:
        """The worker's exit status and its closing lines (the coordinator's table and `wrote N records`: the
        driver prints them; the other lines reach it live through Ray's log_to_driver). `entry` (distgen.run.main)
        travels by reference: the actor imports it."""
        os.environ.update(env)
        with log.captured(log.REPORT) as closing:
            status = entry(overrides)
        return status, closing.getvalue()


def collect(ray, runs: dict, out_dir: str) -> int:
    """Wait for every rank; the first failure ends the job, naming its rank."""
    pending, report = list(runs), ""
    while pending:
        [done], pending = ray.wait(pending, num_returns=1)
        rank = runs[done]
        try:
            status, printed = ray.get(done)
        except Exception as err:  # an actor that died or raised
            logger.error("rank %d (Ray actor) failed: %s: %s\nthe finished completions stay journaled in %s; rerun "
                         "the same command to resume", rank, type(err).__name__, err, out_dir)
            return 1
        if status != 0:
            logger.error("rank %d (Ray actor) exited with status %d", rank, status)
            return status
        report = printed if rank == 0 else report
    print(report, end="", flush=True)  # rank 0's closing lines, formatted (and prefixed) there
    return 0


def run_ranks(ray, cfg: RayLauncher, overrides: Sequence[str], out_dir: str, entry: Entry) -> int:
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group(bundles(cfg), strategy=PLACEMENT_STRATEGIES.get(cfg.placement))
    actors = []
    try:
        ready, _ = ray.wait([group.ready()], timeout=cfg.placement_timeout_s)
        if not ready:
            raise LaunchError(f"Ray could not place {cfg.ranks} ranks ({bundles(cfg)[0]} each, {cfg.placement}) "
                               f"within {cfg.placement_timeout_s:.0f} s; the cluster has {ray.cluster_resources()}")
        actor = ray.remote(RankWorker)
        actors = [actor.options(num_cpus=cfg.cpus_per_rank, num_gpus=cfg.gpus_per_rank,
                                scheduling_strategy=PlacementGroupSchedulingStrategy(group, rank)).remote()
                  for rank in range(cfg.ranks)]
        nodes = ray.get([a.node_address.remote() for a in actors])
        port = ray.get(actors[0].free_port.remote())
        on_node = Counter(nodes)
        runs = {a.run.remote(rank_env(rank, cfg.ranks, local, on_node[node], nodes[0], port), list(overrides),
                                  entry): rank
                for rank, (a, local, node) in enumerate(zip(actors, local_ranks(nodes), nodes))}
        return collect(ray, runs, out_dir)
    finally:
        for a in actors:  # a rank still waiting in a collective for a failed peer ends here
            ray.kill(a)
        remove_placement_group(group)


def unreachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why launcher.address, given as host:port (or ray://host:port), takes no connection, or None (also for
    `auto` and forms only Ray reads): ray.init itself retries an address nothing listens on for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"


def launch(cfg: RunConfig, overrides: Sequence[str], entry: Entry) -> int:
    settings: RayLauncher = cfg.launcher
    if settings.submit:
        # The `ray` command of this Python, whether or not its folder is on PATH.
        ray_cli = (sys.executable, "-m", "ray.scripts.scripts")
        return run_command(job_submit_command(settings.submit, overrides, ray=ray_cli))
    try:
        import ray
    except ImportError:
        raise ConfigError("launcher=ray is not allowed here: the ray package is not installed "
                          "(pip install 'ray[default]')") from None
    why = unreachable(settings.address) if settings.address else None
    if why:
        raise LaunchError(f"launcher.address={settings.address!r} could not be reached ({why}): start the cluster "
                          "there (`ray start --head`) or give its head's host:port")
    try:
        ray.init(address=settings.address or None, log_to_driver=True)
    except Exception as err:  # ray raises ConnectionError, RuntimeError, ... for a cluster it cannot reach
        where = f"launcher.address={settings.address!r}" if settings.address else "a local Ray cluster"
        raise LaunchError(f"ray.init could not reach {where}: {type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from None
    try:
        return run_ranks(ray, settings, overrides, cfg.output.dir, entry)
    finally:
        ray.shutdown()


register(Launcher("ray", launch), RayLauncher)
