"""The group keys of :class:`osd.optimizer.SubspaceOptimizer`: defaults, who takes each, checks.

A param group's keys come from three parts: the optimizer's own (:data:`SUBSPACE_DEFAULTS`,
the same for every rule and projector), the inner rule's (:attr:`osd.rules.UpdateRule.defaults`)
and the projector's (:attr:`osd.projectors.Projector.defaults`). A key that none of a group's
parts takes is refused (:func:`refuse_foreign_keys`), naming the parts that would take it.

The optimizer's own keys:

- ``rank``: projected if set (``None``: full rank); ``update_proj_gap``: steps between SVD /
  random refreshes (``T``; also in the released-code lr of OSD's ``P``); ``scale``: factor on
  the projected-back update (GaLore's ``alpha``; 0.25, the GaLore and OSD papers' LLaMA runs);
  ``proj_type``: the side the projector acts on (:data:`PROJ_TYPES`, as ``galore_torch``);
  ``seed``: of the random projections (each parameter derives its own).
- ``optim_bits``: 32, or 8 for block-wise 8-bit moments (the inner rule's and ``P``'s
  optimizer's, :mod:`osd.quantization`); tensors under ``min_8bit_size`` elements stay float32.
- ``max_grad_norm``: clip each parameter's gradient as the inner rule sees it (``R`` for
  projected weights, ``G`` otherwise): ``R *= min(1, c / (||R|| + 1e-6))``; per parameter, so
  it means the same in layer-wise updates (:mod:`osd.layerwise`), where no global norm exists.
- ``decay_after_update``: decoupled weight decay after the update (``W <- W' - lr wd W'``,
  Hugging Face / ``galore_torch``) instead of before it (``torch.optim.AdamW``).
- ``moment_transport`` (:mod:`osd.transport`); ``compensation``,
  ``compensation_granularity``, ``compensation_limit`` (:mod:`osd.compensation`).
- ``svd_method``, ``svd_niter``: how a top-``r`` singular basis is computed (``"svd"``,
  ``"eigh"``, ``"randomized"`` with ``svd_niter`` power iterations), see
  :func:`osd.projectors._svd_or_fallback`; ``"svd"`` here, and the online-PCA projector's
  own default (``"randomized"``, one power iteration) for OSD's initial ``P``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any, Iterable

import torch
from torch import Tensor

from osd import compensation, transport
from osd.compat import compat_defaults, translate_reference_kwargs
from osd.projectors import PROJECTORS, SVD_METHODS, get_projector
from osd.rules import RULES, RegistryView, get_rule

__all__ = [
    "SUBSPACE_DEFAULTS", "DEFAULT_LR", "PROJ_TYPES", "NONFINITE_POLICIES", "optimizer_keys", "refuse_foreign_keys",
    "optimizer_defaults", "group_with_defaults", "plain", "pop_torch_switches", "unalias", "validate_group", "check_param", "check_grad", "param_name", "warn_full_rank",
]

PROJ_TYPES = ("std", "reverse_std", "left", "right")
NONFINITE_POLICIES = ("raise", "skip", "unchecked")

SUBSPACE_DEFAULTS: dict[str, Any] = {
    "rank": None,
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "seed": 0,
    "optim_bits": 32,
    "min_8bit_size": 4096,
    "max_grad_norm": None,
    "decay_after_update": False,
    "moment_transport": None,
    "compensation": None,
    "compensation_granularity": "channel",
    "compensation_limit": 1.01,
    "svd_method": "svd",
    "svd_niter": 2,
}

# Peak learning rate per inner rule when none is given (``UpdateRule.default_lr``), read from
# ``RULES`` at each access, so a rule registered after import has its entry.
DEFAULT_LR: Mapping[str, float] = RegistryView(lambda: {name: rule.default_lr for name, rule in RULES.items()})

# Keys that were renamed, with what to write instead.
RENAMED_KEYS = {
    "svd_fraction": "svd_fraction was renamed svd_until (same meaning: SVD refreshes for the first svd_until * total_steps "
    "steps, random bases after; GoLore@20%, random for the last 20%, is svd_until=0.8)",
}
# Aliases other libraries use for a group key.
KEY_ALIASES = {"projection_type": "proj_type"}  # pytorch_optimizer's GaLore
# Keys of a param group that are no part's hyperparameter: torch's, and what LR schedulers record.
GROUP_KEYS = ("params", "param_names", "lr", "rule", "projector", "initial_lr")

# torch.optim's implementation switches: the value each may take here, and why others cannot.
TORCH_SWITCHES: dict[str, tuple[tuple[Any, ...], str]] = {
    "foreach": ((None, False, True), ""),
    "fused": ((None, False), "there is no fused kernel of a subspace step; leave fused unset"),
    "maximize": ((False,), "negate the loss (or the gradients) instead"),
    "differentiable": ((False,), "the step is not differentiable (SVD refreshes, online-PCA state)"),
    "capturable": ((False,), "the step is not CUDA-graph capturable (data-dependent SVD refreshes)"),
}


def optimizer_keys(rule: str, projector: str) -> set[str]:
    """Every keyword a :class:`SubspaceOptimizer` with this rule and projector takes."""
    return set(SUBSPACE_DEFAULTS) | set(get_rule(rule).defaults) | set(get_projector(projector).defaults) | {"compat", "nonfinite"}


def _owners(key: str) -> list[str]:
    """Which rules and projectors take group key ``key`` (for error messages)."""
    return [f"rule {name!r}" for name, rule in RULES.items() if key in rule.defaults] + [
        f"projector {name!r}" for name, projector in PROJECTORS.items() if key in projector.defaults
    ]


def refuse_foreign_keys(keys: Iterable[str], rule: str, projector: str, where: str, group: bool = False) -> None:
    """Raise ``TypeError`` for a key that no part of this optimizer takes: one of another rule
    or projector (naming it), a renamed one, or one that nothing takes (in a param ``group``,
    :data:`GROUP_KEYS` are taken too)."""
    taken = optimizer_keys(rule, projector) - {"compat", "nonfinite"}
    unknown = []
    for key in keys:
        if key in RENAMED_KEYS:
            raise TypeError(f"{where}: {RENAMED_KEYS[key]}")
        owners = _owners(key)
        if key not in taken and owners:
            raise TypeError(
                f"{where}: {key!r} is a hyperparameter of {' and '.join(owners)}, not of this optimizer "
                f"(rule {rule!r}, projector {projector!r}); it would be ignored"
            )
        if key not in taken and not (group and key in GROUP_KEYS):
            unknown.append(key)
    if unknown:
        prefix = f"{where}: " if group else ""
        raise TypeError(
            f"{prefix}unknown hyperparameter(s) {sorted(unknown)} for rule {rule!r} and projector {projector!r}; "
            f"they take {sorted(taken)}"
        )


def optimizer_defaults(where: str, lr: Any, rule: str, projector: str, compat: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The defaults of an optimizer built as ``where(params, lr, rule=rule, projector=projector,
    compat=compat, **kwargs)``: every key of its parts, the reference's conventions
    (:mod:`osd.compat`) for those not given; ``TypeError`` for a key no part takes."""
    inner, _ = get_rule(rule), get_projector(projector)  # unknown names first
    kwargs = dict(kwargs)
    pop_torch_switches(kwargs)  # foreach (a speed hint: accepted), fused, maximize, ...: refused unless off
    given_lr = lr  # galore_torch's Adafactor reads lr=None as its relative step: refused under compat
    lr = inner.default_lr if lr is None else plain(lr)
    kwargs = translate_reference_kwargs(rule, given_lr if compat is not None else lr, {key: plain(value) for key, value in kwargs.items()})
    refuse_foreign_keys(kwargs, rule, projector, where)
    taken = {**SUBSPACE_DEFAULTS, **get_projector(projector).defaults, **get_rule(rule).defaults}
    return {"lr": lr, "rule": rule, "projector": projector, **taken, **compat_defaults(compat, rule, set(taken)), **kwargs}


