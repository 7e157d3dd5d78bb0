"""Which weights are projected: split a model's parameters into projected and full-rank groups.

Targets are named as ``transformers.TrainingArguments.optim_target_modules`` names them, and
the same everywhere (:func:`param_groups`, :func:`osd.create_optimizer`, :mod:`osd.hf`):

- ``"blocks"`` (default): every matrix-shaped linear map of the model (``nn.Linear``,
  ``transformers``' ``Conv1D``) except the input embeddings and the output head; for a
  LLaMA, the seven matrices of each decoder layer (``q, k, v, o, gate, up, down``), as in
  the papers; for GPT-2, ``c_attn, c_proj, c_fc, c_proj``; for an ``nn.Sequential``, every
  ``nn.Linear``;
- ``"all-linear"``: every ``nn.Linear`` / ``Conv1D``, the output head included (as in transformers);
- any other string: a regular expression that must match a whole module name;
- a sequence of strings: module names equal to, containing, or fully matching (as a regular
  expression) any of them.

A selected module's ``weight`` is projected. ``Conv1D`` stores its weight transposed
(``in x out``, ``y = x W``); with the default ``proj_type="std"`` the projector acts on the
smaller side whatever the orientation, so both layouts get the same subspace step.

:func:`optimizer_groups` adds the policies every factory shares (``osd.create_optimizer``,
the Hugging Face route, ``osd train``, ``osd memory``, the benchmarks): float32 states for
the embeddings under 8-bit states, the matrices-only split of a rule like Muon, and the
decay policy.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from osd.rules import get_rule

__all__ = ["TARGET_PRESETS", "default_rank", "param_groups", "optimizer_groups", "projected_modules", "describe"]

TARGET_PRESETS = ("blocks", "all-linear")
RANK_FRACTION = 4  # the papers' ranks are a quarter of the hidden size (60m: 512 -> 128, 1b: 2048 -> 512)

Targets = str | Sequence[str]


def _is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, or ``transformers.pytorch_utils.Conv1D`` (GPT-2's transposed linear)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers") and module.weight.dim() == 2


def _embedding_ids(model: nn.Module) -> set[int]:
    """``id``s of the input embeddings and the output head (``nn.Embedding`` weights and what
    ``get_input_embeddings`` / ``get_output_embeddings`` return)."""
    ids = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter)() if hasattr(model, getter) else None
        if module is not None and getattr(module, "weight", None) is not None:
            ids.add(id(module.weight))
    return ids


def _matches(targets: Targets, name: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(t == name or t in name or re.fullmatch(t, name) is not None for t in targets)


def projected_modules(model: nn.Module, targets: Targets = "blocks") -> dict[str, nn.Module]:
    """The linear modules (``nn.Linear``, ``Conv1D``) whose weights ``targets`` selects, by qualified name.

    Raises ``ValueError`` if ``targets`` is malformed or selects nothing.
    """
    if not targets or (not isinstance(targets, str) and not all(isinstance(t, str) and t for t in targets)):
        raise ValueError(f"target_modules must be 'blocks', 'all-linear', a regex or a non-empty list of names, got {targets!r}")
    linear = {name: module for name, module in model.named_modules() if _is_linear(module)}
    if targets == "blocks":
        embeddings = _embedding_ids(model)
        chosen = {name: module for name, module in linear.items() if id(module.weight) not in embeddings}
    elif isinstance(targets, str) and targets.replace("_", "-") == "all-linear":
        chosen = linear
    else:
        chosen = {name: module for name, module in linear.items() if _matches(targets, name)}
    if not chosen:
        raise ValueError(
            f"target_modules {targets!r} selects no linear module (nn.Linear or Conv1D) of {type(model).__name__}; "
            f"its linear modules: {list(linear)[:8]}{' ...' if len(linear) > 8 else ''}"
        )
    return chosen


def default_rank(shape: Sequence[int]) -> int:
    """The rank a weight of ``shape`` gets when none is given: a quarter of its smaller side
    (at least 1), the ratio of every rank in the GaLore and OSD papers' LLaMA runs."""
    return max(1, min(shape) // RANK_FRACTION)


def param_groups(
    model: nn.Module,
    rank: int | None = None,
    target_modules: Targets = "blocks",
    **group_keys: Any,
) -> list[dict[str, Any]]:
    """Param groups for ``model``: projected weights (one group per rank) and the rest.

    The weights selected by ``target_modules`` (see the module docstring) go into groups with
    ``rank`` (default: :func:`default_rank` of each weight's shape; one group per distinct
    rank) and ``group_keys`` (e.g. ``update_proj_gap``, ``scale``); everything else
    (embeddings, the head, norms, biases) goes into a last, full-rank group. Parameters are
    passed with their names, so optimizer errors can name them; shared (tied) parameters
    appear once; frozen ones are left out. Raises ``ValueError`` if no module matches; warns
    when a given ``rank`` is at least the smaller side of some of the selected weights (those
    train full-rank).
    """
    weights = {id(module.weight) for module in projected_modules(model, target_modules).values()}
    by_rank: dict[int, list[tuple[str, nn.Parameter]]] = {}
    full_rank = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in weights:
            by_rank.setdefault(rank if rank is not None else default_rank(param.shape), []).append((name, param))
        else:
            full_rank.append((name, param))
    if rank is not None:
        _notice_full_rank([p for params in by_rank.values() for p in params], rank)
    groups = [{"params": params, "rank": r, **group_keys} for r, params in by_rank.items()]
    if full_rank:
        groups.append({"params": full_rank})
    return groups


def optimizer_groups(
    model: nn.Module,
    rule: str = "adamw",
    rank: int | None = None,
    target_modules: Targets = "blocks",
    *,
    project: bool = True,
    optim_bits: int = 32,
    decay_vectors: bool = True,
) -> list[dict[str, Any]]:
    """The param groups of an optimizer with inner rule ``rule`` for ``model``, by one policy.

    1. ``project``: :func:`param_groups` (the weights ``target_modules`` selects, at ``rank``,
       and a full-rank group); else one full-rank group of every parameter.
    2. ``decay_vectors=False``: the full-rank group's vectors (biases, norm gains) go to a
       group of their own with ``weight_decay=0.0`` (the Hugging Face Trainer's policy).
    3. ``optim_bits != 32``: the input and output embeddings go to a last group with
       ``optim_bits=32``, as bitsandbytes recommends for 8-bit optimizers: rows of a
       vocabulary-sized matrix that rarely see a gradient get second moments too small for
       their block's 8-bit range and divide by ~0 (a tiny LLaMA on C4 diverged here with
       8-bit embedding states).
    4. A rule that updates matrices only (Muon): what it should not take (vectors, the
       embeddings, as Muon's authors advise) goes to groups with ``rule="adamw"``.

    Parameters are ``(name, parameter)`` pairs; empty groups are dropped.
    """
    groups = param_groups(model, rank=rank, target_modules=target_modules) if project else [{"params": list(model.named_parameters())}]
    embeddings = _embedding_ids(model)
    if not decay_vectors:
        groups = [split for group in groups for split in _vectors_apart(group)]
    if optim_bits != 32:
        kept = [(n, p) for group in groups for n, p in group["params"] if id(p) in embeddings]
        groups = [{**group, "params": [(n, p) for n, p in group["params"] if id(p) not in embeddings]} for group in groups]
        groups.append({"params": kept, "optim_bits": 32})
    if get_rule(rule).matrices_only:
        other = lambda p: p.dim() != 2 or id(p) in embeddings  # noqa: E731
        groups = [
            split
            for group in groups
            for split in (
                {**group, "params": [(n, p) for n, p in group["params"] if not other(p)]},
                {**{k: v for k, v in group.items() if k != "rank"}, "params": [(n, p) for n, p in group["params"] if other(p)], "rule": "adamw"},
            )
        ]
    return [group for group in groups if group["params"]]


def _vectors_apart(group: dict[str, Any]) -> list[dict[str, Any]]:
    """A full-rank group as its matrices and its vectors, the vectors without weight decay."""
    if "rank" in group:
        return [group]
    return [
        {**group, "params": [(n, p) for n, p in group["params"] if p.dim() >= 2]},
        {**group, "params": [(n, p) for n, p in group["params"] if p.dim() < 2], "weight_decay": 0.0},
    ]


def describe(groups: Sequence[dict[str, Any]]) -> str:
    """One line: how many weights are projected, at what rank, and how many train full-rank.

    ``groups`` are param groups (:func:`param_groups`'s, or an optimizer's ``param_groups``);
    a 2-D weight in a group with a ``rank`` is projected unless the rank reaches its smaller side.
    """
    projected: dict[int, list[int]] = {}
    full = 0
    for group in groups:
        for param in group["params"]:
            param = param[1] if isinstance(param, tuple) else param
            rank = group.get("rank")
            if rank is not None and param.dim() == 2 and rank < min(param.shape):
                projected.setdefault(rank, []).append(param.numel())
            else:
                full += param.numel()
    count = sum(len(sizes) for sizes in projected.values())
    total = sum(map(sum, projected.values())) + full
    ranks = ", ".join(f"{len(projected[r])} at rank {r}" for r in sorted(projected))
    share = sum(map(sum, projected.values())) / max(total, 1)
    return (
        f"projected {count} weight matrices ({ranks or 'none'}; {share:.0%} of {total:,} parameters); "
        f"the other {full:,} parameters train full-rank"
    )


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
