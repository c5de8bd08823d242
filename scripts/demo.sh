#!/usr/bin/env bash
# End-to-end demo on this machine: 2 CPU ranks (or GPUs, when present), FSDP-sharded tiny Llama,
# the bundled prompts. Extra arguments are Hydra overrides, e.g. layout=replicate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
DEMO_DIR=${DEMO_DIR:-.demo}
MODEL=$DEMO_DIR/tiny-llama
OUT=$DEMO_DIR/outputs
[ -f "$MODEL/config.json" ] || "$PY" -m distgen.models.tiny "$MODEL"
"$PY" -m distgen.launch launcher=torchrun launcher.nproc_per_node=2 model="$MODEL" dataset=demo layout=fsdp \
  generation.max_new_tokens=24 output.dir="$OUT" "$@"
echo "demo outputs: $OUT/outputs.jsonl (completions), $OUT/stats.json (per-rank stats), $OUT/report.html (charts)"
