"""Named optimizers (``OSDAdamW``, ``GaLoreAdamW``, ...) and the name-based factory.

A name is ``<method>_<rule>``: the method picks the projection rule (``osd`` = online PCA,
``galore`` = SVD, ``golore`` = random) and the rule the inner optimizer (``adamw``,
``lion``, ``adafactor``, ``sgd``). A bare rule name (``adamw``, ``lion``, ...) is the
full-rank optimizer; ``adamw`` is ``torch.optim.AdamW`` itself.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
from torch import nn

from osd.param_groups import Targets, param_groups
from osd.optimizer import DEFAULT_LR, SUBSPACE_DEFAULTS, SubspaceOptimizer
from osd.projectors import PROJECTORS
from osd.rules import RULES

__all__ = [
    "METHODS",
    "OSDAdamW",
    "GaLoreAdamW",
    "GoLoreAdamW",
    "OSDLion",
    "GaLoreLion",
    "GoLoreLion",
    "OSDAdafactor",
    "GaLoreAdafactor",
    "OSDSGD",
    "GaLoreSGD",
    "GaLoreAdamW8bit",
    "OSDAdamW8bit",
    "optimizer_names",
    "create_optimizer",
]

# Method name (the prefix of an optimizer name) -> projector, from the projectors themselves.
METHODS: dict[str, str] = {projector.method: name for name, projector in PROJECTORS.items() if projector.method}


# The conventions each method's named classes default to (see osd.compat): GaLore's and
# GoLore's reference codes are galore_torch's HF-style AdamW; OSD's classes keep torch's.
METHOD_COMPAT: dict[str, str | None] = {"osd": None, "galore": "galore_torch", "golore": "galore_torch", "osd_sketch": None}


def _named(class_name: str, method: str, rule: str, **class_defaults: Any) -> type[SubspaceOptimizer]:
    projector = METHODS[method]

    def __init__(self, params: Iterable[Any], lr: float | None = None, *, compat: str | None = METHOD_COMPAT[method], **kwargs: Any) -> None:
        SubspaceOptimizer.__init__(self, params, lr, rule=rule, projector=projector, compat=compat, **{**class_defaults, **kwargs})

    conventions = f"``compat={METHOD_COMPAT[method]!r}``" + (f", {class_defaults}" if class_defaults else "")
    doc = (
        f"{class_name}: the ``{rule}`` rule in a subspace moved by the ``{projector}`` projector.\n\n"
        f"Same as ``SubspaceOptimizer(params, lr, rule={rule!r}, projector={projector!r}, **kwargs)`` with the "
        f"defaults {conventions} (see :mod:`osd.compat`); param groups with a ``rank`` are projected, the others "
        f"train full-rank. Default lr: {DEFAULT_LR[rule]}."
    )
    return type(class_name, (SubspaceOptimizer,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


OSDAdamW = _named("OSDAdamW", "osd", "adamw")
GaLoreAdamW = _named("GaLoreAdamW", "galore", "adamw")
GoLoreAdamW = _named("GoLoreAdamW", "golore", "adamw")
OSDLion = _named("OSDLion", "osd", "lion")
GaLoreLion = _named("GaLoreLion", "galore", "lion")
GoLoreLion = _named("GoLoreLion", "golore", "lion")
OSDAdafactor = _named("OSDAdafactor", "osd", "adafactor")
GaLoreAdafactor = _named("GaLoreAdafactor", "galore", "adafactor")
OSDSGD = _named("OSDSGD", "osd", "sgd")
GaLoreSGD = _named("GaLoreSGD", "galore", "sgd")
# galore_torch's GaLoreAdamW8bit is bitsandbytes' AdamW8bit (eps 1e-8 on the bias-corrected
# sqrt(v), weight decay 0.01, applied after the update for projected weights): here, 8-bit
# block-wise states (osd.quantization) with those defaults.
_BNB_ADAMW8BIT = {"optim_bits": 8, "eps": 1e-8, "eps_placement": "torch", "weight_decay": 1e-2}
GaLoreAdamW8bit = _named("GaLoreAdamW8bit", "galore", "adamw", **_BNB_ADAMW8BIT)
OSDAdamW8bit = _named("OSDAdamW8bit", "osd", "adamw", optim_bits=8)


def optimizer_names() -> list[str]:
    """Every name :func:`create_optimizer` accepts."""
    return sorted(RULES) + [f"{method}_{rule}" for method in METHODS for rule in RULES]


def create_optimizer(
    model: nn.Module,
    name: str,
    lr: float | None = None,
    rank: int | None = None,
    target_modules: Targets = "blocks",
    torch_adamw: bool = True,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``.

    Subspace optimizers (``osd_adamw``, ``galore_lion``, ...) project the weights that
    ``target_modules`` selects (default: every linear map inside the blocks, not the
    embeddings or the head) at ``rank`` (default: a quarter of each weight's smaller side, the
    papers' ratio); see :mod:`osd.param_groups`. Everything else trains full-rank. ``lr``
    defaults to the rule's (:data:`osd.optimizer.DEFAULT_LR`: AdamW 1e-2). ``kwargs`` are the
    optimizer's hyperparameters (``weight_decay``, ``update_proj_gap``, ``scale``,
    ``optim_bits``, ...). ``adamw`` is ``torch.optim.AdamW`` unless ``torch_adamw=False``
    or a :class:`SubspaceOptimizer`-only option (8-bit states, per-parameter clipping) is
    given; then it is the same AdamW as a full-rank :class:`SubspaceOptimizer`.

    With ``optim_bits=8`` the input and output embeddings keep float32 states, as
    bitsandbytes recommends for 8-bit optimizers: rows of a vocabulary-sized matrix that
    rarely see a gradient get second moments too small for their block's 8-bit range,
    and divide by ~0 (a tiny LLaMA on C4 diverged here with 8-bit embedding states).

    Example: ``create_optimizer(model, "osd_adamw", rank=128)``.
    """
    method, _, rule = name.rpartition("_")
    if name not in optimizer_names():
        raise ValueError(f"unknown optimizer {name!r}; known: {optimizer_names()}")
    lr = DEFAULT_LR[rule] if lr is None else lr
    if not method:
        if rank is not None:
            raise ValueError(f"optimizer {name!r} is full-rank; rank={rank} applies only to osd_/galore_/golore_ optimizers")
        torch_keys = set(inspect.signature(torch.optim.AdamW).parameters) - {"params", "lr"}
        subspace_only = {k: v for k, v in kwargs.items() if k not in torch_keys and SUBSPACE_DEFAULTS.get(k, object()) != v}
        if name == "adamw" and torch_adamw and not subspace_only:
            return torch.optim.AdamW(model.parameters(), lr=lr, **{k: v for k, v in kwargs.items() if k in torch_keys})
        groups = [{"params": list(model.named_parameters())}]
        return SubspaceOptimizer(_matrices_apart(model, _embeddings_apart(model, groups, kwargs), rule), lr, rule=rule, projector="identity", **kwargs)
    groups = param_groups(model, rank=rank, target_modules=target_modules)
    return SubspaceOptimizer(_matrices_apart(model, _embeddings_apart(model, groups, kwargs), rule), lr, rule=rule, projector=METHODS[method], **kwargs)


