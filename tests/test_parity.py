"""Exact parity with the reference implementations at their own defaults.

Every comparison is on the UPDATE: ``||W - W_ref|| / ||W_ref - W_0||`` (and the same for
``P``), so that a large weight cannot hide a wrong step.

- ``GaLoreAdamW`` / ``GaLoreAdafactor`` against ``galore_torch`` 1.0 (a test dependency),
  at ``galore_torch``'s defaults: across refreshes, the four ``proj_type``s, both
  orientations, weight decay on and off.
- ``compat="osd_release"`` against the released OSD optimizer (``reference_osd_release``),
  AdamW and Lion, both projection sides, under a warmup + cosine schedule, 30 steps.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import osd
from osd.state_layout import PROJ
from tests import parity_cases as cases
from tests.helpers import gradient_stream, relative_error

SHAPES = cases.SHAPES


def _galore_torch():
    return pytest.importorskip("galore_torch", reason="galore-torch is a test dependency (pip install -e .[test])")


def _run(opt: torch.optim.Optimizer, param: torch.nn.Parameter, grads: list[torch.Tensor], scheduler=None) -> None:
    for grad in grads:
        param.grad = grad.clone()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_galore_adamw_reproduces_galore_torch_at_its_defaults(shape, proj_type: str, weight_decay: float) -> None:
    """13 steps, SVD refreshes at steps 0, 5 and 10, galore_torch's default eps (1e-6); a
    full-rank vector in a second group."""
    errors = cases.galore_adamw_errors(_galore_torch(), shape, proj_type, weight_decay)
    assert max(errors) < 1e-5, errors


def test_galore_adamw_first_step_and_eps_matter() -> None:
    """The conventions are not cosmetic: with torch's (``compat=None``) the first step is
    measurably off galore_torch's, with galore_torch's it matches."""
    galore_torch = _galore_torch()
    shape = (32, 64)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    grad = gradient_stream(shape, 1, seed=2)[0] * 1e-4  # small gradients: eps matters
    group = {"rank": 4, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}
    ref = torch.nn.Parameter(w0.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(galore_torch.GaLoreAdamW([{"params": [ref], **group}], lr=1e-3), ref, [grad])
    errors = {}
    for compat in ("galore_torch", None):
        ours = torch.nn.Parameter(w0.clone())
        _run(osd.GaLoreAdamW([{"params": [ours], **group}], lr=1e-3, compat=compat), ours, [grad])
        errors[compat] = relative_error(ours.detach(), ref.detach(), w0)
    assert errors["galore_torch"] < 1e-5
    assert errors[None] > 1e-3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta1", [None, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_galore_adafactor_reproduces_galore_torch(shape, beta1, weight_decay: float) -> None:
    """galore_torch's Adafactor with an external lr, as it recommends (``relative_step=False,
    scale_parameter=False, warmup_init=False``), its ``eps=(1e-30, 1e-3)`` accepted as given.

    In float64: galore_torch's Adafactor decays before the update as ``W + (-lr wd) W``, torch's
    AdamW (whose rounding this library keeps for decay-before) as ``(1 - lr wd) W``; in float32
    that last-bit difference alone, on weights of norm ~1, is ~1e-5 of a 12-step update."""
    assert cases.galore_adafactor_error(_galore_torch(), shape, beta1, weight_decay) < 1e-5


def test_galore_torch_keywords_are_accepted_or_refused_with_what_to_use() -> None:
    p = torch.nn.Parameter(torch.zeros(8, 8))
    osd.GaLoreAdamW([p], lr=1e-3, correct_bias=True, no_deprecation_warning=True)
    with pytest.raises(ValueError, match="relative_step=True.*: this Adafactor takes an explicit learning rate.*relative_step=False"):
        osd.GaLoreAdafactor([p], lr=1e-3, relative_step=True)
    with pytest.raises(ValueError, match="lr=None: this Adafactor takes an explicit learning rate"):
        osd.GaLoreAdafactor([p], lr=None, relative_step=False, scale_parameter=False)
    with pytest.raises(ValueError, match="scale_parameter=True"):
        osd.GaLoreAdafactor([p], lr=1e-3, relative_step=False)  # galore_torch's default scale_parameter=True
    # pytorch_optimizer's key for proj_type
    opt = osd.GaLoreAdamW([{"params": [p], "rank": 2, "projection_type": "left"}], lr=1e-3)
    assert opt.param_groups[0]["proj_type"] == "left" and "projection_type" not in opt.param_groups[0]
    # the class name galore_torch users import
    opt = osd.GaLoreAdamW8bit([{"params": [p], "rank": 2}], lr=1e-3)
    assert opt.param_groups[0]["optim_bits"] == 8 and opt.param_groups[0]["weight_decay"] == 1e-2


def test_correct_bias_false_drops_the_bias_correction() -> None:
    """Without bias correction Adam's first step is ``(1 - b1) g / (sqrt(1 - b2) |g| + eps)``."""
    p = torch.nn.Parameter(torch.zeros(3, 5))
    g = torch.full((3, 5), 0.5)
    opt = osd.SubspaceOptimizer([p], lr=1.0, projector="identity", correct_bias=False, eps=0.0)
    _run(opt, p, [g])
    torch.testing.assert_close(p.detach(), torch.full((3, 5), -0.1 / math.sqrt(0.001)))


