"""Launchers: how a job's worker processes are started. One module per launcher, each
registering itself (and its settings class, the Hydra option `launcher=<name>`) in LAUNCHERS.
Heavy dependencies (ray, deepspeed) are imported only inside the launcher that needs them."""
from distgen.launchers.base import LAUNCHERS, WORKER_MODULE, Launcher, get_launcher
# Registration order is the order users see (the default first).
from distgen.launchers import none, torchrun, deepspeed, slurm, ray  # noqa: F401,E402,I001  (each registers itself)

__all__ = ["LAUNCHERS", "WORKER_MODULE", "Launcher", "get_launcher"]
