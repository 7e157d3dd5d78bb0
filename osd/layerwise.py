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

Gradient clipping: the global norm is unknown while weights step one by one, so clipping is
per parameter (the optimizer's ``max_grad_norm``), the same in a layer-wise and an ordinary
run. Non-finite gradients follow the optimizer's ``nonfinite`` policy per parameter:
``"skip"`` skips that weight's update; ``"raise"`` raises with earlier weights already stepped.

Usage::

    updates = LayerwiseUpdates(optimizer)          # registers the hooks
    for k, batch in enumerate(micro_batches):
        updates.last_micro_batch = k == len(micro_batches) - 1
        loss(batch).backward()                     # weights step during the last backward
    updates.finish_step()                          # checks that every weight stepped
    scheduler.step()                               # no optimizer.step(), no zero_grad()
"""

from __future__ import annotations

import torch
from torch import Tensor

from osd.optimizer import SubspaceOptimizer

__all__ = ["LayerwiseUpdates"]


class LayerwiseUpdates:
    """Steps every parameter of ``optimizer`` from its post-accumulate-grad hook.

    Attributes:
        last_micro_batch: set before each backward; True for the backward that completes
            the optimizer step (default True: no accumulation).
        skipped: parameter updates skipped for non-finite gradients (``nonfinite="skip"``).
    """

    def __init__(self, optimizer: SubspaceOptimizer) -> None:
        if not isinstance(optimizer, SubspaceOptimizer):
            raise TypeError(f"layer-wise updates need a SubspaceOptimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.last_micro_batch = True
        self.skipped = 0
        self._projected: dict[int, Tensor] = {}
        self._stepped: set[int] = set()
        self._received: set[int] = set()
        self._handles = [
            p.register_post_accumulate_grad_hook(self._on_grad)
            for group in optimizer.param_groups
            for p in group["params"]
            if p.requires_grad
        ]

    @torch.no_grad()
    def _on_grad(self, p: Tensor) -> None:
        key = id(p)
        self._received.add(key)
        if not self.last_micro_batch:
            # Fold this micro-batch into R and free G, unless the step needs G itself.
            if not self.optimizer.needs_full_grad(p):
                R = self.optimizer.project(p, p.grad)
                self._projected[key] = R if key not in self._projected else self._projected[key].add_(R)
                p.grad = None
            return
        projected = self._projected.pop(key, None)
        if projected is not None:
            if p.grad is not None:
                projected.add_(self.optimizer.project(p, p.grad))
            stepped = self.optimizer.step_param(p, projected=projected)
        else:
            stepped = self.optimizer.step_param(p)
        self.skipped += not stepped
        self._stepped.add(key)
        p.grad = None

    def finish_step(self) -> None:
        """End an optimizer step: every parameter that received a gradient in the step must
        have stepped in the last backward (``RuntimeError`` otherwise, e.g. when
        ``last_micro_batch`` was never set True). Then calls ``optimizer.step()``, which
        finds no gradient left and updates nothing, so that LR schedulers and optimizer
        step hooks see an ordinary step."""
        missing = self._received - self._stepped
        self._received.clear()
        self._stepped.clear()
        if missing or self._projected:
            self._projected.clear()
            raise RuntimeError(
                f"{len(missing)} parameter(s) received gradients but did not step: set last_micro_batch = True "
                "before the backward of the last micro-batch of each optimizer step"
            )
        self.optimizer.step()

    def remove(self) -> None:
        """Unregister the hooks (the optimizer can then be stepped as usual)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
