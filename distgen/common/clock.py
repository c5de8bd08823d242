"""The wall-clock time as distgen writes it in its files (stats.json, the lock file)."""
from __future__ import annotations

import time


def timestamp() -> str:
    """Now, local time with its UTC offset, to the second: `2026-12-06T14:40:00+0000`."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
