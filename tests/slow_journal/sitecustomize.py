"""Test-only pacing for the fault tests: on PYTHONPATH, in worker processes (RANK is set) and only
when DISTGEN_TEST_APPEND_DELAY_S is set, every journal append sleeps that long, so a test can
signal or kill a job while it is surely in the middle of its prompts. Finished records are appended
to the rank's open output shard (distgen.shards.ShardWriter.append)."""
import os

if os.environ.get("DISTGEN_TEST_APPEND_DELAY_S") and "RANK" in os.environ:
    import time

    from distgen import shards

    _delay = float(os.environ["DISTGEN_TEST_APPEND_DELAY_S"])
    _append = shards.ShardWriter.append

    def _slow_append(self, finished):
        _append(self, finished)
        time.sleep(_delay)

    shards.ShardWriter.append = _slow_append
