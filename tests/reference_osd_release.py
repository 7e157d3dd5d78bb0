"""The released Online Subspace Descent optimizer's behaviour, re-implemented for the tests.

Written from a reading of the released code's behaviour (not copied): for one weight ``W``
(``m x n``) in a group with ``rank`` and the "continuous" (online PCA) projection:

- The projection side: with ``m >= n`` the basis acts on the columns (``B``: ``r x n``, the
  first rows of ``V^T``; low-rank gradient ``G B^T``); otherwise on the rows (``A``: ``m x r``,
  the first columns of ``U``; low-rank gradient ``A^T G``). The SVD is of the first gradient,
  in float32.
- At the first step the basis is created and not moved. At every later step, before the
  weight update, the gradient of ``||Gn B^T B - Gn||^2`` (``||A A^T Gn - Gn||^2``) with
  ``Gn = G / ||G||`` is taken by autograd; after the weight update the basis takes one step of
  ``torch.optim.AdamW`` (its defaults: eps 1e-8, weight decay 0.01) with learning rate
  ``lr_W(t) / (lr_W at construction * update_proj_gap)``.
- AdamW on the low-rank gradient, Hugging Face style: eps added to the raw ``sqrt(v)``, the
  bias correction folded into the step size, the update projected back and multiplied by
  ``scale``, then the weight decay ``W <- W - lr wd W`` after the update.
- Lion: ``c = b1 m + (1 - b1) R``; the update is ``sign(scale * P c)`` projected back,
  ``W <- W - lr sign(...)``, ``m <- b2 m + (1 - b2) R``, then the decay.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class ReleasedOSD:
    """One weight's released-OSD optimizer; ``step(W, G, lr)`` updates ``W`` in place."""

    def __init__(self, rule: str, rank: int, gap: int, scale: float, max_lr: float, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        self.rule, self.rank, self.gap, self.scale, self.max_lr = rule, rank, gap, scale, max_lr
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.basis: Tensor | None = None
        self.basis_optimizer: torch.optim.AdamW | None = None
        self.columns = False
        self.t = 0
        self.m: Tensor | None = None
        self.v: Tensor | None = None

    def _project(self, G: Tensor) -> Tensor:
        return G @ self.basis.T if self.columns else self.basis.T @ G

    def _back(self, D: Tensor) -> Tensor:
        return (D @ self.basis if self.columns else self.basis @ D) * self.scale

    def _basis_loss_grad(self, G: Tensor) -> None:
        B = self.basis
        with torch.enable_grad():
            B.requires_grad_(True)
            B.grad = None
            Gn = G / torch.norm(G)
            residual = Gn @ (B.T @ B) - Gn if self.columns else (B @ B.T) @ Gn - Gn
            (torch.norm(residual) ** 2).backward()
            B.requires_grad_(False)

    def step(self, W: Tensor, G: Tensor, lr: float) -> None:
        if self.basis is None:
            self.columns = G.shape[0] >= G.shape[1]
            U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
            basis = Vh[: self.rank] if self.columns else U[:, : self.rank]
            self.basis = basis.to(G.dtype).clone()
            self.basis_optimizer = torch.optim.AdamW([self.basis], lr=1.0 / self.gap)
        else:
            self._basis_loss_grad(G)
            for group in self.basis_optimizer.param_groups:
                group["lr"] = lr / (self.max_lr * self.gap)
        R = self._project(G)
        if self.m is None:
            self.m, self.v = torch.zeros_like(R), torch.zeros_like(R)
        b1, b2 = self.betas
        self.t += 1
        if self.rule == "adamw":
            self.m.mul_(b1).add_(R, alpha=1 - b1)
            self.v.mul_(b2).addcmul_(R, R, value=1 - b2)
            step_size = lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
            update = self._back(self.m / (self.v.sqrt() + self.eps))
            self.basis_optimizer.step()
            W.add_(update, alpha=-step_size)
        else:
            c = self.m * b1 + R * (1 - b1)
            update = self._back(c)
            self.basis_optimizer.step()
            W.add_(update.sign(), alpha=-lr)
            self.m.mul_(b2).add_(R, alpha=1 - b2)
        if self.weight_decay > 0:
            W.add_(W, alpha=-lr * self.weight_decay)
