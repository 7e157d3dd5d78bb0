"""Bad input gets an error that names the problem; non-finite gradients poison nothing."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import osd
from osd.state_layout import PROJ, is_projected


def matrix(shape=(8, 12), seed: int = 0) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rank": 0}, "rank must be a positive int"),
        ({"rank": -3}, "rank must be a positive int"),
        ({"rank": 2.5}, "rank must be a positive int"),
        ({"rank": True}, "rank must be a positive int"),
        ({"rank": "4"}, "rank must be a positive int"),
        ({"lr": -1e-3}, "lr must be a number >= 0"),
        ({"betas": (1.0, 0.999)}, r"betas\[0\] must be in \[0, 1\)"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\] must be in \[0, 1\)"),
        ({"betas": 0.9}, "betas must be a pair"),
        ({"eps": -1.0}, "eps must be a number >= 0"),
        ({"weight_decay": -0.1}, "weight_decay must be a number >= 0"),
        ({"alpha": 0.0}, "alpha .* must be > 0"),
        ({"alpha": -5}, "alpha .* must be > 0"),
        ({"ortho_reg": -0.1}, "ortho_reg .* must be >= 0"),
        ({"update_proj_gap": 0}, "update_proj_gap must be a positive int"),
        ({"scale": 0.0}, "scale must be a number > 0"),
        ({"proj_type": "full"}, "proj_type must be one of"),
        ({"proj_optimizer": "adagrad"}, "unknown proj_optimizer 'adagrad'"),
        ({"proj_optimizer_args": {"momentum": 0.5}}, "proj_optimizer_args has keys \\['momentum'\\]"),
        ({"proj_lr_rule": "cosine"}, "proj_lr_rule must be one of"),
        ({"projector": "qr"}, "unknown projector 'qr'"),
        ({"rule": "adagrad"}, "unknown update rule 'adagrad'"),
        ({"projector": "random", "svd_until": 0.2}, "svd_until > 0 needs total_steps"),
        ({"projector": "random", "svd_until": 1.5, "total_steps": 10}, r"svd_until .* must be in \[0, 1\]"),
        ({"nonfinite": "ignore"}, "nonfinite must be one of"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs: dict, message: str) -> None:
    kwargs = {"rank": 4, **kwargs}
    rank = kwargs.pop("rank")
    with pytest.raises(ValueError, match=message):
        osd.SubspaceOptimizer([{"params": [matrix()], "rank": rank}], **kwargs)


def test_bad_group_added_later_is_refused_and_not_kept() -> None:
    opt = osd.OSDAdamW([matrix()], lr=1e-3)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        opt.add_param_group({"params": [matrix(seed=1)], "rank": 0})
    assert len(opt.param_groups) == 1


def test_rule_specific_errors() -> None:
    with pytest.raises(ValueError, match="sign_space must be one of"):
        osd.OSDLion([matrix()], sign_space="both")
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        osd.SubspaceOptimizer([matrix()], rule="sgd", momentum=0.0, nesterov=True)
    with pytest.raises(TypeError, match=r"'betas' is a hyperparameter of rule 'adamw' and rule 'lion', not of this optimizer \(rule 'adafactor'"):
        osd.OSDAdafactor([matrix()], betas=(0.9, 0.99))
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['bettas'\] for rule 'adafactor'"):
        osd.OSDAdafactor([matrix()], bettas=(0.9, 0.99))
    opt = osd.GaLoreAdamW([matrix()])
    with pytest.raises(TypeError, match=r"param group: unknown hyperparameter\(s\) \['rnak'\] for rule 'adamw' and projector 'svd'"):
        opt.add_param_group({"params": [matrix(seed=1)], "rnak": 2})
    opt.add_param_group({"params": [matrix(seed=1)], "rank": 2, "initial_lr": 1e-3})  # what LR schedulers record is taken
    with pytest.raises(ValueError, match="unknown optimizer 'osd_adam'"):
        osd.create_optimizer(torch.nn.Linear(4, 4), "osd_adam", lr=1e-3, rank=2)
    with pytest.raises(ValueError, match=r"fused=True is not supported.*no fused kernel"):
        osd.OSDAdamW([matrix()], fused=True)
    with pytest.raises(ValueError, match=r"maximize=True is not supported.*negate the loss"):
        osd.SubspaceOptimizer([{"params": [matrix()], "rank": 2, "maximize": True}])


def test_sparse_and_complex_gradients_are_refused() -> None:
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = osd.OSDAdamW([{"params": [emb.weight], "rank": 2}], lr=1e-3)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()
    with pytest.raises(ValueError, match="complex parameter"):
        osd.OSDAdamW([torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))])


def test_non_2d_parameter_in_rank_group_falls_back_to_full_rank_with_a_warning() -> None:
    vector, conv = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(4, 3, 2, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = osd.OSDAdamW([{"params": [vector, conv], "rank": 2}, {"params": [torch.nn.Parameter(torch.randn(3))], "rank": 2}], lr=1e-3)
    assert len(caught) == 1, [str(w.message) for w in caught]  # one summary, not one per bias or norm
    assert "3 parameter(s) in groups with a rank are not 2-D" in str(caught[0].message)
    assert "they train full-rank" in str(caught[0].message)
    vector.grad, conv.grad = torch.randn(6), torch.randn(4, 3, 2, 2)
    opt.step()
    assert opt.state[conv]["exp_avg"].shape == conv.shape and not is_projected(opt.state[conv])


def test_torch_optim_conventions() -> None:
    """NumPy scalars are numbers; torch.optim's switches are accepted where they mean nothing here."""
    import numpy as np

    a, b = matrix(), matrix()
    ours = osd.OSDAdamW([{"params": [a], "rank": 2}], lr=np.float32(1e-3), betas=(np.float64(0.9), np.float32(0.99)),
                        weight_decay=np.float32(0.1), foreach=True, fused=None, maximize=False, differentiable=False, capturable=False)
    f32 = lambda x: float(np.float32(x))  # noqa: E731 (the value a float32 scalar holds)
    ref = osd.OSDAdamW([{"params": [b], "rank": 2}], lr=f32(1e-3), betas=(0.9, f32(0.99)), weight_decay=f32(0.1))
    assert type(ours.param_groups[0]["lr"]) is float and ours.param_groups[0]["betas"] == ref.param_groups[0]["betas"]
    for p, opt in ((a, ours), (b, ref)):
        p.grad = torch.ones_like(p)
        opt.step()
    assert torch.equal(a, b)
    ours.add_param_group({"params": [matrix()], "rank": np.int64(2), "foreach": False})
    assert type(ours.param_groups[-1]["rank"]) is int
    for switch in ("differentiable", "capturable"):
        with pytest.raises(ValueError, match=f"{switch}=True is not supported"):
            osd.OSDAdamW([matrix()], **{switch: True})


