"""A bounded sample of a run's measurements, for percentiles over a run of any length.

A long-running primary measures every commit and every response; keeping them all
grows without bound.  A Reservoir keeps a uniform random sample of at most `size` of them
(Vitter's algorithm R, seeded: the same run keeps the same sample), so a p50 or p99 over
it estimates the run's, and memory stays fixed.  Iterating yields the sample; len() is the
number of values seen, so code counting measurements with len() counts them all.
"""
from __future__ import annotations

import random
from typing import Iterable, Iterator

DEFAULT_SIZE = 4096


class Reservoir:
    def __init__(self, size: int = DEFAULT_SIZE, seed: int = 0):
        if size < 1:
            raise ValueError("a reservoir holds at least one value")
        self.size = size
        self.seen = 0
        self._sample: list[float] = []
        self._rng = random.Random(seed)

    def append(self, value: float) -> None:
        self.seen += 1
        if len(self._sample) < self.size:
            self._sample.append(value)
        else:
            i = self._rng.randrange(self.seen)
            if i < self.size:
                self._sample[i] = value

    def extend(self, values: Iterable[float]) -> None:
        for v in values:
            self.append(v)

    def __iter__(self) -> Iterator[float]:
        return iter(list(self._sample))

    def __len__(self) -> int:
        return self.seen

    def __bool__(self) -> bool:
        return self.seen > 0
