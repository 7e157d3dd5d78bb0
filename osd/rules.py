"""Inner update rules: what an optimizer does with a (possibly low-rank) gradient.

A rule owns the names, defaults and checks of its hyperparameters and the state tensors it
keeps; the maths lives in ``osd.functional``. The same rules drive both the weights (on
the projected gradient ``R``) and Online Subspace Descent's projection matrix ``P`` (on
``dL/dP``), where their state keys carry the prefix ``proj_``.

Every rule returns a direction ``D``; the caller applies ``W -= lr * D`` and the decoupled
weight decay ``W -= lr * weight_decay * W``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim.adamw import adamw as torch_adamw
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from osd import functional as F

__all__ = ["UpdateRule", "RULES", "get_rule", "RegistryView"]


def _check_betas(name: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}[{i}] must be in [0, 1), got {beta!r}")


def _check_nonnegative(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


@dataclass(frozen=True)
class UpdateRule:
    """An inner optimizer: hyperparameter defaults, their checks, state and direction.

    Attributes:
        name: registry name (``"adamw"``, ``"lion"``, ...).
        defaults: hyperparameters and their default values (``weight_decay`` included).
        validate: raises ``ValueError`` naming a bad hyperparameter.
        init_state: ``(like, hparams, prefix) -> {key: zeros}``, the state for a gradient
            shaped like ``like``.
        direction: ``(grad, state, hparams, step, prefix) -> D``; ``step`` counts from 1.
        default_lr: the weights' peak learning rate when none is given (README: Defaults).
        finalize: ``(update, scale, hparams) -> (update, scale)``, applied to the full-size
            update after projecting back, with the factor ``scale`` the caller will apply
            (GaLore's ``scale``; 1 for full-rank weights). The identity for all rules but Lion
            with ``sign_space="full"`` / ``"full_unscaled"``.
        nonnegative_states: state keys (without prefix) that are never negative; 8-bit
            storage spends all its codes on [0, 1] for them.
        basis_states: state keys (without prefix) whose first axis is a subspace coordinate
            (``r``): what moment transport (:mod:`osd.transport`) re-expresses when ``P``
            moves, linearly for the signed ones and as a non-negative form for those in
            ``nonnegative_states``.
        matrices_only: the rule works on 2-D tensors only (Muon); other parameters need a
            group with another rule.
        elementwise: the update of an entry depends on that entry (and its state) alone, so
            a rank can step its shard of a sharded (FSDP2) parameter (:mod:`osd.sharded`).
        finalizes: whether ``finalize`` is more than the identity with these hyperparameters
            (else the caller may fuse projecting back into the weight update).
        torch_step: ``(params, grads, states, hparams, lr, steps, prefix) -> None``: the
            whole update ``W <- (1 - lr wd) W - lr D`` of tensors stepped as parameters (full-rank
            weights; OSD's ``P``) at steps ``steps`` (from 1), states (keys with ``prefix``)
            in place, by torch's own fused kernels; or None. Used where
            ``torch_step_allows(hparams)`` is true.
        torch_step_allows: whether torch's kernels compute this rule with these hyperparameters.
    """

    name: str
    defaults: dict[str, Any]
    validate: Callable[[dict[str, Any]], None]
    init_state: Callable[[Tensor, dict[str, Any], str], dict[str, Tensor]]
    direction: Callable[[Tensor, dict[str, Tensor], dict[str, Any], int, str], Tensor]
    default_lr: float
    finalize: Callable[[Tensor, float, dict[str, Any]], tuple[Tensor, float]] = lambda update, scale, hparams: (update, scale)
    nonnegative_states: tuple[str, ...] = ()
    basis_states: tuple[str, ...] = ()
    matrices_only: bool = False
    elementwise: bool = False
    torch_step: Callable[..., None] | None = None
    finalizes: Callable[[dict[str, Any]], bool] = lambda hparams: False
    torch_step_allows: Callable[[dict[str, Any]], bool] = lambda hparams: False

    def hparams(self, source: dict[str, Any]) -> dict[str, Any]:
        """This rule's hyperparameters, read from ``source`` with the rule's defaults behind it."""
        return {key: source.get(key, default) for key, default in self.defaults.items()}


# --- AdamW ----------------------------------------------------------------------------


EPS_PLACEMENTS = ("torch", "hf")


def _adamw_validate(h: dict[str, Any]) -> None:
    _check_betas("betas", h["betas"])
    _check_nonnegative("eps", h["eps"])
    _check_nonnegative("weight_decay", h["weight_decay"])
    if not isinstance(h["correct_bias"], bool):
        raise ValueError(f"correct_bias must be True or False, got {h['correct_bias']!r}")
    if h["eps_placement"] not in EPS_PLACEMENTS:
        raise ValueError(
            f"eps_placement must be one of {EPS_PLACEMENTS} ('torch': eps added to the bias-corrected sqrt(v), as "
            f"torch.optim.AdamW; 'hf': to the raw sqrt(v), as Hugging Face's and galore_torch's AdamW), got {h['eps_placement']!r}"
        )


def _adamw_init(like: Tensor, h: dict, prefix: str) -> dict[str, Tensor]:
    return {
        prefix + "exp_avg": torch.zeros_like(like, memory_format=torch.preserve_format),
        prefix + "exp_avg_sq": torch.zeros_like(like, memory_format=torch.preserve_format),
    }


def _torch_kernels_compute(h: dict[str, Any]) -> bool:
    """Whether torch's AdamW kernels compute these hyperparameters (torch's eps placement, bias correction)."""
    return h["eps_placement"] == "torch" and h["correct_bias"]


def _torch_adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[int], h: dict[str, Any], lr: Any, weight_decay: float) -> None:
    """torch's AdamW update ``W <- (1 - lr wd) W - lr D`` (``D`` of :func:`osd.functional.adamw_direction`,
    torch's eps placement) of every ``params[i]`` at its step ``steps[i]`` (from 1), in place:
    the fused kernel (one pass over each tensor) where the device has one, else ``foreach``."""
    fused = all(p.device.type in _get_fused_kernels_supported_devices() for p in params)
    beta1, beta2 = h["betas"]
    # torch keeps step counts in tensors and advances them before use.
    counts = [torch.tensor(float(t - 1), dtype=torch.float32, device=p.device if fused else "cpu") for t, p in zip(steps, params)]
    torch_adamw(params, grads, exp_avgs, exp_avg_sqs, [], counts, foreach=not fused, fused=fused, amsgrad=False,
                beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=h["eps"], maximize=False)


def _adamw_direction(grad: Tensor, state: dict, h: dict, step: int, prefix: str) -> Tensor:
    beta1, beta2 = h["betas"]
    exp_avg, exp_avg_sq = state[prefix + "exp_avg"], state[prefix + "exp_avg_sq"]
    if _torch_kernels_compute(h) and grad.dtype == exp_avg.dtype:
        # D in one pass: torch's kernel steps a zero "parameter" with lr = -1, leaving +D in it.
        direction = torch.zeros_like(grad, memory_format=torch.contiguous_format)
        _torch_adamw([direction], [grad.contiguous()], [exp_avg], [exp_avg_sq], [step], h, -1.0, 0.0)
        return direction
    return F.adamw_direction(grad, exp_avg, exp_avg_sq, step, beta1, beta2, h["eps"], h["correct_bias"], h["eps_placement"] == "hf")


def _adamw_torch_step(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], h: dict[str, Any], lr: Any, steps: list[int], prefix: str = "") -> None:
    _torch_adamw(params, grads, [s[prefix + "exp_avg"] for s in states], [s[prefix + "exp_avg_sq"] for s in states], steps, h, lr, h["weight_decay"])


ADAMW = UpdateRule(
    name="adamw",
    defaults={"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "correct_bias": True, "eps_placement": "torch"},
    validate=_adamw_validate,
    init_state=_adamw_init,
    direction=_adamw_direction,
    default_lr=1e-2,  # with scale 0.25: GaLore's LLaMA-on-C4 recipe
    nonnegative_states=("exp_avg_sq",),
    basis_states=("exp_avg", "exp_avg_sq"),
    torch_step=_adamw_torch_step,
    torch_step_allows=_torch_kernels_compute,
    elementwise=True,
)


# --- Lion -----------------------------------------------------------------------------

# Where Lion takes its sign (``c = b1 m + (1 - b1) R``, ``r x n``):
# "subspace": ``scale * P sign(c)``, the whole optimizer in the subspace (the paper's formulation);
# "full": ``scale * sign(P c)``, entries +-scale;
# "full_unscaled": ``sign(scale * P c) = sign(P c)``, entries +-1: the released OSD code, where
#   ``scale`` has no effect.
SIGN_SPACES = ("subspace", "full", "full_unscaled")


def _lion_validate(h: dict[str, Any]) -> None:
    _check_betas("betas", h["betas"])
    _check_nonnegative("weight_decay", h["weight_decay"])
    if h["sign_space"] not in SIGN_SPACES:
        raise ValueError(f"sign_space must be one of {SIGN_SPACES}, got {h['sign_space']!r}")


def _lion_init(like: Tensor, h: dict, prefix: str) -> dict[str, Tensor]:
    return {prefix + "exp_avg": torch.zeros_like(like, memory_format=torch.preserve_format)}


def _lion_direction(grad: Tensor, state: dict, h: dict, step: int, prefix: str) -> Tensor:
    beta1, beta2 = h["betas"]
    return F.lion_direction(grad, state[prefix + "exp_avg"], beta1, beta2, apply_sign=h["sign_space"] == "subspace")


def _lion_finalize(update: Tensor, scale: float, h: dict[str, Any]) -> tuple[Tensor, float]:
    if h["sign_space"] == "subspace":
        return update, scale
    return update.sign_(), scale if h["sign_space"] == "full" else 1.0


LION = UpdateRule(
    name="lion",
    defaults={"betas": (0.9, 0.99), "weight_decay": 0.0, "sign_space": "subspace"},
    validate=_lion_validate,
    init_state=_lion_init,
    direction=_lion_direction,
    default_lr=2e-3,  # Lion takes a 3-10x smaller lr than AdamW (Chen et al., 2023)
    finalize=_lion_finalize,
    basis_states=("exp_avg",),
    finalizes=lambda h: h["sign_space"] != "subspace",
    elementwise=True,
)


# --- Adafactor ------------------------------------------------------------------------


def _adafactor_validate(h: dict[str, Any]) -> None:
    if not isinstance(h["decay_rate"], (int, float)) or not h["decay_rate"] < 0.0:
        raise ValueError(f"decay_rate must be < 0 (beta2_t = 1 - t^decay_rate), got {h['decay_rate']!r}")
    _check_nonnegative("eps", h["eps"])
    if not isinstance(h["clip_threshold"], (int, float)) or not h["clip_threshold"] > 0.0:
        raise ValueError(f"clip_threshold must be > 0, got {h['clip_threshold']!r}")
    if h["beta1"] is not None and (not isinstance(h["beta1"], (int, float)) or not 0.0 <= h["beta1"] < 1.0):
        raise ValueError(f"beta1 must be None or in [0, 1), got {h['beta1']!r}")
    _check_nonnegative("weight_decay", h["weight_decay"])


def _adafactor_init(like: Tensor, h: dict, prefix: str) -> dict[str, Tensor]:
    if like.dim() == 2:
        state = {
            prefix + "exp_avg_sq_row": like.new_zeros(like.shape[0]),
            prefix + "exp_avg_sq_col": like.new_zeros(like.shape[1]),
        }
    else:
        state = {prefix + "exp_avg_sq": torch.zeros_like(like)}
    if h["beta1"] is not None:
        state[prefix + "exp_avg"] = torch.zeros_like(like)
    return state


def _adafactor_direction(grad: Tensor, state: dict, h: dict, step: int, prefix: str) -> Tensor:
    return F.adafactor_direction(grad, state, step, h["decay_rate"], h["eps"], h["clip_threshold"], h["beta1"], prefix)


ADAFACTOR = UpdateRule(
    name="adafactor",
    defaults={"decay_rate": -0.8, "eps": 1e-30, "clip_threshold": 1.0, "beta1": None, "weight_decay": 0.0},
    validate=_adafactor_validate,
    init_state=_adafactor_init,
    direction=_adafactor_direction,
    default_lr=1e-2,  # GaLore's recipe, as AdamW
    nonnegative_states=("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"),
    basis_states=("exp_avg", "exp_avg_sq_row"),  # exp_avg_sq_col is per column of R: no basis
)


# --- SGD with momentum ----------------------------------------------------------------


def _sgd_validate(h: dict[str, Any]) -> None:
    if not isinstance(h["momentum"], (int, float)) or not 0.0 <= h["momentum"] < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {h['momentum']!r}")
    if h["nesterov"] and h["momentum"] == 0.0:
        raise ValueError("nesterov=True needs momentum > 0")
    _check_nonnegative("weight_decay", h["weight_decay"])


def _sgd_init(like: Tensor, h: dict, prefix: str) -> dict[str, Tensor]:
    if h["momentum"] == 0.0:
        return {}
    return {prefix + "momentum_buffer": torch.zeros_like(like, memory_format=torch.preserve_format)}


def _sgd_direction(grad: Tensor, state: dict, h: dict, step: int, prefix: str) -> Tensor:
    return F.sgd_direction(grad, state.get(prefix + "momentum_buffer"), h["momentum"], h["nesterov"])


SGD = UpdateRule(
    name="sgd",
    defaults={"momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
    validate=_sgd_validate,
    init_state=_sgd_init,
    direction=_sgd_direction,
    default_lr=0.1,  # a gradient-sized step
    basis_states=("momentum_buffer",),
    elementwise=True,
)


# --- Muon -----------------------------------------------------------------------------


def _muon_validate(h: dict[str, Any]) -> None:
    if not isinstance(h["momentum"], (int, float)) or not 0.0 <= h["momentum"] < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {h['momentum']!r}")
    if not isinstance(h["nesterov"], bool):
        raise ValueError(f"nesterov must be True or False, got {h['nesterov']!r}")
    if not isinstance(h["ns_steps"], int) or isinstance(h["ns_steps"], bool) or h["ns_steps"] < 1:
        raise ValueError(f"ns_steps (Newton-Schulz iterations) must be an int >= 1, got {h['ns_steps']!r}")
    if h["muon_scale"] not in F.MUON_SCALES:
        raise ValueError(f"muon_scale must be one of {F.MUON_SCALES}, got {h['muon_scale']!r}")
    _check_nonnegative("weight_decay", h["weight_decay"])


def _muon_init(like: Tensor, h: dict, prefix: str) -> dict[str, Tensor]:
    return {prefix + "momentum_buffer": torch.zeros_like(like, memory_format=torch.preserve_format)}


def _muon_direction(grad: Tensor, state: dict, h: dict, step: int, prefix: str) -> Tensor:
    return F.muon_direction(grad, state[prefix + "momentum_buffer"], h["momentum"], h["nesterov"], h["ns_steps"], h["muon_scale"])


# Momentum, then the update orthogonalised by Newton-Schulz (Muon; in a subspace: SUMO, GUM).
MUON = UpdateRule(
    name="muon",
    defaults={"momentum": 0.95, "nesterov": True, "ns_steps": 5, "muon_scale": "rms", "weight_decay": 0.0},
    validate=_muon_validate,
    init_state=_muon_init,
    direction=_muon_direction,
    default_lr=1e-2,  # the "rms" scale gives AdamW-sized updates, so AdamW's lr carries over (Liu et al., 2025)
    basis_states=("momentum_buffer",),
    matrices_only=True,
)


RULES: dict[str, UpdateRule] = {rule.name: rule for rule in (ADAMW, LION, ADAFACTOR, SGD, MUON)}

# Rules for Online Subspace Descent's projection matrix. "adam" is AdamW without weight
# decay (the paper's choice); "adamw" carries torch's default decay 0.01, as the released
# code's torch.optim.AdamW does.
PROJ_RULES: dict[str, tuple[UpdateRule, dict[str, Any]]] = {
    "adam": (ADAMW, {"weight_decay": 0.0}),
    "adamw": (ADAMW, {"weight_decay": 0.01}),
    "lion": (LION, {}),
    "sgd": (SGD, {"momentum": 0.0}),
    "adafactor": (ADAFACTOR, {}),
}


def get_rule(name: str) -> UpdateRule:
    """The inner rule registered as ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return RULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown update rule {name!r}; known rules: {sorted(RULES)}") from None


class RegistryView(Mapping):
    """A read-only mapping recomputed from the registries (``RULES``, ``PROJECTORS``) at every
    access: for a module constant that other modules import by name (``DEFAULT_LR``,
    ``METHODS``), so that a rule or projector registered after import shows in it."""

    def __init__(self, compute: Callable[[], dict[str, Any]]) -> None:
        self._compute = compute

    def __getitem__(self, key: str) -> Any:
        return self._compute()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._compute())

    def __len__(self) -> int:
        return len(self._compute())

    def __repr__(self) -> str:
        return repr(self._compute())
