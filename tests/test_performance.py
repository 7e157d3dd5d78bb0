"""The cheaper bases (``svd_method``), the fused full-rank path and the compiled step."""

from __future__ import annotations

import pytest
import torch

import osd
from osd import functional as F
from osd.state_layout import PROJ
from tests.helpers import gradient_stream


def gapped_matrix(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    """``m x n`` with singular values 10..1 on its top ``rank`` directions and 0.1 and below after."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=gen))
    spectrum = torch.cat([torch.linspace(10.0, 1.0, rank), torch.linspace(0.1, 0.01, m - rank)])
    return (U * spectrum) @ V.mT


@pytest.mark.parametrize("shape", [(40, 90), (64, 64)])
def test_eigh_basis_spans_the_svd_subspace(shape: tuple[int, int]) -> None:
    G = gapped_matrix(*shape, rank=6, seed=0)
    exact = F.svd_basis(G, 6, "left")
    basis = F.eigh_basis(G, 6)
    assert basis.shape == (shape[0], 6)
    torch.testing.assert_close(basis.mT @ basis, torch.eye(6), atol=1e-5, rtol=0)
    assert F.principal_angles(basis, exact).max() < 1e-3


@pytest.mark.parametrize("niter", [0, 1, 2])
def test_randomized_basis_finds_a_gapped_subspace_and_is_seeded(niter: int) -> None:
    G = gapped_matrix(48, 120, rank=8, seed=1)
    exact = F.svd_basis(G, 8, "left")
    basis = F.randomized_basis(G, 8, niter, torch.Generator().manual_seed(3))
    torch.testing.assert_close(basis.mT @ basis, torch.eye(8), atol=1e-5, rtol=0)
    # Each power iteration shrinks the angles by the gap ratio (0.1 / 1) squared.
    assert F.principal_angles(basis, exact).max() < (0.2 if niter == 0 else 1e-3)
    assert torch.equal(basis, F.randomized_basis(G, 8, niter, torch.Generator().manual_seed(3)))
    assert not torch.equal(basis, F.randomized_basis(G, 8, niter, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("projector", ["online_pca", "svd"])
@pytest.mark.parametrize("svd_method", ["eigh", "randomized"])
@pytest.mark.parametrize("shape", [(40, 90), (90, 40)])
def test_svd_method_gives_the_exact_subspace_up_to_its_accuracy(projector: str, svd_method: str, shape: tuple[int, int]) -> None:
    """Initial ``P`` (OSD) and refreshed ``P`` (GaLore) of a weight, in both orientations,
    against the default full SVD: the same subspace (a gapped gradient, 2 power iterations)."""
    G = gapped_matrix(*sorted(shape), rank=6, seed=2)
    G = G if shape[0] <= shape[1] else G.mT.contiguous()
    bases = {}
    for method in ("svd", svd_method):
        w = torch.nn.Parameter(torch.zeros(shape))
        opt = osd.SubspaceOptimizer([{"params": [w], "rank": 6}], lr=1e-3, projector=projector, svd_method=method)
        w.grad = G.clone()
        opt.step()
        bases[method] = opt.state[w][PROJ]
    # OSD's P has taken one online-PCA step after its initialisation: compare more loosely.
    assert F.principal_angles(bases["svd"], bases[svd_method]).max() < (0.05 if projector == "online_pca" else 1e-3)


def test_svd_method_is_validated_and_old_state_dicts_get_the_default() -> None:
    w = torch.nn.Parameter(torch.zeros(8, 12))
    with pytest.raises(ValueError, match="svd_method must be one of"):
        osd.OSDAdamW([{"params": [w], "rank": 2}], svd_method="lowrank")
    with pytest.raises(ValueError, match="svd_niter"):
        osd.OSDAdamW([{"params": [w], "rank": 2}], svd_niter=-1)
    for make, default in ((osd.OSDAdamW, ("randomized", 1)), (osd.GaLoreAdamW, ("svd", 2))):
        opt = make([{"params": [w], "rank": 2}], lr=1e-2)
        w.grad = gradient_stream((8, 12), 1)[0]
        opt.step()
        saved = opt.state_dict()
        for group in saved["param_groups"]:
            del group["svd_method"], group["svd_niter"]  # a state dict from before the option existed
        opt.load_state_dict(saved)
        assert (opt.param_groups[0]["svd_method"], opt.param_groups[0]["svd_niter"]) == default


def test_osd_starts_from_the_randomized_basis_by_default_and_the_release_from_the_svd() -> None:
    """OSD's initial P: randomized range finding with one power iteration (its Gaussian from the
    parameter's seed), unless ``svd_method`` says otherwise; ``compat="osd_release"`` and
    GaLore take the SVD. The randomized basis spans nearly the same subspace on a gradient
    whose spectrum decays."""
    G = gradient_stream((40, 96), 1)[0]
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    G = (U * torch.logspace(0, -3, len(S))) @ Vh  # a decaying spectrum, as real gradients have
    bases = {}
    for name, make, kwargs in (
        ("default", osd.OSDAdamW, {}),
        ("svd", osd.OSDAdamW, {"svd_method": "svd"}),
        ("release", osd.OSDAdamW, {"compat": "osd_release"}),
        ("galore", osd.GaLoreAdamW, {}),
    ):
        w = torch.nn.Parameter(torch.zeros(40, 96))
        opt = make([{"params": [w], "rank": 6}], lr=1e-3, **kwargs)
        w.grad = G.clone()
        opt.step()
        bases[name] = opt.state[w][PROJ]
    exact = F.svd_basis(G, 6, "left")
    for name in ("svd", "release", "galore"):
        assert torch.equal(bases[name], exact), name
    assert not torch.equal(bases["default"], exact)
    assert F.principal_angles(bases["default"], exact).max() < 0.02


def test_step_param_reads_the_groups_load_state_dict_installs() -> None:
    """``load_state_dict`` replaces the group dicts; a layer-wise step must read the new
    ones (an LR scheduler changes those), not the ones the optimizer was built with."""
    w = torch.nn.Parameter(torch.randn(8, 12))
    opt = osd.OSDAdamW([{"params": [w], "rank": 2}], lr=1e-2)
    w.grad = gradient_stream((8, 12), 1)[0]
    opt.step()
    opt.load_state_dict(opt.state_dict())
    opt.param_groups[0]["lr"] = 0.0
    before = w.detach().clone()
    opt.step_param(w, w.grad)
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_full_rank_adamw_runs_torchs_fused_kernel_bit_for_bit(weight_decay: float) -> None:
    """Full-rank parameters (here beside a projected one) step through ``torch.optim.AdamW``'s
    fused kernel: the same bits as torch's ``AdamW(fused=True)``, one parameter at a time
    (layer-wise ``step_param``) or all together (``step``)."""
    shapes = [(24, 40), (40,), (16, 8)]
    w0 = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
    hparams = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    ref = [torch.nn.Parameter(w.clone()) for w in w0[:2]]
    ref_opt = torch.optim.AdamW(ref, fused=True, **hparams)
    ours, by_param = ([torch.nn.Parameter(w.clone()) for w in w0] for _ in range(2))
    opts = [osd.OSDAdamW([{"params": params[:2]}, {"params": params[2:], "rank": 2}], **hparams) for params in (ours, by_param)]
    streams = [gradient_stream(shape, 6, seed=10 + i) for i, shape in enumerate(shapes)]
    for t in range(6):
        for params in (ref, ours, by_param):
            for p, stream in zip(params, streams):
                p.grad = stream[t].clone()
        ref_opt.step()
        opts[0].step()
        for p in by_param:
            opts[1].step_param(p)
    for a, b, c in zip(ref, ours, by_param):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(ours[2], by_param[2])
    assert opts[0].state[ours[0]]["step"] == 6 and isinstance(opts[0].state[ours[0]]["step"], int)


@pytest.fixture(scope="module")
def compile_works() -> None:
    """Skip where ``torch.compile`` cannot build a kernel here (no C compiler, no inductor)."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as error:  # noqa: BLE001 - any backend failure means: cannot test here
        pytest.skip(f"torch.compile cannot run on this machine ({type(error).__name__}: {error})")


@pytest.mark.parametrize(
    ("name", "shape", "kwargs"),
    [
        ("OSDAdamW", (16, 24), {"weight_decay": 0.1}),
        ("GaLoreAdamW", (24, 16), {"weight_decay": 0.1, "update_proj_gap": 3}),
        ("OSDLion", (16, 24), {"sign_space": "full", "proj_optimizer": "sgd"}),
    ],
)
def test_compiled_step_equals_the_eager_one(compile_works, name: str, shape: tuple[int, int], kwargs: dict) -> None:
    """``torch.compile(optimizer.step)`` of a projected optimizer gives the eager updates
    (torch 2.13's inductor drops ``alpha`` in ``W.add_(A @ B, alpha=...)``, which a weight
    update written that way hits: updates then went wrong by 4-100%)."""
    import torch._dynamo

    weights = []
    for compiled in (False, True):
        torch._dynamo.reset()
        w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
        opt = getattr(osd, name)([{"params": [w], "rank": 4}], lr=1e-2, **kwargs)
        step = torch.compile(opt.step) if compiled else opt.step
        for grad in gradient_stream(shape, 5, seed=1):
            w.grad = grad
            step()
        weights.append(w.detach().clone())
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert ((weights[1] - weights[0]).norm() / (weights[0] - w0).norm()) < 1e-5


def test_adamw_direction_through_torchs_kernel_is_the_reference_maths() -> None:
    """The inner AdamW direction (torch's fused kernel stepping a zero buffer with lr = -1)
    against :func:`osd.functional.adamw_direction`, the maths written out, over 6 steps."""
    from osd.rules import RULES

    rule = RULES["adamw"]
    hparams = rule.hparams({"betas": (0.9, 0.95), "eps": 1e-8})
    grads = gradient_stream((12, 40), 6, seed=5)
    ours = rule.init_state(grads[0], hparams, "")
    reference = {k: v.clone() for k, v in ours.items()}
    for t, grad in enumerate(grads, start=1):
        direction = rule.direction(grad, ours, hparams, t, "")
        expected = F.adamw_direction(grad, reference["exp_avg"], reference["exp_avg_sq"], t, 0.9, 0.95, 1e-8)
        torch.testing.assert_close(direction, expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours["exp_avg_sq"], reference["exp_avg_sq"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_code_lookup_finds_the_codes_bucketize_finds(signed: bool) -> None:
    """8-bit quantisation's table lookup against ``torch.bucketize`` over the code map's
    midpoints: random values at three scales, every midpoint, its float neighbours, zeros."""
    from osd import quantization

    midpoints = quantization._midpoints(signed, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([
        torch.rand(50_000, generator=gen) * 2 - 1,
        torch.randn(50_000, generator=gen) * 1e-3,
        torch.randn(50_000, generator=gen) * 1e-6,
        midpoints,
        torch.nextafter(midpoints, torch.tensor(float("inf"))),
        torch.nextafter(midpoints, torch.tensor(float("-inf"))),
        torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-12, -1e-12, 1e-40, -1e-40]),
    ])
    values = values if signed else values.abs()
    expected = torch.bucketize(values, midpoints, right=True).to(torch.uint8)
    assert torch.equal(quantization._nearest_codes(values, signed), expected)
