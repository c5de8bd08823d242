"""The per-rank decode engine: scheduler, KV cache, runner and sampler seams (see core.Engine)."""
from distgen.engine.build import build_engine
from distgen.engine.core import Engine
from distgen.engine.request import Completion, Request, Status

__all__ = ["Completion", "Engine", "Request", "Status", "build_engine"]
