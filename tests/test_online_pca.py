"""Online Subspace Descent's projection rule: its gradient, and that it tracks a subspace."""

from __future__ import annotations

import math

import pytest
import torch

import osd
from osd.functional import online_pca_grad, online_pca_loss, principal_angles
from osd.state_layout import PROJ, PROJ_PREFIX


@pytest.mark.parametrize("shape,rank", [((12, 30), 3), ((30, 12), 5), ((16, 16), 16)])
@pytest.mark.parametrize("ortho_reg", [0.0, 0.1, 2.0])
def test_closed_form_gradient_equals_autograd(shape: tuple[int, int], rank: int, ortho_reg: float) -> None:
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=gen, dtype=torch.float64)
    # A P that is far from orthonormal, so every term of the gradient matters.
    P = torch.randn(shape[0], rank, generator=gen, dtype=torch.float64).requires_grad_()
    (expected,) = torch.autograd.grad(online_pca_loss(P, G, ortho_reg), P)
    actual = online_pca_grad(P.detach(), G, ortho_reg)
    assert (actual - expected).abs().max().item() < 1e-10
    # The shortcut the optimizer takes (R = P^T G and ||G|| already known) is the same.
    shortcut = online_pca_grad(P.detach(), G, ortho_reg, R=P.detach().mT @ G, grad_norm=G.norm())
    assert (shortcut - expected).abs().max().item() < 1e-10


def _planted_basis(m: int, r: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, r, generator=torch.Generator().manual_seed(seed)))[0]


@pytest.mark.parametrize("shape", [(32, 80), (80, 32)])
def test_online_pca_tracks_a_planted_subspace_and_its_jump(shape: tuple[int, int]) -> None:
    """Gradients = (planted rank-4 subspace) x random coefficients + isotropic noise.

    The subspace lives on the smaller side (the side std projects); halfway it jumps to an
    unrelated one. P must converge to each (largest principal angle < 5 degrees) and stay
    near-orthonormal (max |P^T P - I| < 1e-2).
    """
    rank, small, large = 4, min(shape), max(shape)
    spectrum = torch.tensor([4.0, 3.0, 2.5, 2.0])
    gen = torch.Generator().manual_seed(1)
    param = torch.nn.Parameter(torch.zeros(shape))
    opt = osd.OSDAdamW([{"params": [param], "rank": rank}], lr=1e-3)

    def phase(planted: torch.Tensor, steps: int) -> None:
        for _ in range(steps):
            grad = planted @ (spectrum[:, None] * torch.randn(rank, large, generator=gen))
            grad += 0.3 * torch.randn(small, large, generator=gen)
            param.grad = grad if shape[0] <= shape[1] else grad.mT.contiguous()
            opt.step()

    for seed in (10, 11):
        planted = _planted_basis(small, rank, seed)
        phase(planted, 300)
        P = opt.state[param][PROJ]
        assert P.shape == (small, rank)
        angle = math.degrees(principal_angles(P, planted).max())
        assert angle < 5.0, f"P is {angle:.1f} degrees from the planted subspace"
        assert (P.mT @ P - torch.eye(rank)).abs().max().item() < 1e-2


def test_online_pca_moves_p_every_step_and_svd_only_at_refresh() -> None:
    grads = [torch.randn(20, 50, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    projections = {}
    for cls in (osd.OSDAdamW, osd.GaLoreAdamW):
        param = torch.nn.Parameter(torch.zeros(20, 50))
        opt = cls([{"params": [param], "rank": 4, "update_proj_gap": 3}], lr=1e-2)
        history = []
        for grad in grads:
            param.grad = grad
            opt.step()
            history.append(opt.state[param][PROJ].clone())
        projections[cls.__name__] = history
    osd_history, galore_history = projections["OSDAdamW"], projections["GaLoreAdamW"]
    assert all(not torch.equal(a, b) for a, b in zip(osd_history, osd_history[1:]))
    assert torch.equal(galore_history[0], galore_history[2]) and not torch.equal(galore_history[2], galore_history[3])


def test_osd_weight_update_uses_p_before_its_update() -> None:
    """Step t updates W with P_t (the SVD basis of G_0 at t=0 with ``svd_method="svd"``), then
    computes P_{t+1}."""
    grad = torch.randn(10, 30, generator=torch.Generator().manual_seed(3))
    param = torch.nn.Parameter(torch.zeros(10, 30))
    opt = osd.SubspaceOptimizer([{"params": [param], "rank": 3, "scale": 1.0}], lr=0.1, rule="sgd", momentum=0.0, svd_method="svd")
    param.grad = grad
    opt.step()
    U = torch.linalg.svd(grad, full_matrices=False)[0][:, :3]
    expected = -0.1 * U @ (U.mT @ grad)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-6)
    # P is not stepped on the gradient that initialised it: still the SVD basis, bit for bit.
    assert torch.equal(opt.state[param][PROJ], U.contiguous())
    # From step 1 on, P moves, with the weights updated by P_1 before it does.
    P1 = opt.state[param][PROJ].clone()
    param.grad = torch.randn(10, 30, generator=torch.Generator().manual_seed(4))
    before = param.detach().clone()
    opt.step()
    torch.testing.assert_close(param.detach() - before, -0.1 * P1 @ (P1.mT @ param.grad), rtol=1e-5, atol=1e-6)
    assert not torch.equal(opt.state[param][PROJ], P1)


def test_p_optimizer_counts_its_own_steps() -> None:
    """P's Adam takes its first step (bias correction t = 1) at the parameter's step 1: its
    first move is lr_P * sign-like unit step, alpha * lr per entry at most."""
    gen = torch.Generator().manual_seed(5)
    param = torch.nn.Parameter(torch.zeros(12, 40))
    opt = osd.OSDAdamW([{"params": [param], "rank": 3}], lr=1e-3, alpha=5.0, eps=1e-8)
    param.grad = torch.randn(12, 40, generator=gen)
    opt.step()
    state = opt.state[param]
    assert state[PROJ_PREFIX + "exp_avg"].abs().max() == 0 and state[PROJ_PREFIX + "exp_avg_sq"].abs().max() == 0
    P0 = state[PROJ].clone()
    param.grad = torch.randn(12, 40, generator=gen)
    opt.step()
    # Adam's first step with bias correction: |delta| = lr_P * |g| / (|g| + eps) <= lr_P.
    delta = (state[PROJ] - P0).abs()
    assert delta.max().item() == pytest.approx(5e-3, rel=1e-3)


def test_released_code_learning_rate_rule_follows_the_schedule() -> None:
    param = torch.nn.Parameter(torch.zeros(8, 16))
    opt = osd.OSDAdamW([{"params": [param], "rank": 2}], lr=1e-3, proj_lr_rule="released", update_proj_gap=200, ortho_reg=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(5e-4)
    assert osd.projectors.proj_lr(group) == pytest.approx(5e-4 / (1e-3 * 200))
    group["proj_lr_rule"] = "alpha"
    assert osd.projectors.proj_lr(group) == pytest.approx(5 * 5e-4)
    del scheduler
