"""Split a model's parameters into projected and full-rank param groups, as the papers do."""

from __future__ import annotations

import warnings
from typing import Any, Iterable

from torch import nn

__all__ = ["param_groups"]


def param_groups(
    model: nn.Module,
    rank: int,
    target_modules: Iterable[str] = ("attn", "mlp"),
    **group_keys: Any,
) -> list[dict[str, Any]]:
    """Two param groups for ``model``: projected weights and the rest.

    The weights of ``nn.Linear`` modules whose qualified name contains any of
    ``target_modules`` (LLaMA: ``self_attn.q_proj`` ... ``mlp.down_proj``) go into a group
    with ``rank`` and ``group_keys`` (e.g. ``update_proj_gap``, ``scale``); everything else
    (embeddings, ``lm_head``, norms, biases) goes into a full-rank group. Parameters are
    passed with their names, so optimizer errors can name them. Shared (tied) parameters
    appear once. Raises ``ValueError`` if no module matches; warns when ``rank`` is at least
    the smaller side of some of the selected weights (those train full-rank).
    """
    targets = tuple(target_modules)
    if isinstance(target_modules, str) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"target_modules must be a non-empty sequence of module-name substrings, got {target_modules!r}")
    projected_ids = {
        id(module.weight)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(t in name for t in targets)
    }
    if not projected_ids:
        raise ValueError(f"no nn.Linear module of {type(model).__name__} has a name containing any of {list(targets)}")
    projected, full_rank = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (projected if id(param) in projected_ids else full_rank).append((name, param))
    _notice_full_rank(projected, rank)
    groups = [{"params": projected, "rank": rank, **group_keys}]
    if full_rank:
        groups.append({"params": full_rank})
    return groups


def _notice_full_rank(projected: list[tuple[str, nn.Parameter]], rank: int) -> None:
    """Warn that weights with ``min(m, n) <= rank`` are selected for projection but train full-rank."""
    full = [(name, p) for name, p in projected if rank is not None and p.dim() == 2 and rank >= min(p.shape)]
    if full:
        name, p = full[0]
        every = "all" if len(full) == len(projected) else f"{len(full)} of the {len(projected)}"
        warnings.warn(
            f"rank {rank} is at least the smaller side of {every} projected weights (e.g. {name}: "
            f"{p.shape[0]}x{p.shape[1]}); they train full-rank, with full-size optimizer states",
            stacklevel=3,
        )