def test_foreign_keys_are_refused_naming_who_takes_them() -> None:
    p = torch.nn.Parameter(torch.zeros(8, 8))
    with pytest.raises(TypeError, match=r"'alpha' is a hyperparameter of projector 'online_pca'.*projector 'svd'"):
        osd.GaLoreAdamW([p], alpha=123)
    with pytest.raises(TypeError, match=r"'proj_optimizer' is a hyperparameter of projector 'online_pca'"):
        osd.GaLoreAdamW([{"params": [p], "rank": 2, "proj_optimizer": "lion"}])
    with pytest.raises(TypeError, match=r"'svd_until' is a hyperparameter of projector 'random'"):
        osd.OSDAdamW([p], svd_until=0.8)
    with pytest.raises(TypeError, match="svd_fraction was renamed svd_until"):
        osd.GoLoreAdamW([p], svd_fraction=0.2, total_steps=10)
    # a group may pick another projector, and gets that projector's keys
    opt = osd.GaLoreAdamW([{"params": [p], "rank": 2, "projector": "online_pca", "alpha": 2.0}])
    assert opt.param_groups[0]["alpha"] == 2.0 and opt.param_groups[0]["ortho_reg"] == 0.1


def test_golore_schedule_svd_until_then_random() -> None:
    """``svd_until=0.8`` over 10 steps with gap 2: SVD refreshes at steps 0..6, random at 8
    (GoLore's code: random once ``step >= rand_ratio * total``)."""
    grads = gradient_stream((12, 30), 10, seed=3)
    param = torch.nn.Parameter(torch.zeros(12, 30))
    opt = osd.GoLoreAdamW([{"params": [param], "rank": 3, "update_proj_gap": 2}], svd_until=0.8, total_steps=10)
    for step, grad in enumerate(grads):
        param.grad = grad
        opt.step()
        if step % 2 == 0:
            svd = torch.linalg.svd(grad, full_matrices=False)[0][:, :3]
            is_svd = torch.allclose(opt.state[param][PROJ].abs(), svd.abs(), atol=1e-5)
            assert is_svd == (step < 8), f"step {step}"


def test_p_weight_decay_as_the_paper_recommends() -> None:
    """``lambda^P = lambda^W`` through ``proj_optimizer_args``: P shrinks by ``1 - lr_P wd``
    more than without it."""
    grads = gradient_stream((12, 30), 2, seed=4)
    results = {}
    for wd in (0.0, 0.1):
        param = torch.nn.Parameter(torch.zeros(12, 30))
        opt = osd.OSDAdamW([{"params": [param], "rank": 3}], lr=1e-2, weight_decay=0.1, proj_optimizer_args={"weight_decay": wd})
        param.grad = grads[0]
        opt.step()
        before = opt.state[param][PROJ].clone()
        param.grad = grads[1]
        opt.step()
        results[wd] = (before, opt.state[param][PROJ].clone())
    (b0, a0), (b1, a1) = results[0.0], results[0.1]
    torch.testing.assert_close(b0, b1)
    torch.testing.assert_close(a1, a0 - 5 * 1e-2 * 0.1 * b0, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule", ["adamw", "lion"])
@pytest.mark.parametrize("shape", [(40, 96), (96, 40)])
def test_compat_osd_release_reproduces_the_released_code(rule: str, shape) -> None:
    """30 steps under warmup + cosine (peak 1e-2 reached at step 5), weight decay 0.1,
    scale 0.25, gap 200 (the released P learning rate), float64 gradients: W and P within
    1e-5 of the released behaviour, relative to their cumulative updates."""
    weight_error, proj_error, proj_moved = cases.osd_release_errors(rule, shape)
    assert proj_moved > 1e-3, "the reference's P did not move: the test would prove nothing"
    assert weight_error < 1e-5 and proj_error < 1e-5, (weight_error, proj_error)


def test_osd_train_optimizer_args_reach_the_optimizer() -> None:
    """``--optimizer-args`` passes any key the chosen rule, projector and optimizer take, and
    GoLore's switch gets the run's length as ``total_steps``."""
    from osd.config import ConfigError, TrainConfig, build_parser, config_from_args
    from osd.train import build_optimizer

    model = torch.nn.ModuleDict({"mlp": torch.nn.Linear(16, 24), "attn": torch.nn.Linear(16, 16), "head": torch.nn.Linear(16, 4)})
    argv = ["--optimizer", "golore_adamw", "--steps", "50", "--rank", "4", "--optimizer-args",
            "betas=(0.9,0.95),eps=1e-6,proj_type=left,svd_until=0.8,compat=osd_release,target_modules=('mlp',)"]
    config = config_from_args(build_parser().parse_args(argv))
    optimizer = build_optimizer(config, model)
    projected = next(g for g in optimizer.param_groups if g["rank"] is not None)
    assert projected["betas"] == (0.9, 0.95) and projected["eps"] == 1e-6 and projected["proj_type"] == "left"
    assert projected["svd_until"] == 0.8 and projected["total_steps"] == 50
    assert projected["eps_placement"] == "hf" and projected["decay_after_update"]  # compat's, for the keys not given
    assert projected["param_names"] == ["mlp.weight"]
    config = TrainConfig(optimizer="osd_adamw", optimizer_args="proj_optimizer_args.weight_decay=0.1,max_lr=0.02")
    projected = next(g for g in build_optimizer(config, model).param_groups if g["rank"] is not None)
    assert projected["proj_optimizer_args"] == {"weight_decay": 0.1} and projected["max_lr"] == 0.02
    with pytest.raises(ConfigError, match=r"galore_adamw \(rule 'adamw', projector 'svd'\) takes no key 'alpha'|'alpha' has its own flag"):
        TrainConfig(optimizer="galore_adamw", optimizer_args="alpha=2")
    with pytest.raises(ConfigError, match=r"galore_adamw \(rule 'adamw', projector 'svd'\) takes no key 'svd_until'"):
        TrainConfig(optimizer="galore_adamw", optimizer_args="svd_until=0.8")
    with pytest.raises(ConfigError, match="expected key=value"):
        TrainConfig(optimizer="galore_adamw", optimizer_args="betas")
