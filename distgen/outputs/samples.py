"""A job's records: n per prompt (generation.n, or the record's own n), each (index, sample_index) once.

Every (index, sample_index) has one place in a flat array (`SampleTable.position`), so what a start found
finished, what the coverage check saw and what a rank still has to run are arrays of a byte per record, not
Python objects. A record of an earlier version of distgen, without a sample_index, is sample 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from numpy.typing import ArrayLike


def sample_of(record: dict) -> int:
    """A record's sample_index (0 for a record written before distgen had samples)."""
    sample = record.get("sample_index", 0)
    return sample if type(sample) is int else -1


def record_order(record: dict) -> tuple[int, int]:
    """Where a record goes in outputs.jsonl: dataset order, then sample_index."""
    return record["index"], sample_of(record)


@dataclass(frozen=True)
class SampleTable:
    counts: np.ndarray   # (prompts,) int64: each prompt's n
    offsets: np.ndarray  # (prompts + 1,) int64: prompt i's samples sit at offsets[i] .. offsets[i + 1] - 1

    @classmethod
    def of(cls, counts: ArrayLike) -> "SampleTable":
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        return cls(counts, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    @classmethod
    def ones(cls, prompts: int) -> "SampleTable":
        return cls.of(np.ones(prompts, dtype=np.int64))

    @property
    def prompts(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> int:
        """Records of the whole job."""
        return int(self.offsets[-1])

    @property
    def single(self) -> bool:
        """Every prompt has one record (n=1): records are named by their index alone."""
        return bool((self.counts == 1).all())

    def position(self, index: int, sample: int) -> Optional[int]:
        """The record's place in the flat array, or None when the job has no such record."""
        if not (0 <= index < self.prompts and 0 <= sample < self.counts[index]):
            return None
        return int(self.offsets[index]) + sample

    def per_prompt(self, flags: np.ndarray) -> np.ndarray:
        """(prompts,) how many of each prompt's records `flags` (a bool per record) marks."""
        if not self.prompts:
            return np.zeros(0, dtype=np.int64)
        return np.add.reduceat(flags.astype(np.int64), self.offsets[:-1])  # no prompt has 0 samples

    def names(self, positions: np.ndarray) -> list:
        """Records by their place: indices where every prompt has one, else (index, sample_index) pairs."""
        indices = np.searchsorted(self.offsets, positions, side="right") - 1
        if self.single:
            return indices.tolist()
        return [(int(i), int(p - self.offsets[i])) for i, p in zip(indices, positions)]

    def left(self, done: np.ndarray, index: int) -> list[int]:
        """The sample indices of prompt `index` that `done` does not mark."""
        start = int(self.offsets[index])
        return [s for s in range(int(self.counts[index])) if not done[start + s]]
