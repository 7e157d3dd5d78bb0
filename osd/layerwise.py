"""Layer-wise updates: step each weight inside backward, as soon as its gradient is complete.

GaLore's memory trick (Zhao et al., 2024, sec. 4.3): a weight's full gradient ``G`` is
needed only until that weight has stepped, so stepping it in its
``register_post_accumulate_grad_hook`` and freeing ``G`` at once keeps at most one weight's
full gradient alive instead of all of them.

Unlike ``galore_torch``'s version (one optimizer per parameter, stepping on every
micro-batch), this one keeps the ordinary semantics of a step with gradient accumulation:
over ``accumulation`` micro-batches a weight steps ONCE, with the gradient of the whole
step ``G = sum_k g_k``, and an LR scheduler stepped once per optimizer step sees the same
learning rate as in an ordinary run. Between micro-batches each weight keeps:

- ``R = sum_k P^T g_k`` (``r x n``, smaller than ``G``) when its ``P`` is fixed through the
  step and the projection rule reads nothing but ``R`` (GaLore / GoLore between refreshes;
  :meth:`~osd.optimizer.SubspaceOptimizer.needs_full_grad`), its full gradient freed;
- otherwise ``G`` itself, summed in ``p.grad`` as autograd does (full-rank weights; online
  PCA, whose ``P`` moves with ``G G^T P``; the first step and refresh steps of GaLore /
  GoLore).

So with ``accumulation = 1`` no weight holds a full gradient once it has stepped, and with
accumulation only the first kind saves memory between micro-batches.

The object counts its micro-batches itself: a weight steps in the backward that brings
its ``accumulation``-th gradient of the step. The training loop stays the ordinary one
(``backward`` per micro-batch, then ``optimizer.step()``, ``optimizer.zero_grad()``):
``step()`` finds no gradient left and updates nothing, so LR schedulers and step hooks see
an ordinary step, and a step pre-hook first checks that every weight that received a
gradient has stepped.

Gradient clipping: the global norm is unknown while weights step one by one, so clipping is
per parameter (the optimizer's ``max_grad_norm``), the same in a layer-wise and an ordinary
run. Non-finite gradients follow the optimizer's ``nonfinite`` policy per parameter:
``"skip"`` skips that weight's update; ``"raise"`` raises with earlier weights already stepped.

Usage::

    LayerwiseUpdates(optimizer, accumulation=len(micro_batches))   # registers the hooks, once
    for batch in micro_batches:
        loss(batch).backward()                     # weights step during the last backward
    optimizer.step()                               # checks that every weight stepped
    scheduler.step()
    optimizer.zero_grad()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from osd.optimizer import SubspaceOptimizer

__all__ = ["LayerwiseUpdates"]


class LayerwiseUpdates:
    """Steps every parameter of ``optimizer`` from its post-accumulate-grad hook, once per
    ``accumulation`` gradients it receives (the micro-batches of one optimizer step).

    Attributes:
        skipped: parameter updates skipped for non-finite gradients (``nonfinite="skip"``).
    """

    def __init__(self, optimizer: SubspaceOptimizer, accumulation: int = 1) -> None:
        if not isinstance(optimizer, SubspaceOptimizer):
            raise TypeError(f"layer-wise updates need a SubspaceOptimizer, got {type(optimizer).__name__}")
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1 (micro-batches per optimizer step), got {accumulation}")
        self.optimizer, self.accumulation = optimizer, accumulation
        self.skipped = 0
        self._projected: dict[int, Tensor] = {}
        self._received: dict[int, int] = {}  # gradients received in this step, by parameter, until it steps
        self._handles = [
            p.register_post_accumulate_grad_hook(self._on_grad)
            for group in optimizer.param_groups
            for p in group["params"]
            if p.requires_grad
        ]
        self._handles.append(optimizer.register_step_pre_hook(self._check_step))

    @torch.no_grad()
    def _on_grad(self, p: Tensor) -> None:
        key = id(p)
        self._received[key] = self._received.get(key, 0) + 1
        if self._received[key] < self.accumulation:
            # Fold this micro-batch into R and free G, unless the step needs G itself.
            if not self.optimizer.needs_full_grad(p):
                R = self.optimizer.project(p, p.grad)
                self._projected[key] = R if key not in self._projected else self._projected[key].add_(R)
                p.grad = None
            return
        del self._received[key]
        projected = self._projected.pop(key, None)
        if projected is not None:
            if p.grad is not None:
                projected.add_(self.optimizer.project(p, p.grad))
            stepped = self.optimizer.step_param(p, projected=projected)
        else:
            stepped = self.optimizer.step_param(p)
        self.skipped += not stepped
        p.grad = None

    def _check_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Before ``optimizer.step()``: every parameter that received a gradient in the step
        must have stepped (``RuntimeError`` otherwise: fewer backward passes than ``accumulation``)."""
        if self._received or self._projected:
            waiting = len(self._received)
            self._received.clear()
            self._projected.clear()
            raise RuntimeError(
                f"{waiting} parameter(s) received gradients but did not step: they step on their {self.accumulation}-th "
                f"backward of the step (accumulation={self.accumulation}); run one backward per micro-batch before optimizer.step()"
            )

    def remove(self) -> None:
        """Unregister the hooks (the optimizer can then be stepped as usual)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
