#!/usr/bin/env bash
# One node, NPROC ranks (default: one per GPU, or 2 on a CPU-only machine):
#   NPROC=2 launch/torchrun.sh layout=fsdp model=/path/to/model dataset=prompts.jsonl output.dir=out
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
exec torchrun --standalone --nproc-per-node="$NPROC" -m distgen.run "$@"
