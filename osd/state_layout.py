"""The per-parameter state of :class:`osd.optimizer.SubspaceOptimizer`: its keys, what each
belongs to, and its 8-bit storage. Every other module reads and writes the state through
the names and functions here, never by spelling or parsing a key itself.

``optimizer.state[p]`` is a flat dict of tensors and plain Python values (as torch's own
optimizers keep it), so ``state_dict()`` loads with ``torch.load(weights_only=True)``:

======================== =============================================================
``step``                 the parameter's step count (an int, from 0)
``transposed``           whether the weight is transposed into canonical orientation
                         (``G``: ``m x n``, the projector acting on the ``m`` side)
``rank``, ``seed``       only for a projected weight (:func:`is_projected`)
``proj``                 ``P`` (``m x r``)
``proj_<key>``           the projector's own state: ``P``'s optimizer's moments (online
                         PCA) and the gradient sketch (``sketch_pca``)
``<key>``                the inner rule's state (``exp_avg`` ...), of ``R``'s shape
``compensation_norm``    the Fira / APOLLO limiter's memory (:mod:`osd.compensation`)
``moments_origin``       the step of the last moment reset (:mod:`osd.transport`)
``basis_step``           the step whose ``P`` was computed ahead (:mod:`osd.spread`)
``<key>:codes`` ...      a state stored in 8 bits: ``:codes`` (uint8), ``:absmax``
                         (float32 per block), ``:shape`` (int64), see :func:`store_8bit`
======================== =============================================================

Why flat, not a nested dict for ``P``'s optimizer: torch's ``load_state_dict`` casts nested
dicts exactly as flat keys (every tensor but ``step`` to the parameter's dtype), so nesting
would save no code; the flat keys let a rule create its state for ``P`` with the same
``init_state(like, hparams, prefix)`` it uses for ``R``; and every checkpoint written so far
keeps loading unchanged.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from osd import quantization, sharded
from osd.rules import PROJ_RULES, RULES

__all__ = [
    "PROJ", "PROJ_PREFIX", "TRANSPOSED", "RANK", "SEED", "SKETCH", "COMPENSATION_NORM", "MOMENTS_ORIGIN",
    "BASIS_STEP", "PARTS", "is_projected", "transposed", "canonical", "part", "keeps_shards", "eight_bit_keys",
    "is_8bit", "stored_shape", "store_8bit", "float_states", "eight_bit_entries", "STATE_DEFINING_KEYS", "check_groups",
    "check_finite", "check_shapes",
]

TRANSPOSED, RANK, SEED = "transposed", "rank", "seed"
PROJ = "proj"
PROJ_PREFIX = "proj_"  # P's optimizer's state: the rule's keys behind this prefix
SKETCH = PROJ_PREFIX + "sketch"
COMPENSATION_NORM = "compensation_norm"
MOMENTS_ORIGIN = "moments_origin"
BASIS_STEP = "basis_step"
_CODES, _ABSMAX, _SHAPE = ":codes", ":absmax", ":shape"

# What a state tensor is counted as by osd.memory.state_bytes.
PARTS = ("moments", "projection", "proj_optimizer")


def is_projected(state: dict[str, Any]) -> bool:
    """Whether the parameter of this (initialised) state is trained in a subspace."""
    return RANK in state


def transposed(shape: torch.Size, proj_type: str) -> bool:
    """Whether the projector acts on the columns of a weight of ``shape`` (galore_torch's
    "right" factor). ``std``: the smaller side, i.e. columns when ``m >= n``;
    ``reverse_std``: the larger one; ``left`` / ``right``: as named."""
    m, n = shape
    if proj_type == "std":
        return m >= n
    if proj_type == "reverse_std":
        return m < n
    return proj_type == "right"


def canonical(state: dict[str, Any], grad: Tensor) -> Tensor:
    """``grad`` in canonical orientation (a view)."""
    return grad.mT if state[TRANSPOSED] else grad


def part(key: str) -> str:
    """Which of :data:`PARTS` the state tensor under ``key`` belongs to."""
    if key == PROJ:
        return "projection"
    return "proj_optimizer" if key.startswith(PROJ_PREFIX) else "moments"


def keeps_shards(group: dict[str, Any], state: dict[str, Any]) -> bool:
    """Whether the state tensors of a sharded (FSDP2) parameter are sharded like it (else
    replicated on every rank): a torch optimizer's always (no ``rule`` in its groups), ours
    where :func:`osd.sharded.keeps_shards` says so."""
    return "rule" not in group or sharded.keeps_shards(group["rule"], is_projected(state))


# --- 8-bit storage ----------------------------------------------------------------------


def eight_bit_keys(key: str) -> tuple[str, str, str]:
    """The keys of the codes, block maxima and shape of state ``key`` stored in 8 bits."""
    return key + _CODES, key + _ABSMAX, key + _SHAPE


def is_8bit(key: Any) -> bool:
    """Whether ``key`` is one of the three tensors of a state stored in 8 bits."""
    return isinstance(key, str) and key.endswith((_CODES, _ABSMAX, _SHAPE))


def stored_shape(state: dict[str, Any], key: str) -> torch.Size | None:
    """The shape of state ``key``, stored in float or in 8 bits; None if absent."""
    if isinstance(state.get(key), Tensor):
        return state[key].shape
    if key + _SHAPE in state:
        return torch.Size(state[key + _SHAPE].tolist())
    return None


def _nonnegative(group: dict[str, Any], key: str) -> bool:
    """Whether state ``key`` is never negative (8-bit storage then spends its codes on [0, 1])."""
    if key.startswith(PROJ_PREFIX):
        if "proj_optimizer" not in group:  # a projector's own state, not P's optimizer's
            return False
        rule, key = PROJ_RULES[group["proj_optimizer"]][0], key[len(PROJ_PREFIX):]
    else:
        rule = RULES[group["rule"]]
    return key in rule.nonnegative_states


def _quantizable(key: str, value: Any, min_size: int) -> bool:
    """Optimizer states (not ``P`` itself nor the limiter) that are float tensors of at least
    ``min_size`` elements."""
    return (
        key not in (PROJ, COMPENSATION_NORM)
        and isinstance(value, Tensor)
        and value.is_floating_point()
        and value.numel() >= max(min_size, 1)
    )


def _store(state: dict[str, Any], key: str, value: Tensor, nonnegative: bool) -> None:
    """Quantise ``value`` (consumed: it may be overwritten) into state ``key``'s 8-bit tensors,
    in place where they exist."""
    codes = state.get(key + _CODES)
    if codes is not None:
        quantization.quantize_into(value, not nonnegative, codes, state[key + _ABSMAX])
        return
    state[key + _CODES], state[key + _ABSMAX] = quantization.quantize(value, signed=not nonnegative)
    state[key + _SHAPE] = torch.tensor(value.shape, dtype=torch.int64)


def store_8bit(state: dict[str, Any], group: dict[str, Any]) -> None:
    """With ``group["optim_bits"] == 8``, replace every quantizable float state (at least
    ``min_8bit_size`` elements) by its block-wise 8-bit form (:mod:`osd.quantization`)."""
    if group["optim_bits"] != 8:
        return
    for key in [k for k, v in state.items() if _quantizable(k, v, group["min_8bit_size"])]:
        _store(state, key, state.pop(key), _nonnegative(group, key))


@contextlib.contextmanager
def float_states(state: dict[str, Any], group: dict[str, Any], dtype: torch.dtype) -> Iterator[None]:
    """Within the block, 8-bit states are float tensors under their own keys, in the dtype float
    states would have (``P``'s for ``P``'s optimizer, else ``dtype``, the weight's); after it they
    are quantised again (the float copies live for one parameter's update only, in float32
    buffers that every parameter's update reuses: :func:`osd.quantization.scratch`)."""
    keys = [k[: -len(_CODES)] for k in state if isinstance(k, str) and k.endswith(_CODES)]
    for slot, key in enumerate(keys):
        signed, shape = not _nonnegative(group, key), stored_shape(state, key)
        codes = state[key + _CODES]
        out = quantization.scratch(f"state{slot}", math.prod(shape), torch.float32, codes.device).view(shape)
        values = quantization.dequantize(codes, state[key + _ABSMAX], signed, shape, out=out)
        state[key] = values.to(state[PROJ].dtype if key.startswith(PROJ_PREFIX) else dtype)
    try:
        yield
    finally:
        for key in keys:
            _store(state, key, state.pop(key), _nonnegative(group, key))


def eight_bit_entries(state: dict[str, Any]) -> dict[str, Tensor]:
    """The tensors of ``state`` that hold 8-bit storage (their dtypes are part of the format)."""
    return {key: value for key, value in state.items() if is_8bit(key)}


# --- Whether a saved state fits ---------------------------------------------------------

# Group keys that decide the maths and the layout of the state: a state saved under other values
# would be run by this optimizer's maths on another's state, so loading it is refused.
STATE_DEFINING_KEYS = ("rule", "projector", "rank", "proj_type", "optim_bits", "proj_optimizer")


def check_groups(state_dict: dict[str, Any], groups: list[dict[str, Any]], name_of: Callable[[dict[str, Any], Tensor], str]) -> bool:
    """Raise ``ValueError`` if ``state_dict`` was saved by an optimizer whose maths or state
    layout differ from that of ``groups`` (:data:`STATE_DEFINING_KEYS`); ``name_of(group, p)``
    names a parameter. False, to leave the error to torch, if group counts or sizes differ."""
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(groups) or any(len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, groups)):
        return False
    for index, (saved, group) in enumerate(zip(saved_groups, groups)):
        if "rule" not in saved:
            raise ValueError(f"the state was not saved by a SubspaceOptimizer (param group {index} has no 'rule')")
        for key in STATE_DEFINING_KEYS:
            if key in saved and saved[key] != group[key]:
                name = name_of(group, group["params"][0]) if group["params"] else "(none)"
                raise ValueError(
                    f"the state was saved with {key}={saved[key]!r} for param group {index} (first parameter {name}); "
                    f"this optimizer has {key}={group[key]!r}"
                )
    return True


def check_finite(state: dict[str, Any], name: str) -> None:
    """Raise ``ValueError`` if a float tensor of the saved ``state`` of parameter ``name`` holds NaN or Inf."""
    for key, value in state.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"the saved state of parameter {name} holds NaN or Inf in {key!r}")


def check_shapes(state: dict[str, Any], expected: dict[str, Any], name: str) -> None:
    """Raise ``ValueError`` if a tensor of the saved ``state`` of parameter ``name`` (in float or
    8 bits) has another shape than the same key's tensor in ``expected``."""
    for key, want in expected.items():
        have = stored_shape(state, key)
        if isinstance(want, Tensor) and have is not None and have != want.shape:
            raise ValueError(f"the saved state of parameter {name} has {key!r} of shape {tuple(have)}; this optimizer's is {tuple(want.shape)} (another model?)")
