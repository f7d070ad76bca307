"""The percentile that ``monte-trio bench`` and the ``benchmarks/`` harness both report.

One definition, so that a p99 printed by the command line and one in a benchmark table mean
the same thing: the **nearest-rank** percentile on a **0-100** scale, with no interpolation.
The ``p``-th percentile of ``n`` ascending values is the value at rank
``max(1, ceil(p * n / 100))`` (ranks start at 1): the smallest observed value that at least
``p`` % of the values are less than or equal to. So it is always a value that was measured
(p0 is the minimum, p100 the maximum, and a single value is every percentile of itself),
and a tail percentile never understates the tail by averaging it with faster samples.
``p * n`` is computed before dividing by 100 so that integer percentiles are exact (``p / 100
* n`` gives rank 8 for p7 of 100 values).

``benchmarks/workloads.py`` imports it from here (the library never imports from
``benchmarks/``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

__all__ = ["percentile"]

_T = TypeVar("_T")


def percentile(sorted_values: Sequence[_T], p: float) -> _T:
    """The nearest-rank ``p``-th percentile of ``sorted_values``.

    Args:
        sorted_values: the samples, sorted in ascending order (not checked: sorting is the
            caller's, done once for several percentiles).
        p: the percentile, from 0 to 100 (50 for the median, 99 for p99).

    Returns:
        The value at rank ``max(1, ceil(p * n / 100))`` of the ``n`` values: always one of
        them, never an interpolation.

    Raises:
        ValueError: ``sorted_values`` is empty, or ``p`` is not between 0 and 100.
    """
    if not 0 <= p <= 100:  # NaN fails this too
        raise ValueError(f"a percentile is between 0 and 100, got {p!r}")
    n = len(sorted_values)
    if n == 0:
        raise ValueError("no values to take a percentile of; measure at least one")
    rank = max(1, math.ceil(p * n / 100))
    return sorted_values[rank - 1]
