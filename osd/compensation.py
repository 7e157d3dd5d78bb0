"""Off-subspace compensation: use the part of the gradient that the projection drops.

A projected step applies ``P D`` and throws ``G - P P^T G`` away. The optimizer-level key
``compensation`` offers two ways to use it, for every projector and inner rule, with no
optimizer state beyond the low-rank one (one scalar per weight for the limiter):

- ``"fira"`` (:func:`osd.functional.fira_update`): ``P D`` plus the residual ``G - P R``,
  scaled by how much the inner rule amplified ``R`` into ``D``;
- ``"apollo"`` (:func:`osd.functional.apollo_update`): the full gradient ``G`` scaled by
  that same amplification; ``P D`` serves only to measure it.

``compensation_granularity``: the amplification per column of ``G`` (``"channel"``, Fira
and APOLLO) or one number per weight (``"tensor"``, APOLLO-Mini).
``compensation_limit``: the norm-growth limiter's ``gamma`` (the compensated term may grow
by at most this factor per step; 1.01 in both papers; ``None``: no limiter).

Both read the full gradient at every step, so with layer-wise updates and gradient
accumulation the weights keep ``G`` between micro-batches
(:meth:`osd.optimizer.SubspaceOptimizer.needs_full_grad`). The group's ``scale`` multiplies
the whole update, as it does ``P D`` alone.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from osd import functional as F
from osd.state_layout import COMPENSATION_NORM  # ||S_{t-1}||, the limiter's memory (a 0-d tensor)

__all__ = ["COMPENSATIONS", "GRANULARITIES", "validate", "init_state", "update"]

COMPENSATIONS = (None, "fira", "apollo")
GRANULARITIES = ("channel", "tensor")


def validate(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` for bad compensation keys of ``group``."""
    if group["compensation"] not in COMPENSATIONS:
        raise ValueError(f"compensation must be one of {COMPENSATIONS}, got {group['compensation']!r}")
    if group["compensation_granularity"] not in GRANULARITIES:
        raise ValueError(f"compensation_granularity must be one of {GRANULARITIES}, got {group['compensation_granularity']!r}")
    limit = group["compensation_limit"]
    if limit is not None and (not isinstance(limit, (int, float)) or isinstance(limit, bool) or not limit >= 1.0):
        raise ValueError(f"compensation_limit (the norm-growth limiter's factor) must be None or a number >= 1, got {limit!r}")


def init_state(state: dict[str, Any], group: dict[str, Any], G: Tensor) -> None:
    """The limiter's memory, for a projected weight with compensation on."""
    if group["compensation"] is not None:
        state[COMPENSATION_NORM] = G.new_zeros((), dtype=G.dtype)


def update(state: dict[str, Any], group: dict[str, Any], P: Tensor, direction: Tensor, G: Tensor | None, R: Tensor) -> Tensor:
    """The full-size update of a projected weight: ``P D``, or Fira's / APOLLO's.

    ``G``: the canonical gradient as the inner rule saw it (clipped like ``R = P^T G``).
    """
    mode = group["compensation"]
    if mode is None:
        return P @ direction
    if G is None:
        raise RuntimeError("compensation needs the full gradient, not a projected one")
    granularity, limit = group["compensation_granularity"], group["compensation_limit"]
    if mode == "fira":
        return F.fira_update(P, direction, G, R, state[COMPENSATION_NORM], granularity, limit)
    return F.apollo_update(direction, G, R, state[COMPENSATION_NORM], granularity, limit)
