"""distgen's CPU backend: AVX2/OpenMP kernels in C (cpu_kernels.c, built at first use, called through ctypes by
kernels.py) and the owned Llama-style decoder stack over them (model.py)."""
