#!/usr/bin/env bash
# The GPU check: run from the repository root on a machine with a CUDA GPU (made for the device tool's
# lent H100/H200: no network, python3 3.12 with its own torch/transformers/accelerate). In order, cheapest
# and most telling first, each step under its own timeout, the whole under GPU_CHECK_BUDGET_S (420 s):
#   1. facts      the GPU, driver, torch's CUDA / NCCL / bf16 / attention backends, package versions
#   2. install    the carried wheels (scripts/gpu_wheels.sh builds them here) this Python lacks
#   3. imports    everything distgen imports, each with its version or the reason it fails
#   4. attention  torch's varlen FlashAttention op here, the SDPA kernel each slot-cache attention call gets,
#                 what distgen picks (scripts/gpu_env.py attention)
#   5. microbench bench/gpu.py --microbench-only: decode steps at 128/256/512 rows (ms, host vs GPU, kernels),
#                 per configuration (defaults; graphs off: DISTGEN_CUDA_GRAPHS=0; generation.attention=torch_sdpa)
#   6. bench      bench/gpu.py: a ~1B Llama against HF generate and the card's measured limits (sol_fraction);
#                 the figures issue 20 asks for, so before the tests (it writes its files after every system)
#   7. tests      pytest -m gpu, four at a time (every layout vs generate in fp32, bf16, FlashAttention varlen
#                 against SDPA, CUDA-graph replays, memory stats), with the time left (at least TESTS_MIN_S)
# and writes $OUT/report.md as it goes (a killed run still leaves what it found), plus the logs and the
# bench's gpu-<card>-<date>.md/.json beside it (copy those two into bench/results/). Exit status: 0 when
# every step passed, else 1. See README "Running the GPU check".
# For a second, shorter run: GPU_CHECK_STEPS="bench" (or "tests", "microbench"), GPU_CHECK_PYTEST_ARGS="-k fsdp",
# GPU_CHECK_BENCH_ARGS="--prompts 256"; facts, install, imports and attention always run (seconds).
#
#   here:   bash scripts/gpu_wheels.sh
#   device: run(command="bash scripts/gpu_check.sh", carry=[".cache/gpu-wheels"], timeout_s=480)
set -uo pipefail  # no -e: a failing step is reported and the next one still runs
cd "$(dirname "$0")/.."

# Seconds since boot: a lent machine's wall clock may jump when it syncs after boot (the first H200 run's
# facts step got a 5 s limit from a budget of 360 s), the uptime does not.
now() { cut -d. -f1 /proc/uptime 2>/dev/null || date +%s; }
START=$(now)
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
END=$((START + BUDGET_S))
OUT=${OUT:-.gpu-out}
WHEELS=${GPU_WHEELS:-.cache/gpu-wheels}
PYTHON=${PYTHON:-python3}
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:-}
STEPS=" ${GPU_CHECK_STEPS:-microbench tests bench} "
TESTS_MIN_S=${GPU_CHECK_TESTS_MIN_S:-100}  # what the bench leaves the tests (run after it)
mkdir -p "$OUT"
REPORT=$OUT/report.md
SETUP_LOG=$OUT/setup.log
PYTEST_LOG=$OUT/pytest.log
BENCH_LOG=$OUT/bench.log
MICRO_JSON=$OUT/microbench.json
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/distgen-inductor}
FAILED=()