def test_param_names_appear_in_errors() -> None:
    model = torch.nn.Linear(6, 4)
    opt = osd.OSDAdamW(model.named_parameters(), lr=1e-3)
    model.weight.grad = torch.full((4, 6), float("nan"))
    model.bias.grad = torch.zeros(4)
    with pytest.raises(FloatingPointError, match="'weight'"):
        opt.step()


@pytest.mark.parametrize("projector", ["online_pca", "svd", "random", "identity"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_and_leaves_everything_untouched(projector: str, bad: float) -> None:
    param = matrix()
    opt = osd.SubspaceOptimizer([{"params": [param], "rank": 3}], projector=projector, lr=1e-2)
    param.grad = torch.randn(8, 12)
    opt.step()
    before = param.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[param].items()}
    param.grad = torch.randn(8, 12)
    param.grad[2, 3] = bad
    with pytest.raises(FloatingPointError, match=r"non-finite gradient .* shape \(8, 12\)"):
        opt.step()
    assert torch.equal(param, before[0])
    for key, value in opt.state[param].items():
        assert torch.equal(value, before[1][key]) if torch.is_tensor(value) else value == before[1][key]


def test_finite_gradient_whose_sum_overflows_steps_like_torch_adamw() -> None:
    """Full-rank parameters on torch's fused kernel are checked by a sum; a sum that overflows
    on finite values (here 3e38 + 3e38) must not be called non-finite."""
    ours, theirs = matrix(seed=3), matrix(seed=3)
    grad = torch.randn(8, 12)
    grad[0, :2] = 3e38
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    osd.SubspaceOptimizer([ours], projector="identity", lr=1e-2).step()
    torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.0, fused=True).step()
    assert torch.isinf(grad.sum()) and torch.equal(ours, theirs)


