"""KV-cache implementations behind the `KVCache` seam (base.py), and their name table (kinds.CACHES)."""
from distgen.engine.kv.kinds import CACHES, CacheKind, CacheSpec, QueueShape
# Registration order is the order users see.
from distgen.engine.kv import dynamic, slots, quantized, offloaded  # noqa: F401,E402,I001  (each registers itself)

__all__ = ["CACHES", "CacheKind", "CacheSpec", "QueueShape"]
