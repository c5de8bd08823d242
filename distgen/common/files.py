"""Files written whole or not at all: readers see the old file or the whole new one, never part of a write."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once: os.umask sets the process's mask to read it, which a thread writing at the same time would see.
UMASK = current_umask()


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file's path beside `path` (with the permissions of a new file: mkstemp's 0600 would hide
    outputs from their readers), for the block to write (a compiler's `-o` included); renamed over `path` when the
    block ends; on an exception the temporary file is removed and `path` is as it was. distgen's one atomic writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", fsync: bool = True) -> Iterator[IO]:
    """An open file that becomes `path` when the block ends (atomic_path): flushed and, where `fsync`, synced to
    disk before the rename; on an exception `path` is as it was."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as out:
            yield out
            out.flush()
            if fsync:
                os.fsync(out.fileno())


def write_atomic(path: Path, text: str, fsync: bool = True) -> None:
    with atomic_file(path, fsync=fsync) as out:
        out.write(text)
