#!/usr/bin/env bash
# Build the folder of wheels that scripts/gpu_check.sh installs on a lent GPU machine, which has
# no network and its own python3 (3.12) with torch, accelerate, tokenizers, safetensors, pytest
# ... preinstalled (/work/.library/device/KINDS.md), but not what else distgen needs.
#
#   bash scripts/gpu_wheels.sh [DIR]       # default DIR: .cache/gpu-wheels (ignored by git)
#
# Then carry DIR with the device call: run(command="bash scripts/gpu_check.sh", carry=[".cache/gpu-wheels"]).
# Safe to run again: it rebuilds only when this script, requirements.txt or scripts/setup.sh changed.
# It fails when the tracked tree plus the folder would not fit the device tool's carry limit.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-.cache/gpu-wheels}
PYTHON=${PYTHON:-$(if [ -x .venv/bin/python ]; then echo .venv/bin/python; else command -v python3; fi)}
CARRY_LIMIT_MIB=64
# What the tracked tree and the device machine's own files may take: the wheels get the rest.
TREE_ALLOWANCE_MIB=${GPU_WHEELS_TREE_ALLOWANCE_MIB:-16}
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)

pin() {  # NAME: the NAME==VERSION line of requirements.txt (the version distgen is tested with)
  grep -m1 -iE "^$1==" requirements.txt || { echo "gpu_wheels: no pin for $1 in requirements.txt" >&2; exit 2; }
}
DEEPSPEED_PIN=$(grep -m1 -oE 'deepspeed==[0-9.]+' scripts/setup.sh)
# Structured output's library and its FFI runtime, at setup.sh's pins (installed there with --no-deps; the GPU
# machine's torch brings triton, which xgrammar's CUDA kernel uses).
STRUCTURED_PINS=($(grep -m1 -oE 'xgrammar==[0-9.]+ apache-tvm-ffi==[0-9a-z.]+' scripts/setup.sh))

# Binary or pure-Python wheels pip downloads for the machine's Python (3.12, x86-64), without deps:
# transformers at our pin (the machine has an older 5.x; its huggingface_hub 1.x and tokenizers 0.23
# satisfy this pin), Hydra and its deps, and DeepSpeed's deps the machine lacks. Versions are the ones
# scripts/setup.sh resolves here.
DOWNLOADS=(
  "$(pin transformers)" "$(pin hydra-core)" "$(pin omegaconf)"
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing_extensions==4.16.0
  # datasets (inputs): the machine has pyarrow, fsspec, xxhash and pandas, not these.
  "$(pin datasets)" dill==0.4.1 multiprocess==0.70.19
  # model.quantization=quanto_*: pure Python (it JIT-builds its CUDA kernels with the machine's nvcc and ninja).
  "$(pin optimum-quanto)"
  "${STRUCTURED_PINS[@]}"
)
# Carried only while they fit beside the rest (the carry limit, the tree and a small margin): bitsandbytes
# (model.quantization=bnb_*) is one 41 MiB wheel of CUDA kernels; without it the bnb GPU tests skip, saying so.
OPTIONAL=("$(pin bitsandbytes)")
OPTIONAL_MARGIN_MIB=2
# Published as source only: built here (pip reuses its wheel cache), both pure Python.
# DS_BUILD_OPS=0: DeepSpeed compiles its CUDA ops just in time, where they are needed.
BUILDS=(antlr4-python3-runtime==4.9.3 "$DEEPSPEED_PIN")

WANT=$( (cat "$0" requirements.txt scripts/setup.sh) | sha256sum | cut -d' ' -f1)
STAMP=$DIR/.built
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "gpu_wheels: $DIR is up to date ($(du -sm "$DIR" | cut -f1) MiB)"
  exit 0
fi

rm -rf "$DIR.tmp"
mkdir -p "$DIR.tmp"
PIP=("$PYTHON" -m pip --disable-pip-version-check)
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: "${TARGET[@]}" -d "$DIR.tmp" "${DOWNLOADS[@]}"
# --no-build-isolation: DeepSpeed's setup.py imports torch; the local torch only serves the build.
DS_BUILD_OPS=0 "${PIP[@]}" wheel --quiet --no-deps --no-build-isolation -w "$DIR.tmp" "${BUILDS[@]}"

for whl in "$DIR.tmp"/*.whl; do  # a wheel built here must not be tied to this machine's Python
  case "$whl" in *-py3-none-any.whl|*-py312-none-any.whl|*cp312*|*abi3*) ;; *) echo "gpu_wheels: $whl does not fit Python 3.12" >&2; exit 1;; esac
done

wheels_mib=$(du -sm "$DIR.tmp" | cut -f1)
tree_bytes=$(git ls-files -z | xargs -0 cat 2>/dev/null | wc -c)
tree_mib=$(( (tree_bytes + 1048575) / 1048576 ))
if (( wheels_mib + TREE_ALLOWANCE_MIB > CARRY_LIMIT_MIB )) || (( wheels_mib + tree_mib > CARRY_LIMIT_MIB )); then
  echo "gpu_wheels: $wheels_mib MiB of wheels + tree ($tree_mib MiB, allowance $TREE_ALLOWANCE_MIB) exceed" \
       "the $CARRY_LIMIT_MIB MiB carry limit" >&2
  exit 1
fi
left_out=()
for want in "${OPTIONAL[@]}"; do
  rm -rf "$DIR.opt" && mkdir -p "$DIR.opt"
  "${PIP[@]}" download --quiet --no-deps --only-binary=:all: "${TARGET[@]}" --platform manylinux_2_24_x86_64 \
    -d "$DIR.opt" "$want"
  # bytes, not rounded MiB: the margin is small
  total=$(( $(du -sb "$DIR.tmp" | cut -f1) + $(du -sb "$DIR.opt" | cut -f1) + tree_bytes ))
  if (( total + OPTIONAL_MARGIN_MIB * 1048576 <= CARRY_LIMIT_MIB * 1048576 )); then mv "$DIR.opt"/*.whl "$DIR.tmp"/
  else left_out+=("$want"); fi
done
rm -rf "$DIR.opt"
(( ${#left_out[@]} )) && echo "gpu_wheels: left out (would not fit the carry limit): ${left_out[*]}" >&2
wheels_mib=$(du -sm "$DIR.tmp" | cut -f1)
rm -rf "$DIR"
mv "$DIR.tmp" "$DIR"
echo "$WANT" > "$STAMP"
echo "gpu_wheels: $(ls "$DIR"/*.whl | wc -l) wheels, $wheels_mib MiB in $DIR (tracked tree $tree_mib MiB," \
     "carry limit $CARRY_LIMIT_MIB MiB)"
