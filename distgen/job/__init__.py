"""A job from checked config to finished outputs: prepare (before any process group), run (a rank's whole job),
worker (one rank: load, plan, engine, shards)."""
