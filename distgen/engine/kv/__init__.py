"""KV-cache implementations behind the `KVCache` seam (base.py)."""
