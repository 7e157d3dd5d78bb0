"""Options beyond the papers: moment transport, Fira/APOLLO compensation, the sketched online
PCA projector and the Muon rule (their maths, and how they compose with the optimizer)."""

from __future__ import annotations

import pytest
import torch

import osd
from osd import functional as F
from osd.state_layout import MOMENTS_ORIGIN, PROJ
from tests.helpers import gradient_stream


def orthonormal(m: int, r: int, seed: int) -> torch.Tensor:
    """An ``m x r`` float64 matrix with orthonormal columns."""
    return torch.linalg.qr(torch.randn(m, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


# --- Newton-Schulz and Muon --------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 40), (40, 8), (24, 24)])
def test_newton_schulz_singular_values_are_near_one(shape: tuple[int, int]) -> None:
    """Five quintic iterations bring every singular value above ~1e-2 of the Frobenius norm
    into [0.6, 1.25] (smaller ones rise more slowly: a random square matrix has some)."""
    X = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    X[:, 0] *= 10.0  # ill-conditioned: one direction dominates the input
    s_in = torch.linalg.svdvals(X) / X.norm()
    s = torch.linalg.svdvals(F.newton_schulz(X))
    kept = s[s_in > 1e-2]
    assert len(kept) >= min(shape) - 3 and kept.min() > 0.6 and s.max() < 1.25, (s_in, s)
    # ... with the singular vectors of X: Y X^T is symmetric positive semi-definite
    Y = F.newton_schulz(X)
    A = Y @ X.mT if shape[0] <= shape[1] else X.mT @ Y
    torch.testing.assert_close(A, A.mT, rtol=1e-3, atol=1e-3 * A.abs().max().item())


def test_muon_direction_rms_and_spectral_scales() -> None:
    grad = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    rms = F.muon_direction(grad, torch.zeros_like(grad), 0.95, True, 5, "rms")
    assert 0.14 < rms.square().mean().sqrt().item() < 0.26  # ~0.2, an AdamW-like update RMS
    tall = F.muon_direction(grad.mT.contiguous(), torch.zeros(64, 16), 0.95, True, 5, "spectral")
    assert torch.linalg.svdvals(tall).max().item() == pytest.approx(2.0 * torch.linalg.svdvals(F.newton_schulz(grad.mT)).max().item(), rel=1e-5)


def test_muon_refuses_vectors_and_presets_give_them_adamw() -> None:
    with pytest.raises(ValueError, match="matrices only.*another rule"):
        osd.SubspaceOptimizer([torch.nn.Parameter(torch.zeros(5))], rule="muon")
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = osd.create_optimizer(model, "muon", lr=1e-3)
    rules = {id(p): g["rule"] for g in opt.param_groups for p in g["params"]}
    assert rules[id(model[1].weight)] == "muon"
    assert {rules[id(model[0].weight)], rules[id(model[1].bias)], rules[id(model[2].weight)]} == {"adamw"}


@pytest.mark.parametrize("rank", [None, 4])
def test_muon_trains_a_least_squares_problem(rank: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(64, 16, generator=gen)
    target = A @ torch.randn(16, 24, generator=gen) + 0.1 * torch.randn(64, 24, generator=gen)
    W = torch.nn.Parameter(torch.zeros(16, 24))
    opt = osd.SubspaceOptimizer([{"params": [W], "rank": rank}], lr=0.2, rule="muon", projector="svd", update_proj_gap=10, scale=1.0)
    losses = []
    for _ in range(100):
        loss = (A @ W - target).square().mean()
        W.grad = torch.autograd.grad(loss, W)[0]
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]


# --- Moment transport --------------------------------------------------------------------


def test_transport_is_exact_when_P_is_unchanged_or_rotated_within_its_span() -> None:
    P = orthonormal(20, 5, 0) * 1.3  # not orthonormal: the Gram factor must handle it
    G = P @ torch.randn(5, 30, dtype=torch.float64)  # a gradient inside span(P)
    R_old = P.mT @ G
    torch.testing.assert_close(F.transport_matrix(P, P), torch.eye(5, dtype=torch.float64))
    Q = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    P_new = P @ Q
    C = F.transport_matrix(P, P_new)
    torch.testing.assert_close(F.transport_first_moment(R_old, C), P_new.mT @ G)
    # the second moment: exact for a signed permutation, and never negative
    perm = torch.eye(5, dtype=torch.float64)[[2, 0, 1, 4, 3]] * torch.tensor([1, -1, 1, 1, -1], dtype=torch.float64)
    v = torch.rand(5, 30, dtype=torch.float64)
    torch.testing.assert_close(F.transport_second_moment(v, F.transport_matrix(P, P @ perm.mT)), v[[2, 0, 1, 4, 3]])
    assert (F.transport_second_moment(v, C) >= 0).all()
    torch.testing.assert_close(F.transport_second_moment(v, C).sum(0), v.sum(0))  # rows of C*C sum to 1


def in_span_stream(m: int, n: int, r: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Gradients that all lie in one fixed r-dimensional column space, varying within it."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, r, generator=gen))[0]
    return [U @ torch.randn(r, n, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("transport", [None, "first"])
def test_transported_momentum_makes_galore_equal_full_rank_sgd_in_a_fixed_span(transport: str | None) -> None:
    """Every gradient lies in a fixed rank-4 span, so each SVD refresh returns a rotation of the
    same basis. With the momentum transported, rank-4 GaLore-SGD is then exactly full-rank SGD;
    without it the momentum is read in the wrong basis after each refresh. (scale 1: the
    comparison is with SGD's full step.)"""
    grads = in_span_stream(12, 30, 4, 9, seed=3)
    W_sub, W_full = torch.nn.Parameter(torch.zeros(12, 30)), torch.nn.Parameter(torch.zeros(12, 30))
    sub = osd.SubspaceOptimizer([{"params": [W_sub], "rank": 4}], lr=0.1, rule="sgd", projector="svd", update_proj_gap=2, moment_transport=transport, scale=1.0)
    full = torch.optim.SGD([W_full], lr=0.1, momentum=0.9)
    for g in grads:
        W_sub.grad, W_full.grad = g.clone(), g.clone()
        sub.step()
        full.step()
    error = ((W_sub - W_full).norm() / W_full.norm()).item()
    if transport:
        assert error < 1e-5
    else:
        assert error > 1e-2


def test_reset_restarts_the_inner_rule_at_each_refresh() -> None:
    W = torch.nn.Parameter(torch.zeros(10, 20))
    opt = osd.SubspaceOptimizer([{"params": [W], "rank": 3}], lr=0.1, rule="adamw", projector="random", update_proj_gap=4, moment_transport="reset", eps=0.0, scale=1.0)
    grads = gradient_stream((10, 20), 5, seed=1)
    for g in grads[:4]:
        W.grad = g
        opt.step()
    before = W.detach().clone()
    W.grad = grads[4]
    opt.step()  # step 4: a refresh, so Adam starts over: its first step is lr * sign(R), projected back
    state = opt.state[W]
    assert state[MOMENTS_ORIGIN] == 4
    expected = -0.1 * state[PROJ] @ (state[PROJ].mT @ grads[4]).sign()
    torch.testing.assert_close(W.detach() - before, expected)


def test_reset_is_refused_with_a_projector_that_moves_every_step() -> None:
    with pytest.raises(ValueError, match="moves P every step"):
        osd.SubspaceOptimizer([torch.nn.Parameter(torch.zeros(4, 4))], projector="online_pca", moment_transport="reset")
    with pytest.raises(ValueError, match="moment_transport must be one of"):
        osd.SubspaceOptimizer([torch.nn.Parameter(torch.zeros(4, 4))], moment_transport="second")


# --- Compensation --------------------------------------------------------------------------


def test_fira_residual_is_zero_at_full_rank() -> None:
    gen = torch.Generator().manual_seed(0)
    P = orthonormal(8, 8, 1)
    G = torch.randn(8, 20, generator=gen, dtype=torch.float64)
    R = P.mT @ G
    D = torch.randn(8, 20, generator=gen, dtype=torch.float64)
    previous = torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(F.fira_update(P, D, G, R, previous, "channel", 1.01), P @ D)
    assert previous.item() == pytest.approx(0.0, abs=1e-12)


def test_limiter_caps_the_growth_of_the_norm() -> None:
    previous = torch.tensor(2.0)
    limited = F.limit_norm_growth(torch.full((3, 3), 10.0), previous, 1.01)
    assert limited.norm().item() == pytest.approx(2.02) and previous.item() == pytest.approx(2.02)
    assert F.limit_norm_growth(torch.full((3, 3), 0.1), previous, 1.01).norm().item() == pytest.approx(0.3)
    first = torch.tensor(0.0)  # nothing to compare with at the first step
    assert F.limit_norm_growth(torch.full((2, 2), 5.0), first, 1.01).norm().item() == pytest.approx(10.0)


@pytest.mark.parametrize("projector", ["svd", "online_pca", "random", "sketch_pca"])
@pytest.mark.parametrize("mode", [None, "fira", "apollo"])
def test_compensation_of_plain_sgd_is_full_rank_sgd(projector: str, mode: str | None) -> None:
    """With SGD without momentum the inner rule does not rescale (D = R), so both compensations
    scale the residual / the gradient by 1: every projector then takes full-rank SGD steps."""
    grads = gradient_stream((12, 30), 6, seed=2)
    W_sub, W_full = torch.nn.Parameter(torch.zeros(12, 30)), torch.nn.Parameter(torch.zeros(12, 30))
    sub = osd.SubspaceOptimizer(
        [{"params": [W_sub], "rank": 3}], lr=0.1, rule="sgd", momentum=0.0, projector=projector, compensation=mode, compensation_limit=None, scale=1.0
    )
    full = torch.optim.SGD([W_full], lr=0.1)
    for g in grads:
        W_sub.grad, W_full.grad = g.clone(), g.clone()
        sub.step()
        full.step()
    error = ((W_sub - W_full).norm() / W_full.norm()).item()
    assert error < 1e-5 if mode else error > 0.1


def test_apollo_scales_each_column_by_the_adam_amplification() -> None:
    gen = torch.Generator().manual_seed(4)
    G, P = torch.randn(6, 10, generator=gen), orthonormal(6, 2, 2).float()
    R = P.mT @ G
    D = R / (R.abs() + 0.1)
    expected = G * (D.norm(dim=0) / R.norm(dim=0))
    torch.testing.assert_close(F.apollo_update(D, G, R, torch.zeros(()), "channel", None), expected, rtol=1e-5, atol=1e-6)
    tensor_wise = F.apollo_update(D, G, R, torch.zeros(()), "tensor", None)
    torch.testing.assert_close(tensor_wise, G * D.norm() / R.norm(), rtol=1e-5, atol=1e-6)


# --- The sketched online-PCA projector ----------------------------------------------------


def test_sketch_pca_keeps_P_near_orthonormal_and_finds_the_mean_under_noise() -> None:
    """A fixed rank-2 mean gradient under noise 5x larger in 2 other rows: online PCA keeps the
    noise rows; the sketch of the moving average turns to the mean's."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.zeros(16, 64)
    mean[:2] = torch.randn(2, 64, generator=gen)
    stream = []
    for _ in range(400):
        g = mean.clone()
        g[2:4] += 5.0 * torch.randn(2, 64, generator=gen)
        stream.append(g)
    angles = {}
    for projector in ("online_pca", "sketch_pca"):
        W = torch.nn.Parameter(torch.zeros(16, 64))
        options = {"sketch_beta": 0.99} if projector == "sketch_pca" else {}
        opt = osd.SubspaceOptimizer([{"params": [W], "rank": 2}], lr=1e-3, rule="sgd", projector=projector, alpha=10.0, **options)
        for g in stream:
            W.grad = g
            opt.step()
        P = opt.state[W][PROJ]
        assert (P.mT @ P - torch.eye(2)).norm() < 0.1
        angles[projector] = F.principal_angles(P, torch.eye(16)[:, :2]).max().item()
    assert angles["sketch_pca"] < 0.6 and angles["online_pca"] > 1.5, angles  # radians; pi/2 = orthogonal
