"""Outputs: records, per-rank shards and their manifest, resume, per-rank stats, progress, the report and the
coordinator's checks and summary."""
