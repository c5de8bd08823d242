"""Optional kernel backends behind the engine's seams; each registers itself when the catalog imports it."""