def group_with_defaults(param_group: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A param group as given, its keys under their own names with plain numbers, plus the
    defaults of its rule and projector where the optimizer's ``defaults`` lack them (a group
    may pick other parts than the optimizer's); ``TypeError`` for a key no part takes."""
    param_group = dict(param_group)
    pop_torch_switches(param_group)
    param_group = unalias({key: value if key in ("params", "param_names") else plain(value) for key, value in param_group.items()})
    rule, projector = param_group.get("rule", defaults["rule"]), param_group.get("projector", defaults["projector"])
    refuse_foreign_keys(param_group, rule, projector, "param group", group=True)
    own_defaults = {**get_projector(projector).defaults, **get_rule(rule).defaults}
    return {**{k: v for k, v in own_defaults.items() if k not in defaults}, **param_group}


def plain(value: Any) -> Any:
    """NumPy (and other ``numbers``) scalars as Python ints / floats, inside tuples and lists too,
    so that ``lr=np.float32(1e-3)`` or ``betas=np.array([0.9, 0.99])`` mean what they say."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, Tensor)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (tuple, list)) or type(value).__name__ == "ndarray":
        return tuple(plain(v) for v in value)
    return value


def pop_torch_switches(kwargs: dict[str, Any]) -> None:
    """Pop ``torch.optim``'s implementation switches from ``kwargs``; raise on a value with no meaning here."""
    for key, (allowed, why) in TORCH_SWITCHES.items():
        if key in kwargs:
            value = kwargs.pop(key)
            if value not in allowed:
                raise ValueError(f"{key}={value!r} is not supported by SubspaceOptimizer: {why}")


def unalias(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` with the keys of :data:`KEY_ALIASES` under their own names."""
    for alias, key in KEY_ALIASES.items():
        if alias in group:
            if key in group:
                raise TypeError(f"param group sets both {alias!r} and its alias {key!r}; keep one")
            group = {**group, key: group[alias]}
            del group[alias]
    return group


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_finite(name: str, value: Any) -> None:
    """Raise ``ValueError`` if a hyperparameter (a number, or numbers in a tuple, list or dict) is NaN or Inf."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (tuple, list)):
        for item in value:
            _check_finite(name, item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(f"{name}[{key!r}]", item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def validate_group(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first bad hyperparameter of ``group``: the optimizer's
    own, then the inner rule's, transport's, compensation's and the projector's."""
    for key, value in group.items():
        if key not in ("params", "param_names"):
            _check_finite(key, value)
    lr = group["lr"]
    if isinstance(lr, Tensor):
        lr = lr.item()
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0.0:
        raise ValueError(f"lr must be a number >= 0, got {group['lr']!r}")
    rule = get_rule(group["rule"])
    rule.validate(rule.hparams(group))
    projector = get_projector(group["projector"])
    rank = group["rank"]
    if rank is not None and (not _is_int(rank) or rank <= 0):
        raise ValueError(f"rank must be a positive int (or None for full rank), got {rank!r}")
    gap = group["update_proj_gap"]
    if not _is_int(gap) or gap <= 0:
        raise ValueError(f"update_proj_gap must be a positive int, got {gap!r}")
    scale = group["scale"]
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0.0:
        raise ValueError(f"scale must be a number > 0, got {scale!r}")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES} (GaLore's 'full' is not supported), got {group['proj_type']!r}")
    if not _is_int(group["seed"]):
        raise ValueError(f"seed must be an int, got {group['seed']!r}")
    if not isinstance(group["decay_after_update"], bool):
        raise ValueError(f"decay_after_update must be True or False, got {group['decay_after_update']!r}")
    if group["optim_bits"] not in (8, 32) or isinstance(group["optim_bits"], bool):
        raise ValueError(f"optim_bits must be 8 or 32, got {group['optim_bits']!r}")
    if not _is_int(group["min_8bit_size"]) or group["min_8bit_size"] < 0:
        raise ValueError(f"min_8bit_size must be an int >= 0, got {group['min_8bit_size']!r}")
    if group["svd_method"] not in SVD_METHODS:
        raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {group['svd_method']!r}")
    if not _is_int(group["svd_niter"]) or group["svd_niter"] < 0:
        raise ValueError(f"svd_niter must be an int >= 0, got {group['svd_niter']!r}")
    clip = group["max_grad_norm"]
    if clip is not None and (not isinstance(clip, (int, float)) or isinstance(clip, bool) or not clip > 0.0):
        raise ValueError(f"max_grad_norm must be None or a number > 0, got {clip!r}")
    transport.validate(group, projector.moves_every_step)
    compensation.validate(group)
    projector.validate(group)


def check_param(group: dict[str, Any], p: Tensor, name: str) -> None:
    """Raise ``ValueError`` for a parameter (called ``name`` in messages) that ``group`` cannot train."""
    if p.is_complex():
        raise ValueError(f"complex parameter {name} is not supported")
    if p.dtype == torch.float16:
        raise ValueError(
            f"parameter {name} is float16, which is not supported: states live in the "
            "weight's dtype, and float16's range and precision break Adam's second moment and P's updates; "
            "keep float32 weights (torch.autocast(dtype=torch.float16) for the compute) or use bfloat16"
        )
    if get_rule(group["rule"]).matrices_only and p.dim() != 2:
        raise ValueError(
            f"rule {group['rule']!r} updates matrices only, and parameter {name} has shape "
            f"{tuple(p.shape)}: put it in a param group with another rule (e.g. {{'params': [...], 'rule': 'adamw'}})"
        )


def check_grad(group: dict[str, Any], p: Tensor) -> None:
    """Raise ``RuntimeError`` for a gradient of ``p`` that no rule can take: sparse or complex."""
    for kind, bad in (("sparse", p.grad.is_sparse), ("complex", p.grad.is_complex())):
        if bad:
            raise RuntimeError(f"parameter {param_name(group, p)} has a {kind} gradient, which is not supported")


def param_name(group: dict[str, Any], p: Tensor) -> str:
    """How messages name parameter ``p`` of ``group``: by its name if the group has names."""
    names = group.get("param_names")
    index = next(i for i, q in enumerate(group["params"]) if q is p)
    return repr(names[index]) if names else f"#{index} of its group"


def warn_full_rank(names: list[str]) -> None:
    """One warning for all parameters in rank groups that are not 2-D (biases, norm gains ...)."""
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.warn(
            f"{len(names)} parameter(s) in groups with a rank are not 2-D ({shown}); they train full-rank. "
            "Pass osd.param_groups(model) to project only the weight matrices.",
            stacklevel=4,
        )
