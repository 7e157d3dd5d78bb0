"""Adding an inner rule or a projector is one object plus its maths, registered by name.

This module defines both here, and nowhere else: ``signum`` (an ``UpdateRule``: the sign of a
momentum buffer) and ``subspace_iteration`` (a ``Projector`` subclass: ``P`` from the SVD of
the first gradient, then one damped step of subspace iteration on ``G G^T`` per step). Each
test registers them with ``monkeypatch.setitem(RULES / PROJECTORS, ...)`` only, and then uses
the library as a user would: training, key checks, ``state_dict`` round trips, 8-bit states,
layer-wise updates and the name-based factory all work with no other edit.

What a contributor adds beyond the class itself: its registry entry (``RULES[name]`` in
``osd/rules.py``, ``PROJECTORS[name]`` in ``osd/projectors.py``) and, by convention, its maths
in ``osd/functional.py``. Everything else reads the registries at call time. What does not,
by design:

- the named classes (``OSDAdamW``, ``GaLoreLion``, ...; :mod:`osd.presets`) are generated once
  at import for the built-in parts; a new part gets no class of its own, but a projector with
  a ``method`` gets ``create_optimizer(model, "<method>_<rule>")`` (tested below) and
  ``SubspaceOptimizer(rule=..., projector=...)`` takes any registered pair;
- ``PROJ_RULES`` (:mod:`osd.rules`), the choices of online PCA's ``proj_optimizer``, is a
  registry of its own: a new rule drives ``P`` only once it has an entry there too;
- ``METHOD_COMPAT`` (:mod:`osd.presets`): the reference conventions of the named classes;
  ``create_optimizer`` does not read it.
- ``osd.spread.SPREAD_PROJECTORS`` lists the built-in projectors for reference only;
  ``spread_refreshes`` asks each group's projector (``refreshes_periodically``).
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import Tensor

import osd
from osd import functional as F
from osd import presets, sharded, state_layout
from osd.hyperparams import DEFAULT_LR
from osd.layerwise import LayerwiseUpdates
from osd.projectors import PROJECTORS, Projector
from osd.rules import RULES, UpdateRule
from osd.state_layout import PROJ
from tests.helpers import gradient_stream
from tests.test_registry_facts import _updates

# --- The new inner rule: Signum (Bernstein et al., 2018) ------------------------------------


def _signum_validate(h: dict[str, Any]) -> None:
    beta, decay = h["beta"], h["weight_decay"]
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta < 1.0:
        raise ValueError(f"beta (signum's momentum) must be in [0, 1), got {beta!r}")
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not decay >= 0.0:
        raise ValueError(f"weight_decay must be a number >= 0, got {decay!r}")


def _signum_direction(grad: Tensor, state: dict[str, Tensor], h: dict[str, Any], step: int, prefix: str) -> Tensor:
    """``m <- beta m + (1 - beta) g``; ``D = sign(m)``."""
    momentum = state[prefix + "momentum_buffer"]
    momentum.lerp_(grad, 1.0 - h["beta"])
    return momentum.sign()


SIGNUM = UpdateRule(
    name="signum",
    defaults={"beta": 0.9, "weight_decay": 0.0},
    validate=_signum_validate,
    init_state=lambda like, h, prefix: {prefix + "momentum_buffer": torch.zeros_like(like, memory_format=torch.preserve_format)},
    direction=_signum_direction,
    default_lr=3e-3,
    basis_states=("momentum_buffer",),
    elementwise=True,
)


# --- The new projector: damped subspace iteration -------------------------------------------


class SubspaceIterationProjector(Projector):
    """``P`` from the SVD of the first gradient; then, at every later step,
    ``P <- orth((1 - mix) P + mix G G^T P / ||G||^2)`` (a QR, signs fixed by ``diag(R) > 0``)."""

    name = "subspace_iteration"
    method = "subit"
    projects = True
    moves_every_step = True
    defaults: dict[str, Any] = {"mix": 0.5}

    def validate(self, group: dict[str, Any]) -> None:
        mix = group["mix"]
        if not isinstance(mix, (int, float)) or isinstance(mix, bool) or not 0.0 < mix <= 1.0:
            raise ValueError(f"mix (the weight of the power-iteration step) must be in (0, 1], got {mix!r}")

    def init_state(self, state: dict[str, Any], G: Tensor, rank: int, group: dict[str, Any]) -> None:
        state[PROJ] = F.svd_basis(G, rank, side="left")

    def advance(self, state: dict[str, Any], G: Tensor, R: Tensor, grad_norm: Tensor, group: dict[str, Any]) -> None:
        if state["step"] == 0:  # P is the top basis of this very G
            return
        P, mix = state[PROJ], group["mix"]
        target = (G @ R.mT).div_(grad_norm.clamp_min(1e-30).square())  # G G^T P / ||G||^2, with R = P^T G
        Q, upper = torch.linalg.qr(torch.lerp(P, target, mix).float())
        signs = torch.where(upper.diagonal() < 0, -1.0, 1.0)
        P.copy_(Q * signs)  # in place, as moves_every_step promises


SUBSPACE_ITERATION = SubspaceIterationProjector()


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The new rule and projector, in the registries for one test only."""
    monkeypatch.setitem(RULES, SIGNUM.name, SIGNUM)
    monkeypatch.setitem(PROJECTORS, SUBSPACE_ITERATION.name, SUBSPACE_ITERATION)


