"""What this machine allows: a CUDA GPU, a real tmpfs (a full disk), unreadable files."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch


class Tmpfs:
    """A real tmpfs of `size` bytes at `path` (this process must be root and allowed to mount), unmounted on
    leaving the block; `grow` makes it bigger in place. `Tmpfs.missing()` says why it cannot be, or ""."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size

    @staticmethod
    def missing() -> str:
        if os.geteuid() != 0:
            return "mounting a tmpfs (a real full disk) needs root"
        if not shutil.which("mount"):
            return "no mount command here"
        return ""

    def mount(self, *options: str) -> subprocess.CompletedProcess:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([*options, f"size={self.size}"]), "tmpfs",
                               str(self.path)], capture_output=True, text=True)

    def __enter__(self) -> "Tmpfs":
        self.path.mkdir(parents=True, exist_ok=True)
        done = self.mount()
        if done.returncode:
            import pytest
            pytest.skip(f"cannot mount a tmpfs here (a real full disk): {done.stderr.strip()}")
        return self

    def grow(self, size: int) -> None:
        self.size = size
        done = self.mount("remount")
        assert done.returncode == 0, done.stderr

    def __exit__(self, *exc) -> None:
        # A file this process still holds open there (the datasets library's) makes it busy: detach it lazily.
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(self.path)], capture_output=True)


def unreadable_runner() -> Optional[list[str]]:
    """A command prefix under which a file of mode 000 cannot be read: none needed for a user, and for root
    `setpriv` dropping the capabilities that let root read anything; None where neither is possible."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv"):
        return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    return None


def gpu_unavailable_reason() -> str | None:
    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
    return (f"needs a CUDA GPU and none is visible (torch {torch.__version__}, a {build} build); "
            "scripts/gpu_check.sh runs these on a GPU machine")
