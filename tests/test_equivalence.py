"""The one code path against the references: torch's own optimizers and galore_torch."""

from __future__ import annotations

import warnings

import pytest
import torch

import osd
from osd.state_layout import is_projected
from tests.helpers import gradient_stream, relative_error


def run(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, grads: list[torch.Tensor]) -> None:
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()


@pytest.mark.parametrize("full_rank_via", ["no_rank_group", "identity_projector", "rank_at_least_min_side"])
def test_full_rank_adamw_equals_torch_adamw(full_rank_via: str) -> None:
    shape = (24, 40)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    hparams = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    if full_rank_via == "no_rank_group":
        opt = osd.OSDAdamW([ours], **hparams)
    elif full_rank_via == "identity_projector":
        opt = osd.SubspaceOptimizer([{"params": [ours], "rank": 4}], projector="identity", **hparams)
    else:
        opt = osd.OSDAdamW([{"params": [ours], "rank": 24}], **hparams)
    ref_opt = torch.optim.AdamW([ref], **hparams)
    grads = gradient_stream(shape, 20, seed=2)
    run(opt, ours, grads)
    run(ref_opt, ref, grads)
    assert relative_error(ours.detach(), ref.detach(), w0) < 1e-6
    assert not is_projected(opt.state[ours])


def test_full_rank_sgd_momentum_equals_torch_sgd() -> None:
    shape = (16, 12)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    for nesterov in (False, True):
        ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
        opt = osd.SubspaceOptimizer([ours], lr=1e-2, rule="sgd", projector="identity", momentum=0.9, nesterov=nesterov)
        ref_opt = torch.optim.SGD([ref], lr=1e-2, momentum=0.9, nesterov=nesterov)
        grads = gradient_stream(shape, 20, seed=4)
        run(opt, ours, grads)
        run(ref_opt, ref, grads)
        assert relative_error(ours.detach(), ref.detach(), w0) < 1e-6


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_galore_mode_reproduces_galore_torch(shape: tuple[int, int], proj_type: str) -> None:
    """Same gradient stream, 13 steps across two SVD refreshes (gap 5).

    eps=0 on both sides: torch-style AdamW (ours) adds eps to the bias-corrected sqrt(v),
    galore_torch's HF-style AdamW to the raw sqrt(v); with eps=0 the maths is the same.
    """
    galore_torch = pytest.importorskip("galore_torch", reason="galore-torch is a test dependency (pip install -e .[test])")
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    group = {"rank": 8, "update_proj_gap": 5, "scale": 0.25, "proj_type": proj_type}
    opt = osd.GaLoreAdamW([{"params": [ours], **group}], lr=1e-2, eps=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_opt = galore_torch.GaLoreAdamW([{"params": [ref], **group}], lr=1e-2, eps=0.0, no_deprecation_warning=True)
    grads = gradient_stream(shape, 13, seed=6)
    run(opt, ours, grads)
    run(ref_opt, ref, grads)
    assert relative_error(ours.detach(), ref.detach(), w0) < 1e-5
