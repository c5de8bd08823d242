"""Value checks that name the key, the bad value and what is allowed."""
from __future__ import annotations

from typing import Any

from distgen.common.errors import ConfigError


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")
