"""Conventions of the reference implementations, as named presets (``compat=``).

The maths of every optimizer here is one subspace step; the reference codes differ from
``torch.optim`` in a few conventions that change the numbers. Each is an ordinary option:

| option | ``torch`` (default) | Hugging Face / ``galore_torch`` / released OSD |
|---|---|---|
| ``eps_placement`` (AdamW) | ``"torch"``: eps added to the bias-corrected ``sqrt(v)`` | ``"hf"``: to the raw ``sqrt(v)`` |
| ``eps`` (AdamW) | 1e-8 | 1e-6 |
| ``decay_after_update`` | False: ``W <- (1 - lr wd) W``, then the update | True: the update, then ``W <- W - lr wd W`` |
| ``sign_space`` (Lion) | ``"subspace"``: ``scale P sign(c)`` | released OSD: ``"full_unscaled"``, ``sign(scale P c)`` |

and a preset sets all of a reference's conventions at once, for the keys its caller did
not set (an explicit keyword always wins):

- ``compat="galore_torch"``: ``galore_torch`` 1.0 (HF-style AdamW, eps 1e-6, decay after the
  update; its Adafactor already matches this library's). The default of the ``GaLore*`` and
  ``GoLore*`` classes, whose reference codes share it.
- ``compat="osd_release"``: the released Online Subspace Descent code: the ``galore_torch``
  conventions, no orthonormality term (``ortho_reg=0``), ``P``'s learning rate
  ``lr_W(t) / (max_lr * update_proj_gap)`` (``proj_lr_rule="released"``), ``P`` stepped by
  ``torch.optim.AdamW`` with its default weight decay 0.01 (``proj_optimizer="adamw"``),
  ``P`` initialised by the SVD (``svd_method="svd"``), and Lion's sign taken after
  projecting back with ``scale`` inside the sign.
- ``compat=None`` (``SubspaceOptimizer`` and the ``OSD*`` classes): torch's conventions, so a
  full-rank group is exactly ``torch.optim.AdamW``.

This module also accepts the keyword arguments that ``galore_torch`` users pass out of habit
(:func:`translate_reference_kwargs`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["COMPAT_PRESETS", "compat_defaults", "translate_reference_kwargs"]

_HF_ADAMW: dict[str, Any] = {"eps": 1e-6, "eps_placement": "hf", "decay_after_update": True}
_RELEASED_P: dict[str, Any] = {"ortho_reg": 0.0, "proj_lr_rule": "released", "proj_optimizer": "adamw", "svd_method": "svd"}

# preset -> rule -> keys it sets (rules not listed: nothing changes).
COMPAT_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "galore_torch": {"adamw": _HF_ADAMW},
    "osd_release": {
        "adamw": {**_HF_ADAMW, **_RELEASED_P},
        "lion": {"sign_space": "full_unscaled", "decay_after_update": True, **_RELEASED_P},
        "adafactor": _RELEASED_P,
        "sgd": _RELEASED_P,
    },
}


def compat_defaults(compat: str | None, rule: str, accepted: set[str]) -> dict[str, Any]:
    """The defaults preset ``compat`` sets for ``rule``, restricted to the ``accepted`` keys
    (the optimizer's: a preset's online-PCA keys do not apply to a GaLore optimizer)."""
    if compat is None:
        return {}
    if compat not in COMPAT_PRESETS:
        raise ValueError(f"unknown compat preset {compat!r}; known: {sorted(COMPAT_PRESETS)} (or None for torch's conventions)")
    return {key: value for key, value in COMPAT_PRESETS[compat].get(rule, {}).items() if key in accepted}


# galore_torch's Adafactor switches that this library's explicit-lr Adafactor has no use for.
_ADAFACTOR_OFF_ONLY = ("relative_step", "scale_parameter", "warmup_init")


def translate_reference_kwargs(rule: str, lr: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the ``galore_torch`` / Hugging Face keywords mapped onto this library's.

    - ``no_deprecation_warning``: dropped (nothing here warns of a deprecation).
    - Adafactor's ``eps=(eps1, eps2)``: ``eps1`` is the regulariser of the squared gradient,
      this library's ``eps``; ``eps2`` only scales the lr with ``scale_parameter=True``.
    - Adafactor's ``relative_step``, ``scale_parameter``, ``warmup_init``: accepted when False
      (the settings ``galore_torch`` recommends with an external schedule); True, and
      ``lr=None``, are refused with what to pass instead. A call that passes
      ``relative_step`` but not ``scale_parameter`` is a ``galore_torch`` call whose default
      ``scale_parameter=True`` (lr scaled by the weight's RMS) would apply: refused too.
    """
    kwargs = {key: value for key, value in kwargs.items() if key != "no_deprecation_warning"}
    if rule != "adafactor":
        return kwargs
    if "relative_step" in kwargs and "scale_parameter" not in kwargs:
        kwargs["scale_parameter"] = True  # galore_torch's default once relative_step is given
    on = [key for key in _ADAFACTOR_OFF_ONLY if kwargs.pop(key, False)]
    if on or lr is None:
        what = f"{', '.join(f'{key}=True' for key in on)}" if on else "lr=None"
        raise ValueError(
            f"{what}: this Adafactor takes an explicit learning rate (use an LR scheduler for warmup); pass lr=<float>, "
            "relative_step=False, scale_parameter=False, warmup_init=False, as galore_torch recommends with an external schedule"
        )
    eps = kwargs.get("eps")
    if isinstance(eps, (tuple, list)):
        if len(eps) != 2:
            raise ValueError(f"Adafactor's eps must be a number or a pair (eps1, eps2), got {eps!r}")
        kwargs["eps"] = eps[0]
    return kwargs
