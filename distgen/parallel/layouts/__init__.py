"""Sharding layouts: how the model is loaded and placed over the ranks. One module per layout,
each registering itself (and its settings class, the Hydra option `layout=<name>`) in LAYOUTS."""
from distgen.parallel.layouts.base import LAYOUTS, DataGroups, Layout, Placed, block_classes, get_layout
# Registration order is the order users see (the default first).
from distgen.parallel.layouts import replicate, fsdp, zero3, device_map  # noqa: F401,E402,I001  (each registers itself)

__all__ = ["LAYOUTS", "DataGroups", "Layout", "Placed", "block_classes", "get_layout"]
