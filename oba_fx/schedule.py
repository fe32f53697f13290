"""Iterative pruning schedules (``docs/design.md`` "Schedule").

The paper prunes in ``N`` steps with an exponential schedule of the removed-channel fraction,
``p_t = 1 - (1 - p)^(t/N)``, rescoring after each step, where the channel ceiling for a
retained-FLOPs target ``r`` is ``p = 1 - 0.9 r``; it stops as soon as the target is met.

Example:
    >>> [round(x, 4) for x in exponential_schedule(0.75, 2)]
    [0.5, 0.75]
    >>> channel_ceiling(0.5)
    0.55
"""

from __future__ import annotations

from oba_fx.errors import BadInputError


def channel_ceiling(retained: float) -> float:
    """The removed-channel fraction the schedule aims at for a retained fraction ``retained``."""
    if not 0.0 < retained <= 1.0:
        raise BadInputError(f"retained fraction must be in (0, 1], got {retained}")
    return round(1.0 - 0.9 * retained, 12)


def exponential_schedule(p: float, steps: int) -> list[float]:
    """Cumulative removed fractions ``p_1 .. p_N`` (``p_N == p``)."""
    if steps < 1 or int(steps) != steps:
        raise BadInputError(f"steps must be a positive integer, got {steps}")
    if not 0.0 <= p < 1.0:
        raise BadInputError(f"the removed fraction must be in [0, 1), got {p}")
    return [1.0 - (1.0 - p) ** (t / steps) for t in range(1, steps + 1)]


def units_this_step(p_t: float, n_original: int, n_removed: int) -> int:
    """How many units step ``t`` removes so that ``p_t`` of the original units are gone.

    Example:
        >>> units_this_step(0.5, 100, 30)
        20
    """
    return max(0, int(round(p_t * n_original)) - n_removed)
