"""The seeded permutation behind every data order: a bijection of [0, n) computed index by index in O(1) memory,
so a billion-row epoch is shuffled without an O(rows) array on any rank, and the same seed gives the same order on
any machine and worker count.
"""

from __future__ import annotations

import math

import numpy as np


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finaliser of x + key: a well-mixed 64-bit hash, vectorised (uint64 arithmetic wraps)."""
    z = (x + key) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Permutation:
    """A seeded bijection of [0, n) in O(1) memory: a balanced Feistel network on the smallest even-bit power of two
    >= n, with cycle-walking (re-apply until the value falls below n; at most ~4 rounds expected, as the domain is
    < 4n). Any index maps in O(1), so no rank ever holds an O(rows) array."""

    ROUNDS = 6

    def __init__(self, n: int, key: list[int]):
        self.n = n
        self.half = max(1, math.ceil(math.log2(max(n, 2)) / 2))
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.SeedSequence(key).generate_state(self.ROUNDS, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right, key) & self.mask)
        return (left << half) | right

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        out = self._feistel(np.asarray(indices, dtype=np.uint64))
        outside = out >= self.n
        while outside.any():  # cycle-walking: a bijection on the power-of-two domain restricted to [0, n)
            out[outside] = self._feistel(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)
