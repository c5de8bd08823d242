"""distgen's CPU backend: AVX2/OpenMP kernels in C (cpu_kernels.c, built at first use, called through ctypes by
kernels.py) and the owned Llama-style decoder stack over them (model.py). Importing it registers its slot attention
and kernel backend with the engine (engine_hooks.py); the catalog imports it."""
from distgen.backends.cpu import engine_hooks  # noqa: F401  (registers cpu_kernels and the cpu kernel backend)