left() { echo $((END - $(now))); }
# The smaller of WANT seconds and what is left once RESERVE seconds are kept for later steps (at least 5).
budget() { local b=$(( $(left) - $2 )); (( b > $1 )) && b=$1; (( b < 5 )) && b=5; echo "$b"; }
say() { echo "$*" | tee -a "$REPORT"; }
# step NAME SECONDS LOG CMD...: run CMD under a timeout into LOG, say how it ended; returns CMD's status.
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local t0 rc
  t0=$(now)
  echo "== $name (limit ${limit}s): $*" >> "$log"
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local took=$(( $(now) - t0 )) how="ok"
  if (( rc == 124 || rc == 137 )); then how="TIMED OUT after ${limit}s"; elif (( rc != 0 )); then how="FAILED (exit $rc)"; fi
  [ "$how" = ok ] || FAILED+=("$name")
  say "- **$name**: $how in ${took}s"
  return $rc
}
finish() {
  say ""
  say "## Summary"
  say ""
  if (( ${#FAILED[@]} )); then say "Failed steps: ${FAILED[*]}."; else say "Every step passed."; fi
  say "Total: $(( $(now) - START ))s of a ${BUDGET_S}s budget. Logs: $(cd "$OUT" && ls | tr '\n' ' ')"
}
trap 'say ""; say "**Interrupted** (signal) after $(( $(now) - START ))s."; finish; exit 1' TERM INT

{
  echo "# distgen GPU check"
  echo ""
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
       "budget ${BUDGET_S}s, python: $PYTHON. Each step's findings follow its line."
  echo ""
} > "$REPORT"
: > "$SETUP_LOG"
# markdown FILE: append FILE to the report as it is (a table), with a blank line either side.
markdown() { { echo ""; cat "$1" 2>/dev/null; echo ""; } >> "$REPORT"; }
# fenced LINES...: append text to the report as a code block.
fenced() { { echo '```'; cat; echo '```'; echo ""; } >> "$REPORT"; }

# 1. facts: the machine as found. The tables go to the report; stderr to setup.log.
if command -v nvidia-smi >/dev/null; then
  step "nvidia-smi" 20 "$SETUP_LOG" nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,temperature.gpu,clocks.sm,clocks.mem \
    --format=csv 2>&1 | head -n 10 | fenced
fi
step "facts" "$(budget 60 120)" "$SETUP_LOG" sh -c '"$0" scripts/gpu_env.py facts > "$1"' "$PYTHON" "$OUT/facts.md"
markdown "$OUT/facts.md"

# 2. install: carried wheels for what this Python lacks; into its own environment (the machine is thrown
# away), else into a folder on PYTHONPATH, which the tests' torchrun children inherit.
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  mapfile -t TO_INSTALL < <("$PYTHON" scripts/gpu_env.py wheels "$WHEELS" 2>>"$SETUP_LOG")
  if (( ${#TO_INSTALL[@]} )); then
    PIP=("$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check --upgrade)
    if ! step "install ${#TO_INSTALL[@]} wheels" "$(budget 120 200)" "$SETUP_LOG" "${PIP[@]}" "${TO_INSTALL[@]}"; then
      SITE=/tmp/distgen-site
      step "install into $SITE instead" "$(budget 120 200)" "$SETUP_LOG" "${PIP[@]}" --target "$SITE" "${TO_INSTALL[@]}" \
        && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    printf '%s\n' "${TO_INSTALL[@]##*/}" | fenced
  else
    say "- **install**: nothing to install (every carried wheel is here already)"
  fi
else
  say "- **install**: no wheels in $WHEELS (run scripts/gpu_wheels.sh here and carry that folder)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 3. imports: what distgen needs, as installed now.
step "imports" "$(budget 90 200)" "$SETUP_LOG" sh -c '"$0" scripts/gpu_env.py imports > "$1"' "$PYTHON" "$OUT/imports.md"
markdown "$OUT/imports.md"

# 4. attention: what torch's varlen FlashAttention offers here and which SDPA kernel each call gets.
step "attention" "$(budget 60 330)" "$SETUP_LOG" sh -c '"$0" scripts/gpu_env.py attention > "$1"' "$PYTHON" "$OUT/attention.md"
markdown "$OUT/attention.md"

cuda_visible() { "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }

# 5. microbench: the decode step alone, at 128/256/512 rows, per configuration (the bench reads its JSON).
if [[ $STEPS != *" microbench "* ]]; then
  say "- **microbench**: not run (GPU_CHECK_STEPS=${GPU_CHECK_STEPS:-})"
elif [ -n "$BENCH_ARGS" ] || cuda_visible; then
  limit=$(budget 80 270)
  # shellcheck disable=SC2086
  step "microbench" "$limit" "$BENCH_LOG" "$PYTHON" bench/gpu.py --microbench-only --time-limit $((limit - 10)) \
    --out-json "$MICRO_JSON" $BENCH_ARGS
  grep -E "^(limits|microbench) " "$BENCH_LOG" | cut -c1-300 | fenced
else
  say "- **microbench**: not run: no CUDA device visible"
fi

# 6. bench: the figures first (the tests get what is left, at least TESTS_MIN_S when they run).
reserve=10; [[ $STEPS == *" tests "* ]] && reserve=$TESTS_MIN_S
limit=$(budget 400 $reserve)
if [[ $STEPS != *" bench "* ]]; then
  say "- **bench**: not run (GPU_CHECK_STEPS=${GPU_CHECK_STEPS:-})"
elif (( limit < 60 )); then
  say "- **bench**: not run: only ${limit}s left"; FAILED+=(bench)
elif [ -n "$BENCH_ARGS" ] || cuda_visible; then
  MICRO=(); [ -s "$MICRO_JSON" ] && MICRO=(--microbench-json "$MICRO_JSON")
  # shellcheck disable=SC2086
  step "bench (bench/gpu.py)" "$limit" "$BENCH_LOG" "$PYTHON" bench/gpu.py --time-limit $((limit - 15)) \
    --results-dir "$OUT" "${MICRO[@]}" $BENCH_ARGS
  written=$(ls -t "$OUT"/gpu-*.md 2>/dev/null | head -n 1)
  if [ -n "$written" ]; then sed 's/^# /### /; s/^## /#### /' "$written" | { echo ""; cat; } >> "$REPORT"
  else tail -n 30 "$BENCH_LOG" | fenced; fi
else
  say "- **bench**: not run: no CUDA device visible"
fi

# 7. tests marked gpu (they skip, saying why, without CUDA), from the files that have some; cheapest first.
if [[ $STEPS == *" tests "* ]]; then
  mapfile -t GPU_TESTS < <(grep -l "mark\.gpu" tests/test_*.py)
  PYTEST=("$PYTHON" -m pytest -m gpu "${GPU_TESTS[@]}" -p no:cacheprovider -v -rA)
  "$PYTHON" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=300)
  # Four at a time where pytest-xdist is there (each test is a torchrun job that leaves the GPU mostly idle;
  # torchrun --standalone picks free ports): ~105 s for the lot on the H200. GPU_CHECK_PYTEST_ARGS="-n 0" undoes it.
  "$PYTHON" -c "import xdist" 2>/dev/null && PYTEST+=(-n 4)
  # shellcheck disable=SC2206
  PYTEST+=(${GPU_CHECK_PYTEST_ARGS:-})
  : > "$PYTEST_LOG"
  step "tests (pytest -m gpu ${GPU_TESTS[*]})" "$(budget 400 10)" "$PYTEST_LOG" "${PYTEST[@]}"
  # pytest's short summary: one line per test with its outcome (skips with their reason), then the total;
  # if pytest was stopped before it, the per-test lines it printed (-v) as each test ended.
  { if grep -q "short test summary info" "$PYTEST_LOG"; then sed -n '/short test summary info/,$p' "$PYTEST_LOG"
    else grep -E "(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)" "$PYTEST_LOG"; echo "(pytest stopped before its summary)"; fi \
      | cut -c1-400
    grep -E "^E   " "$PYTEST_LOG" | head -n 40 | cut -c1-300; } | fenced
else
  say "- **tests**: not run (GPU_CHECK_STEPS=${GPU_CHECK_STEPS:-})"
fi

rm -f "$OUT/facts.md" "$OUT/imports.md" "$OUT/attention.md"  # all three are in the report
finish
(( ${#FAILED[@]} == 0 ))
