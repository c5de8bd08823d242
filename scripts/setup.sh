#!/usr/bin/env bash
# Create .venv and install distgen with its pinned dependencies. Safe to run again: it only
# reinstalls when requirements.txt, setup.cfg or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv
STAMP=$VENV/.distgen-installed
WANT=$(cat requirements.txt setup.cfg scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"distgen needs Python 3.11, found {sys.version.split()[0]}"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -r requirements.txt
# DeepSpeed builds against the torch already installed, so no isolated build environment.
DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation deepspeed==0.19.8
# Structured output (generation.json_schema/regex/choice): xgrammar and its FFI runtime, without their declared
# dependencies: xgrammar's wheel asks for triton on Linux x86_64, which only its CUDA kernel path imports (a CUDA
# torch brings its own triton); its CPU bitmask path and the matchers run without it. pydantic, numpy,
# transformers and torch come from the lines above.
"${PIP[@]}" --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
"${PIP[@]}" --no-deps --no-build-isolation -e .
echo "$WANT" > "$STAMP"
echo "distgen: installed into $VENV"
