#!/usr/bin/env bash
# Install (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# optimum-quanto compiles its CPU int4 kernels (a C++ extension kept in the venv) on first use: build
# them once here, for the quanto_int4 tests, rather than in setup.sh, which the demo also runs.
.venv/bin/python -c 'from optimum.quanto.library.extensions import get_extension; get_extension("quanto_cpp").lib' \
  || echo "distgen: optimum-quanto's CPU kernels did not build (no C++ compiler?); quanto_int4 retries on first use"
# SLURM and munge for the launcher tests that start a local cluster (skip where they cannot).
bash scripts/setup-clusters.sh
exec .venv/bin/python -m pytest "$@"
