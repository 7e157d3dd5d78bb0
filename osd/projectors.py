"""Projection rules: how the projection matrix ``P`` of a weight moves.

Every rule works on the gradient in canonical orientation (``G``: ``m x n``, ``P``:
``m x r``, see ``osd.functional``) and keeps all of its state as tensors and plain Python
values inside the optimizer's per-parameter state, under the keys of
:mod:`osd.state_layout` (``P``, ``P``'s optimizer's state, the seed ...), so
``state_dict()`` loads with ``torch.load(weights_only=True)`` and a resumed run continues
exactly.

A rule has two hooks around the weight update of step ``t`` (``state["step"]``, from 0):
``prepare`` runs before it (refresh ``P`` when due) and ``advance`` after it (move ``P``
with the same gradient, so the weight update uses ``P_t`` and ``P_{t+1}`` comes from
``G_t``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from osd import functional as F
from osd.rules import PROJ_RULES
from osd.state_layout import BASIS_STEP, PROJ, PROJ_PREFIX, RANK, SEED, SKETCH, TRANSPOSED

__all__ = ["Projector", "SVDProjector", "RandomProjector", "OnlinePCAProjector", "SketchedPCAProjector", "PROJECTORS", "get_projector", "proj_lr", "refresh_due"]

PROJ_LR_RULES = ("alpha", "released")


def proj_lr(group: dict[str, Any]) -> float:
    """Learning rate of ``P``'s optimizer at the current step.

    - ``proj_lr_rule="alpha"`` (the paper, default): ``lr_P = alpha * lr_W(t)``.
    - ``proj_lr_rule="released"`` (the released code): ``lr_P = lr_W(t) / (max_lr * update_proj_gap)``,
      where ``max_lr`` is the group's ``max_lr`` if set, else ``initial_lr`` (which torch LR
      schedulers record), else the current ``lr``.
    """
    lr = group["lr"]
    if group["proj_lr_rule"] == "alpha":
        return group["alpha"] * lr
    max_lr = group.get("max_lr") or group.get("initial_lr") or lr
    return lr / (max_lr * group["update_proj_gap"])


def refresh_due(state: dict[str, Any], group: dict[str, Any]) -> bool:
    """Whether ``P`` is to be recomputed (SVD / random) before the update of step ``state["step"]``:
    every ``update_proj_gap`` steps, unless ``state["basis_step"]`` says it already was for this
    step (by :func:`osd.spread.spread_refreshes`, which computes it on one rank and broadcasts it)."""
    return state["step"] % group["update_proj_gap"] == 0 and state.get(BASIS_STEP) != state["step"]


SVD_METHODS = ("svd", "eigh", "randomized")


def _svd_or_fallback(G: Tensor, rank: int, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
    """The top-``rank`` singular basis of ``G`` (canonical orientation), by ``group["svd_method"]``:

    - ``"svd"`` (GaLore's default): a full SVD of the weight's own gradient (``G^T`` when
      transposed), so the singular vectors, signs included, are the ones ``galore_torch`` gets;
    - ``"eigh"``: the same subspace from ``eigh(G G^T)`` (:func:`osd.functional.eigh_basis`);
    - ``"randomized"``: randomized range finding with ``group["svd_niter"]`` power iterations
      (:func:`osd.functional.randomized_basis`), its Gaussian drawn from this parameter's seed
      and step. An approximation: a different update, named by the option.

    Should LAPACK fail to converge, the previous ``P`` is kept (or a random basis drawn if
    there is none) with a warning, instead of crashing the run.
    """
    method = group["svd_method"]
    try:
        if method == "eigh":
            return F.eigh_basis(G, rank)
        if method == "randomized":
            return F.randomized_basis(G, rank, group["svd_niter"], _generator(state, state["step"], _RANGE_FINDER))
        if state[TRANSPOSED]:
            return F.svd_basis(G.mT, rank, side="right")
        return F.svd_basis(G, rank, side="left")
    except torch.linalg.LinAlgError as error:
        warnings.warn(f"SVD of a {tuple(G.shape)} gradient failed ({error}); keeping the previous projection")
        if PROJ in state:
            return state[PROJ]
        return F.random_basis(G.shape[0], rank, _generator(state, 0), G.dtype, G.device)


_RANGE_FINDER = 1  # stream tag: the range finder's draws are independent of GoLore's bases


def _generator(state: dict[str, Any], step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for this parameter, step and stream: the same on every device, rank and resume."""
    seed = hash((state[SEED], step)) if stream == 0 else hash((state[SEED], step, stream))
    return torch.Generator().manual_seed(seed % (2**63))


class Projector:
    """The identity: no projection. Used for full-rank parameters.

    Class attributes, the facts other modules read instead of keeping lists of names:

    - ``name``: registry name (``projector=``);
    - ``method``: the prefix of the named optimizers (``osd_adamw``, ...; :mod:`osd.presets`),
      or None for no named family;
    - ``projects``: whether it projects at all;
    - ``moves_every_step``: ``advance`` moves ``P`` in place at every step but the first;
    - ``refreshes_periodically``: ``prepare`` replaces ``P`` every ``update_proj_gap`` steps
      (what :mod:`osd.spread` spreads over ranks);
    - ``defaults``: the group keys this rule owns, with their defaults; the optimizer merges
      them into its groups and refuses them in a group whose projector is another one.
    """

    name = "identity"
    method: str | None = None
    projects = False
    moves_every_step = False
    refreshes_periodically = False
    defaults: dict[str, Any] = {}

    def validate(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming a bad group hyperparameter of this rule."""

    def init_state(self, state: dict[str, Any], G: Tensor, rank: int, group: dict[str, Any]) -> None:
        """Create the rule's state for a parameter whose first canonical gradient is ``G``."""

    def prepare(self, state: dict[str, Any], G: Tensor, group: dict[str, Any]) -> None:
        """Before the weight update of step ``state["step"]``: refresh ``P`` if due."""

    def advance(self, state: dict[str, Any], G: Tensor, R: Tensor, grad_norm: Tensor, group: dict[str, Any]) -> None:
        """After the weight update: move ``P`` using ``G``, ``R = P^T G`` and ``||G||_F``."""

    def needs_grad(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        """Whether step ``state["step"]`` reads ``G`` itself rather than only ``R = P^T G``."""
        return True

    def moves_in_advance(self, state: dict[str, Any]) -> bool:
        """Whether ``advance`` at step ``state["step"]`` changes ``P`` (in place)."""
        return self.moves_every_step and state["step"] > 0


class SVDProjector(Projector):
    """GaLore: ``P`` = top-``r`` singular vectors of the gradient every ``update_proj_gap`` steps."""

    name = "svd"
    method = "galore"
    projects = True
    refreshes_periodically = True

    def prepare(self, state: dict[str, Any], G: Tensor, group: dict[str, Any]) -> None:
        if refresh_due(state, group):
            state[PROJ] = _svd_or_fallback(G, state[RANK], state, group)

    def needs_grad(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        return state["step"] % group["update_proj_gap"] == 0


class RandomProjector(Projector):
    """GoLore: ``P`` drawn uniformly from the orthonormal ``m x r`` matrices every
    ``update_proj_gap`` steps.

    GoLore's practical schedule runs GaLore (SVD) first and random bases only near the end:
    with ``svd_until=f`` and ``total_steps=N``, a refresh at step ``t < f * N`` takes the SVD
    and one at ``t >= f * N`` a random basis (GoLore's code: ``rand_ratio``, the same switch).
    "GoLore@20%" (random for the last 20% of training) is ``svd_until=0.8``; the default 0
    is random from the start.
    """

    name = "random"
    method = "golore"
    projects = True
    refreshes_periodically = True
    defaults: dict[str, Any] = {"svd_until": 0.0, "total_steps": None}

    def validate(self, group: dict[str, Any]) -> None:
        fraction, total = group["svd_until"], group["total_steps"]
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"svd_until (the fraction of total_steps that uses SVD before random bases) must be in [0, 1], got {fraction!r}")
        if fraction > 0 and (not isinstance(total, int) or isinstance(total, bool) or total <= 0):
            raise ValueError(f"svd_until > 0 needs total_steps, a positive int; got {total!r}")

    def prepare(self, state: dict[str, Any], G: Tensor, group: dict[str, Any]) -> None:
        step = state["step"]
        if not refresh_due(state, group):
            return
        if group["svd_until"] > 0 and step < group["svd_until"] * group["total_steps"]:
            state[PROJ] = _svd_or_fallback(G, state[RANK], state, group)
        else:
            state[PROJ] = F.random_basis(G.shape[0], state[RANK], _generator(state, step), G.dtype, G.device)

    def needs_grad(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        # A refresh step: P changes before the weight update, so micro-batch gradients
        # cannot be projected with the old one (the draw needs no G, the SVD does).
        return state["step"] % group["update_proj_gap"] == 0


class OnlinePCAProjector(Projector):
    """Online Subspace Descent: ``P`` from a top-``r`` basis of the first gradient, then one
    step of its own optimizer (``proj_optimizer``) every step on the online-PCA loss
    ``||P P^T Gn - Gn||^2 + ortho_reg ||P^T P - I||^2`` with learning rate :func:`proj_lr`.

    The initial basis is by randomized range finding with one power iteration by default
    (``svd_method="randomized"``, ``svd_niter=1``: on real 1B gradients 9.3x cheaper than the
    SVD and 98.9% or more of the best rank-r energy on every weight, the same validation loss
    within the seeds' spread on ``osd bench quality``; docs/performance.md);
    ``svd_method="svd"`` takes GaLore's SVD, as the released code does (``compat="osd_release"``).

    Keys: ``alpha`` (``lr_P = alpha * lr_W(t)``; paper: 5), ``ortho_reg`` (``lambda``;
    paper: 0.1), ``proj_optimizer`` (``"adam"``, ``"adamw"``, ``"lion"``, ``"sgd"``,
    ``"adafactor"``: :data:`osd.rules.PROJ_RULES`) with ``proj_optimizer_args`` overriding its
    hyperparameters (e.g. ``{"weight_decay": wd}`` for the paper's ``lambda^P = lambda^W``;
    default 0 with ``"adam"``: the paper's LLaMA runs use ``lambda^W = 0``, and decay pulls
    ``P`` towards 0 against its orthonormality), ``proj_lr_rule`` (``"alpha"``, the paper, or
    ``"released"``) and ``max_lr`` (the peak lr of ``"released"``; default the scheduler's
    ``initial_lr``).
    """

    name = "online_pca"
    method = "osd"
    projects = True
    moves_every_step = True
    defaults: dict[str, Any] = {
        "alpha": 5.0,
        "ortho_reg": 0.1,
        "proj_optimizer": "adam",
        "proj_optimizer_args": {},
        "proj_lr_rule": "alpha",
        "max_lr": None,
        "svd_method": "randomized",  # the initial basis only (P never refreshes)
        "svd_niter": 1,
    }

    @staticmethod
    def _proj_rule(group: dict[str, Any]):
        rule, overrides = PROJ_RULES[group["proj_optimizer"]]
        return rule, rule.hparams({**overrides, **group["proj_optimizer_args"]})

    def validate(self, group: dict[str, Any]) -> None:
        alpha, ortho_reg = group["alpha"], group["ortho_reg"]
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0.0:
            raise ValueError(f"alpha (P's learning rate as a multiple of lr) must be > 0, got {alpha!r}")
        if not isinstance(ortho_reg, (int, float)) or isinstance(ortho_reg, bool) or not ortho_reg >= 0.0:
            raise ValueError(f"ortho_reg (lambda) must be >= 0, got {ortho_reg!r}")
        if group["proj_lr_rule"] not in PROJ_LR_RULES:
            raise ValueError(f"proj_lr_rule must be one of {PROJ_LR_RULES}, got {group['proj_lr_rule']!r}")
        if group["proj_optimizer"] not in PROJ_RULES:
            raise ValueError(f"unknown proj_optimizer {group['proj_optimizer']!r}; known: {sorted(PROJ_RULES)}")
        args = group["proj_optimizer_args"]
        if not isinstance(args, dict):
            raise ValueError(f"proj_optimizer_args must be a dict, got {args!r}")
        rule, _ = PROJ_RULES[group["proj_optimizer"]]
        unknown = set(args) - set(rule.defaults)
        if unknown:
            raise ValueError(f"proj_optimizer_args has keys {sorted(unknown)} that {rule.name} does not take; it takes {sorted(rule.defaults)}")
        rule.validate(self._proj_rule(group)[1])

    def init_state(self, state: dict[str, Any], G: Tensor, rank: int, group: dict[str, Any]) -> None:
        state[PROJ] = _svd_or_fallback(G, rank, state, group)
        rule, hparams = self._proj_rule(group)
        state.update(rule.init_state(state[PROJ], hparams, PROJ_PREFIX))

    def advance(self, state: dict[str, Any], G: Tensor, R: Tensor, grad_norm: Tensor, group: dict[str, Any]) -> None:
        """Move ``P`` by one step of its optimizer, except on the step whose gradient initialised it.

        At that step ``P`` is the top-``r`` basis of ``G`` itself, so the online-PCA gradient is
        round-off (~1e-7 against ~1e-2 a step later); a normalising optimizer such as Adam would
        turn it into a full-size move in a random direction (the released code, likewise, has no
        ``P`` gradient at ``t = 0``). ``P``'s optimizer therefore counts its own steps: its
        ``k``-th step (bias correction included) happens at the parameter's step ``k``.
        """
        if state["step"] == 0:
            return
        # A zero gradient leaves only the orthonormality term: clamp instead of branching on
        # the norm, which would synchronise with the device.
        self._step_P(state, F.online_pca_grad(state[PROJ], G, group["ortho_reg"], R=R, grad_norm=grad_norm.clamp_min(1e-30)), group)

    def _step_P(self, state: dict[str, Any], loss_grad: Tensor, group: dict[str, Any]) -> None:
        """One step of ``P``'s optimizer on the online-PCA gradient ``loss_grad``."""
        P = state[PROJ]
        rule, hparams = self._proj_rule(group)
        lr = proj_lr(group)
        if rule.torch_step is not None and rule.torch_step_allows(hparams):
            rule.torch_step([P], [loss_grad], [state], hparams, lr, [state["step"]], PROJ_PREFIX)  # one fused pass
            return
        direction = rule.direction(loss_grad, state, hparams, state["step"], PROJ_PREFIX)
        if hparams["weight_decay"]:
            P.mul_(1.0 - lr * hparams["weight_decay"])
        P.add_(direction, alpha=-lr)


class SketchedPCAProjector(OnlinePCAProjector):
    """Online PCA of a sketch of the gradient's moving average, not of the gradient itself.

    Online PCA (and GaLore's SVD) follows the top eigenvectors of the gradient's second
    moment ``E[G G^T] = E[G] E[G]^T + Cov(G)``: with small batches the covariance dominates
    and ``P`` tracks the noise (the GoLore counterexample, ``osd bench counterexample``). The
    mean's part ``M M^T`` (``M = E[G]``) is what descent needs, and a moving average of ``G``
    estimates ``M`` with the noise averaged out. Storing ``M`` (``m x n``) would cost what
    the low-rank state saves, so this rule keeps a sketch of it:

        S <- beta S + (1 - beta) G Omega          (m x k, Omega: n x k, N(0, 1/k) entries)

    and moves ``P`` by one step of its optimizer on the online-PCA loss of ``S``,
    ``||P P^T Sn - Sn||^2 + ortho_reg ||P^T P - I||^2`` (``Sn = S / ||S||``). Since
    ``E[Omega Omega^T] = I``, ``S S^T = M Omega Omega^T M^T`` estimates ``M M^T`` (randomised
    range finding, Halko et al. 2011), and ``range(S) = range(M Omega)`` holds ``M``'s top
    column space once ``k`` exceeds ``r`` by a few (``sketch_size``, default ``2 r``).
    ``Omega`` is the same at every step: it is redrawn from the parameter's seed each step
    rather than stored. Per step: ``G Omega`` (``m n k``, i.e. ``O(m n r)``), the ``n x k``
    draw, and the online-PCA gradient on ``S`` (``O(m k r)``); state: ``S`` (``m x k``),
    ``P`` and ``P``'s optimizer. ``P`` starts from the SVD of the first gradient, as OSD's.
    """

    name = "sketch_pca"
    method = "osd_sketch"
    defaults: dict[str, Any] = {**OnlinePCAProjector.defaults, "sketch_beta": 0.99, "sketch_size": None}

    def validate(self, group: dict[str, Any]) -> None:
        super().validate(group)
        beta, size = group["sketch_beta"], group["sketch_size"]
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta < 1.0:
            raise ValueError(f"sketch_beta (the moving average's decay) must be in [0, 1), got {beta!r}")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"sketch_size must be None (2 * rank) or a positive int, got {size!r}")

    def init_state(self, state: dict[str, Any], G: Tensor, rank: int, group: dict[str, Any]) -> None:
        super().init_state(state, G, rank, group)
        size = group["sketch_size"] or 2 * rank
        state[SKETCH] = G.new_zeros(G.shape[0], min(size, G.shape[1]))

    def advance(self, state: dict[str, Any], G: Tensor, R: Tensor, grad_norm: Tensor, group: dict[str, Any]) -> None:
        """Fold ``G Omega`` into the sketch; from the second step on, move ``P`` towards its span."""
        S = state[SKETCH]
        omega = torch.randn(G.shape[1], S.shape[1], generator=_generator(state, -1), dtype=torch.float32)
        omega = omega.to(device=G.device, dtype=G.dtype).div_(S.shape[1] ** 0.5)
        S.lerp_(G @ omega, 1.0 - group["sketch_beta"])
        if state["step"] == 0:
            return
        self._step_P(state, F.online_pca_grad(state[PROJ], S, group["ortho_reg"], grad_norm=S.norm().clamp_min(1e-30)), group)


PROJECTORS: dict[str, Projector] = {
    p.name: p for p in (Projector(), OnlinePCAProjector(), SVDProjector(), RandomProjector(), SketchedPCAProjector())
}


def get_projector(name: str) -> Projector:
    """The projection rule registered as ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return PROJECTORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown projector {name!r}; known projectors: {sorted(PROJECTORS)}") from None
