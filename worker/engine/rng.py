"""Counter-based random draws: the uniform for decode step i of a job depends only on
(seed, i), so CPU and GPU backends, retries and replays all draw the same numbers."""

from __future__ import annotations

import secrets

_MASK = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def uniform(seed: int, step: int) -> float:
    """A float in [0, 1) with 53 random bits, fixed by (seed, step)."""
    return uniform_at(seed_state(seed), step)


def seed_state(seed: int) -> int:
    """The part of `uniform` that depends on the seed alone (computed once per job)."""
    return splitmix64(seed & _MASK)


def uniform_at(state: int, step: int) -> float:
    """uniform(seed, step) from seed_state(seed)."""
    return (splitmix64(state ^ (step & _MASK)) >> 11) * (1.0 / (1 << 53))


def new_seed() -> int:
    return secrets.randbits(64)
