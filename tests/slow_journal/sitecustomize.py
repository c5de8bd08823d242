"""Test-only pacing for the fault tests: on PYTHONPATH, in worker processes (RANK or SLURM_PROCID is
set) and only when DISTGEN_TEST_APPEND_DELAY_S is set, every journal append sleeps that long, so a
test can signal, kill or preempt a job while it is surely in the middle of its prompts. Finished
records are appended to the rank's open output shard (distgen.outputs.shards.ShardWriter.append)."""
import os

# A rank: RANK (torchrun) or SLURM_PROCID (one srun task per rank, launcher.mode=srun).
if os.environ.get("DISTGEN_TEST_APPEND_DELAY_S") and ("RANK" in os.environ or "SLURM_PROCID" in os.environ):
    import time

    from distgen.outputs import shards

    _delay = float(os.environ["DISTGEN_TEST_APPEND_DELAY_S"])
    _append = shards.ShardWriter.append

    def _slow_append(self, finished):
        _append(self, finished)
        time.sleep(_delay)

    shards.ShardWriter.append = _slow_append
