"""Named optimizers (``OSDAdamW``, ``GaLoreAdamW``, ...) and the name-based factory.

A name is ``<method>_<rule>``: the method picks the projection rule (``osd`` = online PCA,
``galore`` = SVD, ``golore`` = random) and the rule the inner optimizer (``adamw``,
``lion``, ``adafactor``, ``sgd``). A bare rule name (``adamw``, ``lion``, ...) is the
full-rank optimizer; ``adamw`` is ``torch.optim.AdamW`` itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Iterable

import torch
from torch import nn

from osd.param_groups import Targets, optimizer_groups
from osd.optimizer import DEFAULT_LR, SUBSPACE_DEFAULTS, SubspaceOptimizer
from osd.projectors import PROJECTORS
from osd.rules import RULES, RegistryView, get_rule

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

# Method name (the prefix of an optimizer name) -> projector, from the projectors themselves
# (read from ``PROJECTORS`` at each access: a projector registered after import has its entry).
METHODS: Mapping[str, str] = RegistryView(lambda: {projector.method: name for name, projector in PROJECTORS.items() if projector.method})


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

    The groups follow :func:`osd.param_groups.optimizer_groups` (with ``optim_bits=8`` the
    embeddings keep float32 states; Muon's vectors and embeddings step with AdamW).

    Example: ``create_optimizer(model, "osd_adamw", rank=128)``.
    """
    method, _, rule = name.rpartition("_")
    if name not in optimizer_names():
        raise ValueError(f"unknown optimizer {name!r}; known: {optimizer_names()}")
    lr = get_rule(rule).default_lr if lr is None else lr
    if not method:
        if rank is not None:
            raise ValueError(f"optimizer {name!r} is full-rank; rank={rank} applies only to osd_/galore_/golore_ optimizers")
        torch_keys = set(inspect.signature(torch.optim.AdamW).parameters) - {"params", "lr"}
        subspace_only = {k: v for k, v in kwargs.items() if k not in torch_keys and SUBSPACE_DEFAULTS.get(k, object()) != v}
        if name == "adamw" and torch_adamw and not subspace_only:
            return torch.optim.AdamW(model.parameters(), lr=lr, **{k: v for k, v in kwargs.items() if k in torch_keys})
    groups = optimizer_groups(model, rule, rank, target_modules, project=bool(method), optim_bits=kwargs.get("optim_bits", 32))
    return SubspaceOptimizer(groups, lr, rule=rule, projector=METHODS[method] if method else "identity", **kwargs)
