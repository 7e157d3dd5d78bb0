"""The parity measurements, shared by ``tests/test_parity.py`` (bounds) and
``benchmarks/parity.py`` (the figures): each runs our optimizer and a reference on the same
gradient stream and returns ``||W - W_ref|| / ||W_ref - W_0||`` (the error on the update)."""

from __future__ import annotations

import warnings
from types import ModuleType

import torch

import osd
from osd.schedule import warmup_cosine_factor
from osd.state_layout import PROJ
from tests.helpers import gradient_stream, relative_error
from tests.reference_osd_release import ReleasedOSD

SHAPES = [(48, 80), (80, 48)]
PROJ_TYPES = ["std", "reverse_std", "left", "right"]


def galore_adamw_errors(galore_torch: ModuleType, shape: tuple[int, int], proj_type: str, weight_decay: float) -> tuple[float, float]:
    """``GaLoreAdamW`` vs ``galore_torch.GaLoreAdamW`` at its defaults, 13 steps, gap 5: the
    errors of the projected matrix and of a full-rank vector in a second group."""
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    full_ours, full_ref = torch.nn.Parameter(w0[0].clone()), torch.nn.Parameter(w0[0].clone())
    group = {"rank": 8, "update_proj_gap": 5, "scale": 0.25, "proj_type": proj_type}
    opt = osd.GaLoreAdamW([{"params": [ours], **group}, {"params": [full_ours]}], lr=1e-2, weight_decay=weight_decay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_opt = galore_torch.GaLoreAdamW([{"params": [ref], **group}, {"params": [full_ref]}], lr=1e-2, weight_decay=weight_decay)
    for grad in gradient_stream(shape, 13, seed=6):
        ours.grad, ref.grad = grad.clone(), grad.clone()
        full_ours.grad, full_ref.grad = grad[1].clone(), grad[1].clone()
        opt.step()
        ref_opt.step()
    return relative_error(ours.detach(), ref.detach(), w0), relative_error(full_ours.detach(), full_ref.detach(), w0[0])


def galore_adafactor_error(galore_torch: ModuleType, shape: tuple[int, int], beta1: float | None, weight_decay: float) -> float:
    """``GaLoreAdafactor`` vs ``galore_torch``'s with an explicit lr, float64, 12 steps, gap 5."""
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    group = {"rank": 8, "update_proj_gap": 5, "scale": 0.25, "proj_type": "std"}
    settings = dict(lr=1e-2, eps=(1e-30, 1e-3), beta1=beta1, weight_decay=weight_decay, relative_step=False, scale_parameter=False, warmup_init=False)
    opt = osd.GaLoreAdafactor([{"params": [ours], **group}], **settings)
    ref_opt = galore_torch.GaLoreAdafactor([{"params": [ref], **group}], **settings)
    for grad in gradient_stream(shape, 12, seed=8, dtype=torch.float64):
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    return relative_error(ours.detach(), ref.detach(), w0)


def osd_release_errors(rule: str, shape: tuple[int, int], steps: int = 30) -> tuple[float, float, float]:
    """``OSDAdamW``/``OSDLion`` with ``compat="osd_release"`` vs the released behaviour, under
    warmup (5 steps) + cosine to 10% of the peak 1e-2, weight decay 0.1, scale 0.25, gap 200,
    float64. Returns the errors of ``W`` and ``P`` and how far the reference's ``P`` moved."""
    peak, rank, gap = 1e-2, 6, 200
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    ours = torch.nn.Parameter(w0.clone())
    cls = osd.OSDAdamW if rule == "adamw" else osd.OSDLion
    opt = cls([{"params": [ours], "rank": rank, "update_proj_gap": gap, "scale": 0.25}], lr=peak, weight_decay=0.1, compat="osd_release")
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: warmup_cosine_factor(t, 5, steps, 0.1))
    betas = (0.9, 0.999) if rule == "adamw" else (0.9, 0.99)
    reference = ReleasedOSD(rule, rank, gap, 0.25, peak, betas=betas, eps=1e-6, weight_decay=0.1)
    ref_w, p0 = w0.clone(), None
    for t, grad in enumerate(gradient_stream(shape, steps, seed=12, dtype=torch.float64)):
        lr = peak * warmup_cosine_factor(t, 5, steps, 0.1)
        if abs(opt.param_groups[0]["lr"] - lr) > 1e-12 * peak:
            raise AssertionError(f"step {t}: the scheduler gave lr {opt.param_groups[0]['lr']}, the reference {lr}")
        ours.grad = grad.clone()
        opt.step()
        scheduler.step()
        reference.step(ref_w, grad, lr)
        p0 = reference.basis.clone() if p0 is None else p0
    orient = (lambda B: B.T) if reference.columns else (lambda B: B)
    P_ref, P_start = orient(reference.basis), orient(p0)
    return relative_error(ours.detach(), ref_w, w0), relative_error(opt.state[ours][PROJ], P_ref, P_start), (P_ref - P_start).norm().item()
