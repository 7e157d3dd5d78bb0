"""The facts that rules and projectors state about themselves hold for what they do, and the
lists other modules used to keep by hand are derived from them."""

from __future__ import annotations

import pytest
import torch

import osd
from osd import sharded, spread
from osd.presets import METHODS
from osd.projectors import PROJECTORS
from osd.rules import RULES
from osd.state_layout import PROJ
from tests.helpers import gradient_stream


def _updates(rule: str, blocks: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """``W - W_0`` after stepping each row block of ``W`` as a parameter of its own (full-rank)."""
    params = [torch.nn.Parameter(block.clone()) for block in blocks]
    opt = osd.SubspaceOptimizer(params, lr=1e-2, rule=rule, projector="identity")
    for G in grads:
        for p, g in zip(params, G.split([b.shape[0] for b in blocks])):
            p.grad = g.clone()
        opt.step()
    return torch.cat([p.detach() - b for p, b in zip(params, blocks)])


@pytest.mark.parametrize("rule", sorted(RULES))
def test_elementwise_rules_step_row_shards_as_the_whole(rule: str) -> None:
    """What ``UpdateRule.elementwise`` promises FSDP2 (osd.sharded): stepping the row shards of a
    weight apart gives the update of the whole; the rules that are not elementwise differ."""
    W = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    grads = list(gradient_stream((8, 6), steps=3, seed=1))
    whole = _updates(rule, [W], grads)
    shards = _updates(rule, list(W.split([3, 5])), grads)
    assert whole.abs().max() > 1e-4
    if RULES[rule].elementwise:
        torch.testing.assert_close(shards, whole, rtol=1e-5, atol=1e-7)
    else:
        assert (shards - whole).abs().max() > 1e-4 * whole.abs().max()
    assert sharded.keeps_shards(rule, projected=False) == RULES[rule].elementwise
    assert not sharded.keeps_shards(rule, projected=True)


@pytest.mark.parametrize("name", sorted(n for n, p in PROJECTORS.items() if p.projects))
def test_projectors_move_P_as_they_say(name: str) -> None:
    """``refreshes_periodically``: ``P`` changes at steps 0, T, 2T ... only; ``moves_every_step``:
    at every step after the first."""
    projector, gap = PROJECTORS[name], 3
    W = torch.nn.Parameter(torch.zeros(12, 20))
    opt = osd.SubspaceOptimizer([{"params": [W], "rank": 3}], lr=1e-2, projector=name, update_proj_gap=gap)
    moved = []  # whether P changed in steps 1, 2, ... (step 0 creates it)
    for step, G in enumerate(gradient_stream((12, 20), steps=7, seed=2)):
        W.grad = G
        before = opt.state[W][PROJ].clone() if step else None
        opt.step()
        if before is not None:
            moved.append(not torch.equal(opt.state[W][PROJ], before))
    if projector.moves_every_step:
        assert all(moved), moved
    else:
        assert moved == [step % gap == 0 for step in range(1, 7)], moved
    assert projector.refreshes_periodically == (not projector.moves_every_step)


def test_the_lists_other_modules_read_come_from_the_registries() -> None:
    assert METHODS == {"osd": "online_pca", "galore": "svd", "golore": "random", "osd_sketch": "sketch_pca"}
    assert set(spread.SPREAD_PROJECTORS) == {"svd", "random"}
    assert osd.SubspaceOptimizer([torch.zeros(2, 2)], rule="lion").defaults["lr"] == RULES["lion"].default_lr
