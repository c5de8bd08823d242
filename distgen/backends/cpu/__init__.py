"""distgen's CPU backend: AVX2 kernels (kernels.py, cpu_kernels.c) and an owned decoder stack (model.py).
Importing it registers its slot attention and kernel backend with the engine (engine_hooks.py)."""
from distgen.backends.cpu import engine_hooks  # noqa: F401  (registers cpu_kernels and the cpu kernel backend)