pytestmark = pytest.mark.usefixtures("registered")

PAIRS = [("signum", "online_pca"), ("adamw", "subspace_iteration"), ("signum", "subspace_iteration")]


# --- A least-squares problem and a tiny model -----------------------------------------------


def _least_squares(seed: int = 0) -> tuple[Tensor, Tensor]:
    """Inputs ``X`` (64 x 16) and targets ``Y = X W*^T`` (64 x 12), ``W*`` of entries ~0.1."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 16, generator=gen)
    return X, X @ (0.1 * torch.randn(12, 16, generator=gen)).mT


def _train(opt: torch.optim.Optimizer, W: torch.nn.Parameter, steps: int, data: tuple[Tensor, Tensor]) -> list[float]:
    X, Y = data
    losses = []
    for _ in range(steps):
        loss = (X @ W.mT - Y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 12))


def _groups(model: torch.nn.Module, **rank_keys: Any) -> list[dict[str, Any]]:
    """The weight matrices at rank 4 (with ``rank_keys``), the biases full-rank."""
    matrices = [p for p in model.parameters() if p.dim() == 2]
    vectors = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": matrices, "rank": 4, **rank_keys}, {"params": vectors}]


# --- Training -------------------------------------------------------------------------------


@pytest.mark.parametrize("rule, projector", PAIRS)
def test_new_parts_train_with_the_rules_default_lr(rule: str, projector: str) -> None:
    W = torch.nn.Parameter(torch.zeros(12, 16))
    opt = osd.SubspaceOptimizer([{"params": [W], "rank": 4}], lr=None, rule=rule, projector=projector, scale=1.0)
    assert opt.defaults["lr"] == RULES[rule].default_lr
    losses = _train(opt, W, 30, _least_squares())
    assert losses[-1] < 0.7 * losses[0], losses
    assert opt.state[W][PROJ].shape == (12, 4)


def test_default_lr_and_the_factory_read_the_registries() -> None:
    """``DEFAULT_LR`` and ``METHODS`` (read by ``osd train``'s settings and the Trainer route)
    show parts registered after import; the projector's ``method`` names optimizers."""
    assert DEFAULT_LR["signum"] == SIGNUM.default_lr
    assert presets.METHODS["subit"] == "subspace_iteration"
    assert {"signum", "osd_signum", "subit_adamw", "subit_signum"} <= set(osd.optimizer_names())
    model = _tiny_model()
    opt = osd.create_optimizer(model, "subit_signum", rank=4, target_modules="all-linear")
    assert (opt.defaults["rule"], opt.defaults["projector"], opt.defaults["lr"]) == ("signum", "subspace_iteration", SIGNUM.default_lr)


def test_signum_is_elementwise_as_it_says() -> None:
    """``elementwise=True`` is what FSDP2 relies on: stepping row shards apart is the whole update."""
    W = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    grads = list(gradient_stream((8, 6), steps=3, seed=1))
    whole = _updates("signum", [W], grads)
    assert whole.abs().max() > 1e-4
    torch.testing.assert_close(_updates("signum", list(W.split([3, 5])), grads), whole, rtol=1e-5, atol=1e-7)
    assert sharded.keeps_shards("signum", projected=False)


# --- Keys: accepted, validated, refused where they belong to another part -------------------


def test_new_keys_are_accepted_and_validated() -> None:
    W = torch.nn.Parameter(torch.zeros(12, 16))
    opt = osd.SubspaceOptimizer([{"params": [W], "rank": 4}], rule="signum", projector="subspace_iteration", beta=0.8, mix=0.25)
    assert (opt.defaults["beta"], opt.defaults["mix"]) == (0.8, 0.25)
    with pytest.raises(ValueError, match="beta"):
        osd.SubspaceOptimizer([W], rule="signum", beta=1.5)
    with pytest.raises(ValueError, match="mix"):
        osd.SubspaceOptimizer([W], projector="subspace_iteration", mix=0.0)
    with pytest.raises(ValueError, match="mix"):
        osd.SubspaceOptimizer([W], projector="subspace_iteration", mix=1.5)
    with pytest.raises(ValueError, match="beta"):  # in a param group that picks the rule
        osd.SubspaceOptimizer([{"params": [W], "rule": "signum", "beta": -0.1}])


def test_a_group_takes_the_new_parts_defaults() -> None:
    W, b = torch.nn.Parameter(torch.zeros(12, 16)), torch.nn.Parameter(torch.zeros(12))
    opt = osd.SubspaceOptimizer([{"params": [W], "rank": 4, "rule": "signum", "projector": "subspace_iteration"}, {"params": [b]}])
    new, plain = opt.param_groups
    assert (new["beta"], new["mix"]) == (0.9, 0.5)
    assert "beta" not in plain and "mix" not in plain and plain["rule"] == "adamw"


@pytest.mark.parametrize(
    "rule, projector, key, value, owner",
    [
        ("adamw", "subspace_iteration", "alpha", 1.0, "projector 'online_pca'"),
        ("signum", "online_pca", "betas", (0.9, 0.99), "rule 'adamw'"),
        ("adamw", "svd", "mix", 0.5, "projector 'subspace_iteration'"),
        ("adamw", "online_pca", "beta", 0.9, "rule 'signum'"),
    ],
)
def test_keys_of_other_parts_are_refused_naming_their_owner(rule: str, projector: str, key: str, value: Any, owner: str) -> None:
    W = torch.nn.Parameter(torch.zeros(12, 16))
    with pytest.raises(TypeError, match=f"{key!r} is a hyperparameter of .*{owner}"):
        osd.SubspaceOptimizer([W], rule=rule, projector=projector, **{key: value})


def test_mix_on_a_galore_optimizer_is_refused() -> None:
    W = torch.nn.Parameter(torch.zeros(12, 16))
    with pytest.raises(TypeError, match="projector 'subspace_iteration'"):
        osd.GaLoreAdamW([{"params": [W], "rank": 4}], mix=0.5)


# --- state_dict: weights_only load, exact resume --------------------------------------------


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_state_dict_round_trip_resumes_bit_for_bit(optim_bits: int) -> None:
    data, k = _least_squares(), 4

    def fresh(W: torch.nn.Parameter) -> torch.optim.Optimizer:
        return osd.SubspaceOptimizer(
            [{"params": [W], "rank": 4}], lr=1e-2, rule="signum", projector="subspace_iteration", mix=0.3, optim_bits=optim_bits, min_8bit_size=0
        )

    W = torch.nn.Parameter(torch.zeros(12, 16))
    opt = fresh(W)
    _train(opt, W, k, data)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed_W = torch.nn.Parameter(W.detach().clone())
    _train(opt, W, k, data)  # the uninterrupted run

    resumed = fresh(resumed_W)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    _train(resumed, resumed_W, k, data)
    assert torch.equal(resumed_W, W)
    assert torch.equal(resumed.state[resumed_W][PROJ], opt.state[W][PROJ])


# --- 8-bit states ---------------------------------------------------------------------------


def test_signum_momentum_is_stored_in_8_bits_and_trains() -> None:
    W = torch.nn.Parameter(torch.zeros(12, 16))
    opt = osd.SubspaceOptimizer([{"params": [W], "rank": 4}], lr=None, rule="signum", projector="online_pca", scale=1.0, optim_bits=8, min_8bit_size=0)
    losses = _train(opt, W, 30, _least_squares())
    state = opt.state[W]
    codes, absmax, shape = state_layout.eight_bit_keys("momentum_buffer")
    assert "momentum_buffer" not in state and all(state_layout.is_8bit(key) and key in state for key in (codes, absmax, shape))
    assert state[codes].dtype == torch.uint8 and state_layout.stored_shape(state, "momentum_buffer") == (4, 16)
    assert losses[-1] < 0.7 * losses[0], losses


# --- The projector's own promises -----------------------------------------------------------


def test_subspace_iteration_keeps_P_orthonormal_and_moves_it_every_step_but_the_first() -> None:
    W = torch.nn.Parameter(torch.zeros(12, 20))
    opt = osd.SubspaceOptimizer([{"params": [W], "rank": 3}], lr=1e-2, projector="subspace_iteration", update_proj_gap=3)
    first = None
    moved = []
    for step, G in enumerate(gradient_stream((12, 20), steps=7, seed=2)):
        W.grad = G
        before = opt.state[W][PROJ].clone() if step else None
        opt.step()
        P = opt.state[W][PROJ]
        torch.testing.assert_close(P.mT @ P, torch.eye(3), rtol=0, atol=1e-5)
        if step == 0:
            first = P.clone()
            torch.testing.assert_close(P, F.svd_basis(G, 3, side="left"))  # from the SVD of the first gradient
        else:
            moved.append(not torch.equal(P, before))
    assert all(moved) and len(moved) == 6, moved
    assert not torch.equal(opt.state[W][PROJ], first)
    assert SUBSPACE_ITERATION.moves_in_advance({"step": 1}) and not SUBSPACE_ITERATION.moves_in_advance({"step": 0})


# --- Layer-wise updates ---------------------------------------------------------------------


def _run_tiny(rule: str, projector: str, layerwise: bool, accumulation: int, steps: int = 4) -> torch.nn.Module:
    model = _tiny_model()
    opt = osd.SubspaceOptimizer(_groups(model), lr=1e-2, rule=rule, projector=projector, weight_decay=0.01)
    if layerwise:
        LayerwiseUpdates(opt, accumulation)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for _ in range(accumulation):
            X = torch.randn(8, 16, generator=gen)
            Y = torch.randn(8, 12, generator=gen)
            (model(X) - Y).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("rule, projector", PAIRS)
def test_layerwise_updates_match_ordinary_steps(rule: str, projector: str, accumulation: int) -> None:
    start = [p.detach().clone() for p in _tiny_model().parameters()]
    ordinary = _run_tiny(rule, projector, layerwise=False, accumulation=accumulation)
    layerwise = _run_tiny(rule, projector, layerwise=True, accumulation=accumulation)
    for a, b, p0 in zip(ordinary.parameters(), layerwise.parameters(), start):
        assert not torch.equal(a, p0)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
