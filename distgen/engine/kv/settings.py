"""The checks of generation.cache and its settings, read from the cache table (kinds.CACHES)."""
from __future__ import annotations

from distgen.config import GenerationConfig, require, require_choice
from distgen.engine.kv.kinds import CACHES, slot_cache_names
from distgen.engine.kv.quantized import QUANT_BACKENDS, missing_package
from distgen.common.errors import ConfigError


def check_cache_settings(gen: GenerationConfig) -> None:
    require_choice("generation.cache", gen.cache, ("auto", *CACHES.names()))
    require_choice("generation.cache_quant_backend", gen.cache_quant_backend, QUANT_BACKENDS.names())
    backend = QUANT_BACKENDS.get(gen.cache_quant_backend)
    if gen.cache_quant_bits is not None:
        require(gen.cache_quant_bits in backend.bits, "generation.cache_quant_bits", gen.cache_quant_bits,
                f"generation.cache_quant_backend={backend.name} takes " + " or ".join(map(str, backend.bits)))
    require(gen.cache_residual_length >= 1, "generation.cache_residual_length", gen.cache_residual_length,
            "must be >= 1")
    missing = missing_package(backend)
    if gen.cache in ("auto", "quantized") and missing:
        raise ConfigError(f"generation.cache_quant_backend={backend.name!r} is not allowed: it needs the Python "
                          f"package {missing}, which is not installed (pip install {missing}); backends: "
                          + ", ".join(QUANT_BACKENDS.names()))
    if gen.cache == "auto":
        return
    slot_names = ", ".join(slot_cache_names(gen)) + " or auto"
    slots = CACHES.get(gen.cache).slots(gen)
    require(slots or gen.scheduler != "chunked", "generation.cache", gen.cache,
            f"generation.scheduler=chunked needs a slot cache: {slot_names}")
    require(slots or gen.compile != "on", "generation.cache", gen.cache,
            f"generation.compile=on needs a fixed-shape cache: {slot_names}")


def check_cache_device(gen: GenerationConfig, device_type: str) -> None:
    """A cache that runs only on some devices (offloaded: CUDA) against the device the ranks will use."""
    if gen.cache == "auto":
        return
    devices = CACHES.get(gen.cache).devices
    require(device_type in devices, "generation.cache", gen.cache,
            f"it runs on {' and '.join(devices)} only, and this job runs on {device_type}; caches for "
            f"{device_type}: auto, " + ", ".join(n for n, e in CACHES.entries.items() if device_type in e.impl.devices))
