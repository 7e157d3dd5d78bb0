"""A parameter's state in :class:`osd.optimizer.SubspaceOptimizer`: created before its first
step from its parts (projector, compensation, inner rule), and checked when a saved one is
loaded. The keys and the 8-bit storage: :mod:`osd.state_layout`.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from osd import compensation, sharded, state_layout
from osd.hyperparams import param_name
from osd.projectors import get_projector
from osd.rules import RULES
from osd.state_layout import PROJ, RANK, SEED, TRANSPOSED, canonical

__all__ = ["projects", "working_grad", "steps_in_torch", "init_state", "before_load", "after_load"]


def projects(group: dict[str, Any], p: Tensor) -> bool:
    """Whether ``p`` is (or, before its first step, will be) trained in a subspace."""
    rank = group["rank"]
    return get_projector(group["projector"]).projects and rank is not None and p.dim() == 2 and rank < min(p.shape)


def working_grad(group: dict[str, Any], grad: Tensor, projected: bool) -> Tensor:
    """``grad``; a sharded (FSDP2) one is gathered whole unless its rule runs on shards
    (see :mod:`osd.sharded`)."""
    return grad if sharded.keeps_shards(group["rule"], projected) else sharded.full(grad)


def steps_in_torch(group: dict[str, Any], p: Tensor, state: dict[str, Any] | None, hparams: dict[str, Any] | None = None) -> bool:
    """Whether ``p`` (with ``state``, None before its first step) steps through its rule's torch
    kernels (``UpdateRule.torch_step``): a full-rank, unsharded parameter with float32 states,
    no per-parameter clipping and torch's decay-before-update, whose rule torch computes with
    these hyperparameters (``hparams``: the rule's, when the caller has read them already)."""
    rule = RULES[group["rule"]]
    return (
        rule.torch_step is not None
        and not (state_layout.is_projected(state) if state else projects(group, p))
        and group["max_grad_norm"] is None
        and not group["decay_after_update"]
        and (group["optim_bits"] == 32 or p.numel() < max(group["min_8bit_size"], 1))
        and not isinstance(p, DTensor)
        and rule.torch_step_allows(rule.hparams(group) if hparams is None else hparams)
    )


def _fresh(group: dict[str, Any], p: Tensor, grad: Tensor, index: int) -> dict[str, Any]:
    """The projector's state (``P`` ...), the compensation's and the inner rule's (moments) of
    the ``index``-th parameter ``p`` whose first gradient is ``grad``, all in float."""
    projected = projects(group, p)
    state: dict[str, Any] = {"step": 0, TRANSPOSED: projected and state_layout.transposed(p.shape, group["proj_type"])}
    if projected:
        state[RANK], state[SEED] = group["rank"], hash((group["seed"], index)) % (2**31)
    G = canonical(state, working_grad(group, grad, projected))
    get_projector(group["projector"] if projected else "identity").init_state(state, G, group["rank"], group)
    if projected:
        compensation.init_state(state, group, G)
    rule = RULES[group["rule"]]
    state.update(rule.init_state(G.new_empty(group["rank"], G.shape[1]) if projected else G, rule.hparams(group), ""))
    return state


def init_state(state: dict[str, Any], group: dict[str, Any], p: Tensor, grad: Tensor, index: int) -> None:
    """Fill the empty ``state`` of the ``index``-th parameter ``p`` (first gradient ``grad``),
    in 8 bits where ``group["optim_bits"] == 8``."""
    state.update(_fresh(group, p, grad, index))
    state_layout.store_8bit(state, group)


def _check_saved(group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless the saved ``state`` of ``p`` is finite and has the shapes this
    optimizer would create."""
    name = param_name(group, p)
    state_layout.check_finite(state, name)
    if "step" not in state:
        return
    if PROJ in state and (p.dim() != 2 or state.get(RANK) != group["rank"]):
        raise ValueError(f"the saved state of parameter {name} is projected at rank {state.get(RANK)}; this optimizer has rank {group['rank']} for its shape {tuple(p.shape)}")
    meta = torch.empty(p.shape, device="meta", dtype=p.dtype)
    # Shapes only: every basis method gives P the same shape, and "svd" has a meta kernel.
    expected = _fresh({**group, "svd_method": "svd"}, meta, meta, 0)
    if projects(group, p):
        expected[PROJ] = meta.new_empty(canonical(expected, meta).shape[0], group["rank"])
    state_layout.check_shapes(state, expected, name)


# The 8-bit tensors of the state dict being loaded, per optimizer, from before_load to after_load.
_EIGHT_BIT: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[dict[str, Tensor]]] = weakref.WeakKeyDictionary()


def before_load(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """``load_state_dict`` pre-hook: refuse a state that does not fit (``ValueError`` naming the
    parameter, nothing loaded): one saved by another rule, projector, rank, orientation, bit
    width or ``P`` optimizer (:data:`osd.state_layout.STATE_DEFINING_KEYS`), with other shapes,
    or non-finite. Keeps the 8-bit tensors aside for :func:`after_load`, since torch casts every
    state tensor but ``step`` to a floating parameter's dtype."""
    if state_layout.check_groups(state_dict, optimizer.param_groups, param_name):
        for group, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
            for p, saved_id in zip(group["params"], saved["params"]):
                _check_saved(group, p, state_dict["state"].get(saved_id, {}))
    saved_ids = [i for group in state_dict.get("param_groups", []) for i in group.get("params", [])]
    _EIGHT_BIT[optimizer] = [state_layout.eight_bit_entries(state_dict.get("state", {}).get(i, {})) for i in saved_ids]


def after_load(optimizer: torch.optim.Optimizer) -> None:
    """``load_state_dict`` post-hook: the 8-bit tensors as saved, on their parameter's device."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p, entries in zip(params, _EIGHT_BIT.pop(optimizer, [])):
        if entries:
            optimizer.state[p].update({key: value.to(device=p.device) for key, value in entries.items()})
