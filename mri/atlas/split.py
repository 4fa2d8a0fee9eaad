"""Which examples an explainer may see and which are kept for scoring, decided by the context alone.

Every context id maps through a fixed 64-bit hash (splitmix64, salted) to `explain` or `score`. An example
is tagged by its context, so no context ever gives examples to both sides: an explanation is always scored
on text its explainer never saw, whatever feature or kind of example.
"""

from __future__ import annotations

import numpy as np

EXPLAIN, SCORE = "explain", "score"
DEFAULT_SALT = 0x5EED


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def split_of(
    context: np.ndarray | int, *, score_fraction: float = 0.5, salt: int = DEFAULT_SALT
) -> np.ndarray:
    """(len(context),) array of 'explain' / 'score' for the given context ids."""
    ids = np.atleast_1d(np.asarray(context, dtype=np.int64)).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _splitmix64(ids ^ _splitmix64(np.array([salt], dtype=np.uint64)))
    unit = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.where(unit < score_fraction, SCORE, EXPLAIN)
