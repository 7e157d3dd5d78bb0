"""Moment transport: re-express the inner rule's state in the new basis when ``P`` moves.

The inner rule's moments live in ``P``'s coordinates (``R = P^T G``, ``r x n``). GaLore
replaces ``P`` every ``update_proj_gap`` steps and online PCA moves it every step, and
neither touches the moments, so after a move they are read in a basis they were not
accumulated in. With ``C = P_new^T P_old (P_old^T P_old)^{-1}`` (``r x r``, see
:func:`osd.functional.transport_matrix`), the optimizer-level key ``moment_transport``
offers:

- ``None`` (default): nothing, as GaLore and OSD do;
- ``"first"``: signed states (first moments, momentum buffers) ``m <- C m``; second
  moments kept as they are;
- ``"nonnegative"``: as ``"first"``, and second moments ``v <- (C * C) v``
  (:func:`osd.functional.transport_second_moment`: the diagonal of ``C E[R R^T] C^T`` when
  the coordinates are uncorrelated; never negative);
- ``"reset"``: at every refresh all of the inner rule's state is zeroed and its step count
  (the bias correction) restarts from 1. Only for projectors that refresh ``P`` from time
  to time (``svd``, ``random``): online PCA moves ``P`` every step.

GoLore's released code computes ``P_new^T P_old m`` at a refresh and then keeps the old
``m`` (the transported tensor is assigned to a local name that is never read); here it is
written back. The cost is ``O(m r^2 + r^2 n)`` per move, against ``O(m n r)`` for the step.

Under distributed training with SVD refreshes spread over ranks (:mod:`osd.spread`), weights
with transport refresh on every rank instead, since the broadcast overwrites ``P_old``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from osd import functional as F
from osd.rules import UpdateRule
from osd.state_layout import MOMENTS_ORIGIN, PROJ

__all__ = ["MOMENT_TRANSPORTS", "validate", "rule_step", "transporting"]

MOMENT_TRANSPORTS = (None, "first", "nonnegative", "reset")
# Moves by a projector that refreshes P now and then; "reset" makes no sense every step.
_PERIODIC_ONLY = ("reset",)


def validate(group: dict[str, Any], moves_every_step: bool) -> None:
    """Raise ``ValueError`` for a bad ``moment_transport`` of ``group``."""
    mode = group["moment_transport"]
    if mode not in MOMENT_TRANSPORTS:
        raise ValueError(f"moment_transport must be one of {MOMENT_TRANSPORTS}, got {mode!r}")
    if mode in _PERIODIC_ONLY and moves_every_step:
        raise ValueError(
            f"moment_transport={mode!r} resets the moments whenever P moves, and projector {group['projector']!r} "
            "moves P every step; use 'first' or 'nonnegative'"
        )


def rule_step(state: dict[str, Any]) -> int:
    """The inner rule's step count (from 1): the parameter's, or since the last reset."""
    return state["step"] + 1 - state.get(MOMENTS_ORIGIN, 0)


@contextlib.contextmanager
def transporting(state: dict[str, Any], group: dict[str, Any], rule: UpdateRule, in_place: bool = False) -> Iterator[None]:
    """Around a projector hook: if ``P`` (``state[PROJ]``) moved inside the block, bring the
    rule's state into the new basis. ``in_place``: the hook changes ``P`` in place (online PCA),
    so a copy of the old ``P`` is kept for the block; otherwise a move is a new tensor
    (SVD / random refreshes)."""
    mode = group["moment_transport"]
    P_old = state.get(PROJ)
    if mode is None or P_old is None:
        yield
        return
    if in_place:
        P_old = P_old.clone()
    yield
    P_new = state[PROJ]
    if not in_place and P_new is P_old:
        return
    if mode == "reset":
        for key in rule.basis_states + rule.nonnegative_states:
            if key in state:
                state[key].zero_()
        state[MOMENTS_ORIGIN] = state["step"]
        return
    C = F.transport_matrix(P_old, P_new)
    for key in rule.basis_states:
        if key not in state:
            continue
        moment = state[key]
        if key in rule.nonnegative_states:
            if mode == "nonnegative":
                state[key] = F.transport_second_moment(moment, C.to(moment.dtype))
        else:
            state[key] = F.transport_first_moment(moment, C.to(moment.dtype))