def test_nonfinite_gradient_skip_policy_skips_the_whole_step() -> None:
    good, poisoned = matrix(seed=1), matrix(seed=2)
    opt = osd.OSDAdamW([{"params": [good, poisoned], "rank": 3}], lr=1e-2, nonfinite="skip")
    good.grad, poisoned.grad = torch.randn(8, 12), torch.randn(8, 12)
    opt.step()
    snapshot = [p.detach().clone() for p in (good, poisoned)], [opt.state[p][PROJ].clone() for p in (good, poisoned)]
    good.grad, poisoned.grad = torch.randn(8, 12), torch.full((8, 12), float("nan"))
    opt.step()
    assert opt.skipped_steps == 1
    for p, weight, proj in zip((good, poisoned), *snapshot):
        assert torch.equal(p, weight) and torch.equal(opt.state[p][PROJ], proj) and opt.state[p]["step"] == 1
    poisoned.grad = torch.randn(8, 12)
    opt.step()
    assert all(torch.isfinite(p).all() and opt.state[p]["step"] == 2 for p in (good, poisoned))


def test_unchecked_policy_reads_no_gradient_twice_and_steps_like_torch() -> None:
    """``nonfinite="unchecked"``: with finite gradients the same steps as the checked default,
    bit for bit, without the check's ``sum`` over the fused-kernel gradients or its device
    synchronisation; a NaN gradient goes through as in ``torch.optim.AdamW(fused=True)``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    def run(policy: str, ops: Ops | None = None) -> list[torch.Tensor]:
        weight, vector = matrix(seed=4), torch.nn.Parameter(torch.randn(12, generator=torch.Generator().manual_seed(6)))
        opt = osd.OSDAdamW([{"params": [weight], "rank": 3}, {"params": [vector]}], lr=1e-2, nonfinite=policy)
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            weight.grad, vector.grad = torch.randn(8, 12, generator=generator), torch.randn(12, generator=generator)
            with ops or contextlib.nullcontext():
                opt.step()
        return [weight.detach(), vector.detach()]

    checked, unchecked = Ops(), Ops()
    assert all(torch.equal(a, b) for a, b in zip(run("raise", checked), run("unchecked", unchecked)))
    assert "sum.default" in checked.names and "sum.default" not in unchecked.names
    assert "_local_scalar_dense.default" in checked.names and "_local_scalar_dense.default" not in unchecked.names
    ours, theirs = matrix(seed=5), matrix(seed=5)
    grad = torch.randn(8, 12)
    grad[1, 2] = float("nan")
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    osd.SubspaceOptimizer([ours], projector="identity", lr=1e-2, nonfinite="unchecked").step()
    torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.0, fused=True).step()
    assert torch.isnan(ours[1, 2]) and torch.equal(ours.nan_to_num(), theirs.nan_to_num())


def test_rank_at_least_the_smaller_side_is_exact_full_rank() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for rank in (8, 100):
            param = matrix()
            opt = osd.GaLoreAdamW([{"params": [param], "rank": rank}], lr=1e-2)
            param.grad = torch.randn(8, 12)
            opt.step()
            assert not is_projected(opt.state[param]) and opt.state[param]["exp_avg"].shape == (8, 12)
