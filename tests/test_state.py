"""Optimizer state: low-rank shapes, byte counts, weights_only state_dicts and exact resume."""

from __future__ import annotations

import io

import pytest
import torch

import osd
from osd.state_layout import PROJ, is_projected
from tests.helpers import gradient_stream

RULES = ["adamw", "lion", "adafactor", "sgd", "muon"]
PROJECTORS = ["online_pca", "svd", "random", "identity", "sketch_pca"]
# Options of every projector (osd.transport, osd.compensation), one at a time.
OPTIONS = {
    "transport_first": {"moment_transport": "first"},
    "transport_nonnegative": {"moment_transport": "nonnegative"},
    "transport_reset": {"moment_transport": "reset"},
    "fira": {"compensation": "fira"},
    "apollo_tensor": {"compensation": "apollo", "compensation_granularity": "tensor"},
}


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    """A tall and a wide matrix (both orientations), a square one and a vector."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(48, 20), (20, 48), (16, 16), (20,)]]


def make_optimizer(params, rule: str, projector: str, **kwargs) -> osd.SubspaceOptimizer:
    matrices, vector = params[:3], params[3:]
    # Muon takes matrices only: the vector goes to AdamW, as osd.create_optimizer does.
    groups = [{"params": matrices, "rank": 6, "update_proj_gap": 3}, {"params": vector, **({"rule": "adamw"} if rule == "muon" else {})}]
    return osd.SubspaceOptimizer(groups, lr=1e-2, rule=rule, projector=projector, weight_decay=0.01, **kwargs)


def run(opt: torch.optim.Optimizer, params, grads_per_param, steps: range) -> None:
    for t in steps:
        for p, grads in zip(params, grads_per_param):
            p.grad = grads[t].clone()
        opt.step()


def streams(params, steps: int):
    return [gradient_stream(tuple(p.shape), steps, seed=100 + i) for i, p in enumerate(params)]


@pytest.mark.parametrize("projector", ["online_pca", "svd", "random", "sketch_pca"])
def test_state_is_low_rank_in_both_orientations(projector: str) -> None:
    params = make_params()
    opt = make_optimizer(params, "adamw", projector)
    run(opt, params, streams(params, 2), range(2))
    for p in params[:2]:  # 48x20 and 20x48, rank 6 < 20
        state = opt.state[p]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (6, 48)
        assert state[PROJ].shape == (20, 6)
    assert opt.state[params[3]]["exp_avg"].shape == (20,)
    bytes_ = osd.state_bytes(opt)
    expected_moments = sum(
        v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")
    )
    assert bytes_["moments"] == expected_moments
    assert bytes_["projection"] == (2 * 20 * 6 + 16 * 6) * 4
    sketches = (2 * 20 * 12 + 16 * 12) * 4  # m x 2r per weight
    expected_proj_optimizer = {"online_pca": 2 * bytes_["projection"], "sketch_pca": 2 * bytes_["projection"] + sketches}
    assert bytes_["proj_optimizer"] == expected_proj_optimizer.get(projector, 0)
    assert bytes_["total"] == bytes_["moments"] + bytes_["projection"] + bytes_["proj_optimizer"]


def test_state_bytes_of_a_torch_optimizer_counts_its_moments() -> None:
    params = make_params()
    opt = torch.optim.AdamW(params)
    run(opt, params, streams(params, 1), range(1))
    numel = sum(p.numel() for p in params)
    assert osd.state_bytes(opt)["moments"] == 2 * 4 * numel + 4 * len(params)  # + the step tensors


def save_and_load(obj) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_bytes_counts_the_compensation_limiter() -> None:
    params = make_params()
    plain, compensated = make_optimizer(params, "adamw", "svd"), make_optimizer(make_params(), "adamw", "svd", compensation="fira")
    run(plain, params, streams(params, 2), range(2))
    params = [p for group in compensated.param_groups for p in group["params"]]
    run(compensated, params, streams(params, 2), range(2))
    assert osd.state_bytes(compensated)["moments"] == osd.state_bytes(plain)["moments"] + 3 * 4  # one float32 per projected weight


@pytest.mark.parametrize("optim_bits", [32, 8])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("projector", PROJECTORS)
def test_resume_continues_bit_for_bit(rule: str, projector: str, optim_bits: int) -> None:
    """N steps == N/2 steps, save, weights_only load into a fresh optimizer, N/2 steps.

    The gap is 3 and N is 10, so the resumed half crosses SVD / random refreshes; an LR
    scheduler runs alongside and is resumed too. With ``optim_bits=8`` every state tensor
    is stored in 8 bits (``min_8bit_size=0``).
    """
    check_resume(rule, projector, optim_bits, {})


@pytest.mark.parametrize("optim_bits", [32, 8])
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("projector", ["online_pca", "svd", "random", "sketch_pca"])
def test_resume_continues_bit_for_bit_with_every_option(option: str, projector: str, optim_bits: int) -> None:
    if option == "transport_reset" and projector in ("online_pca", "sketch_pca"):
        pytest.skip("reset is refused with projectors that move P every step (tested in test_subspace_options)")
    check_resume("adamw", projector, optim_bits, OPTIONS[option])


def check_resume(rule: str, projector: str, optim_bits: int, options: dict) -> None:
    steps, half = 10, 5
    kwargs = {"total_steps": steps, "svd_until": 0.2} if projector == "random" else {}
    kwargs.update(options)
    if optim_bits == 8:
        kwargs.update(optim_bits=8, min_8bit_size=0)
    if rule == "adafactor":
        kwargs["beta1"] = 0.9
    reference = make_params()
    grads = streams(reference, steps)
    opt = make_optimizer(reference, rule, projector, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    for t in range(steps):
        run(opt, reference, grads, range(t, t + 1))
        sched.step()

    params = make_params()
    opt = make_optimizer(params, rule, projector, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    for t in range(half):
        run(opt, params, grads, range(t, t + 1))
        sched.step()
    checkpoint = save_and_load({"opt": opt.state_dict(), "sched": sched.state_dict(), "params": [p.detach() for p in params]})

    resumed = [torch.nn.Parameter(w.clone()) for w in checkpoint["params"]]
    opt = make_optimizer(resumed, rule, projector, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    opt.load_state_dict(checkpoint["opt"])
    sched.load_state_dict(checkpoint["sched"])
    for t in range(half, steps):
        run(opt, resumed, grads, range(t, t + 1))
        sched.step()

    for expected, actual in zip(reference, resumed):
        assert torch.equal(expected, actual)


def test_state_dict_holds_only_tensors_and_plain_values() -> None:
    params = make_params()
    opt = make_optimizer(params, "adamw", "online_pca")
    run(opt, params, streams(params, 2), range(2))
    plain = (torch.Tensor, int, float, str, bool, type(None))

    def check(value, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                check(v, f"{where}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                check(v, f"{where}[{i}]")
        else:
            assert isinstance(value, plain), f"{where} is a {type(value).__name__}"

    check(opt.state_dict(), "state_dict")


def test_closure_zero_grad_and_add_param_group() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    opt = osd.OSDAdamW([{"params": [model[0].weight], "rank": 4}], lr=1e-2)
    opt.add_param_group({"params": [model[0].bias, model[2].weight, model[2].bias]})
    assert opt.param_groups[1]["rank"] is None and opt.param_groups[1]["projector"] == "online_pca"

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(50):
        last = opt.step(closure).item()
    assert last < 0.7 * first
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert is_projected(opt.state[model[0].weight]) and not is_projected(opt.state[model[2].weight])


def test_param_groups_selects_attention_and_mlp_linears() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 8)
            self.self_attn = torch.nn.Linear(8, 8)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))
            self.norm = torch.nn.LayerNorm(8)
            self.lm_head = torch.nn.Linear(8, 10, bias=False)

    groups = osd.param_groups(Block(), rank=2, target_modules=("attn", "mlp"), update_proj_gap=50)
    projected = dict(groups[0]["params"])
    full = dict(groups[1]["params"])
    assert set(projected) == {"self_attn.weight", "mlp.0.weight", "mlp.1.weight"}
    assert groups[0]["rank"] == 2 and groups[0]["update_proj_gap"] == 50
    assert "embed.weight" in full and "lm_head.weight" in full and "self_attn.bias" in full
    with pytest.raises(ValueError, match="selects no linear module"):
        osd.param_groups(Block(), rank=2, target_modules=("nothing",))