def _matrices_apart(model: nn.Module, groups: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    """For a rule that updates matrices only (Muon): the parameters it should not take (vectors,
    the input and output embeddings, as Muon's authors advise) go to groups with ``rule="adamw"``."""
    if not RULES[rule].matrices_only:
        return groups
    embeddings = _embedding_ids(model)
    other = lambda p: p.dim() != 2 or id(p) in embeddings  # noqa: E731
    split = []
    for group in groups:
        split.append({**group, "params": [(n, p) for n, p in group["params"] if not other(p)]})
        split.append({**{k: v for k, v in group.items() if k != "rank"}, "params": [(n, p) for n, p in group["params"] if other(p)], "rule": "adamw"})
    return [group for group in split if group["params"]]


def _embedding_ids(model: nn.Module) -> set[int]:
    """``id``s of the input embeddings (``nn.Embedding``) and the output embeddings' weight."""
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        embeddings.add(id(output.weight))
    return embeddings


def _embeddings_apart(model: nn.Module, groups: list[dict[str, Any]], kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """With 8-bit states, move the embedding weights (``nn.Embedding`` and the model's output
    embeddings) from ``groups`` into a group of their own with float32 states."""
    if kwargs.get("optim_bits", 32) == 32:
        return groups
    embeddings = _embedding_ids(model)
    split = [{**group, "params": [(n, p) for n, p in group["params"] if id(p) not in embeddings]} for group in groups]
    kept = [(n, p) for group in groups for n, p in group["params"] if id(p) in embeddings]
    return [group for group in split if group["params"]] + ([{"params": kept, "optim_bits": 32}] if kept else [])
