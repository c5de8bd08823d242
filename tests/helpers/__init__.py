"""Test helpers shared by several test modules, one module per theme; every name is importable as
`from tests.helpers import X`. Fixtures live in tests/conftest.py; no test module imports another test module
(tests/test_suite.py checks both)."""
from .clusters import RAY_ENV, SLURM_CONF, SLURM_DAEMONS, LocalCluster, LocalRay, LocalSlurm, missing_ray, missing_slurm
from .engine import (CPU, FLASH_211_KEYWORDS, FLASH_211_POSITIONAL, DeviceTraffic, ProbeLayer, ReplayingCapturer,
                     agree_on_batch, attention_case, crash_at_step, engine_for, generate_all, generate_samples, on_meta,
                     reads_per_step, run_all, token_major)
from .jobs import REPO, child_env, job_args, layout_names, paced_env, run_deepspeed, run_module, unknown_config_key
from .machine import Tmpfs, gpu_unavailable_reason, unreadable_runner
from .models import (ARCHITECTURES, WINDOW, WINDOW_ARCHITECTURES, WINDOW_COMMON, build_window_model, fake_hub_cache,
                     merged_with_lora, save_architecture, save_lora, save_window_model, window_config)
from .outputs import journaled, read_outputs, read_stats
from .processes import (Terminal, alive, descendants, environ_of, free_ports, living, naming, parent_pids, signal_each,
                        stop_pids, wait_until, worker_pids)
from .prompts import CHAT_TEMPLATE, DEFAULT_BUDGET, PROMPTS, write_prompts
from .reference import (OpenAIPenalties, assert_matches_generate, assert_prompts_greedy, reference_generate,
                        reference_greedy)

__all__ = [
    "ARCHITECTURES", "CHAT_TEMPLATE", "CPU", "DEFAULT_BUDGET", "DeviceTraffic", "FLASH_211_KEYWORDS",
    "FLASH_211_POSITIONAL", "PROMPTS", "RAY_ENV", "REPO", "SLURM_CONF",
    "SLURM_DAEMONS", "WINDOW", "WINDOW_ARCHITECTURES", "WINDOW_COMMON", "LocalCluster", "LocalRay", "LocalSlurm",
    "OpenAIPenalties", "ProbeLayer", "ReplayingCapturer", "Terminal", "Tmpfs", "agree_on_batch", "alive",
    "assert_matches_generate", "assert_prompts_greedy", "attention_case", "build_window_model", "child_env",
    "crash_at_step", "descendants", "engine_for", "environ_of", "fake_hub_cache", "free_ports", "generate_all",
    "generate_samples", "gpu_unavailable_reason", "job_args", "journaled", "layout_names", "living", "merged_with_lora",
    "missing_ray", "missing_slurm", "naming", "on_meta", "paced_env", "parent_pids", "read_outputs", "read_stats",
    "reads_per_step", "reference_generate", "reference_greedy", "run_all", "run_deepspeed", "run_module",
    "save_architecture", "save_lora", "save_window_model", "signal_each", "stop_pids", "token_major",
    "unknown_config_key", "unreadable_runner", "wait_until", "window_config", "worker_pids", "write_prompts",
]
