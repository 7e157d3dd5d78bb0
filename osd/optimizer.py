"""``SubspaceOptimizer``: one subspace step, a pluggable projection rule and inner rule.

For a weight ``W`` with gradient ``G`` in a group that carries a ``rank``:

1. bring ``G`` into canonical orientation (transpose it if the projector acts on columns);
2. ``projector.prepare``: refresh ``P`` if due (SVD / random every ``update_proj_gap``);
3. project: ``R = P^T G`` (``r x n``);
4. inner rule: ``D = rule(R)`` with its state (moments) of ``R``'s shape;
5. decoupled weight decay ``W <- (1 - lr wd) W``, then ``W <- W - lr * scale * (P D)``;
6. ``projector.advance``: online PCA moves ``P`` with the same ``G`` (``P_{t+1}`` from ``G_t``).

Groups without a ``rank`` (``rank=None``), parameters that are not 2-D, and weights whose
rank is at least ``min(m, n)`` are trained full-rank by the same rule (steps 3 and 6 are
the identity), so the full-rank path is exactly the inner optimizer itself.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from osd import compensation, quantization, sharded, transport
from osd.compat import compat_defaults, translate_reference_kwargs
from osd.projectors import PROJECTORS, SVD_METHODS, get_projector
from osd.rules import PROJ_RULES, RULES, get_rule

__all__ = ["SubspaceOptimizer", "PROJ_TYPES", "NONFINITE_POLICIES", "DEFAULT_LR", "optimizer_keys"]

PROJ_TYPES = ("std", "reverse_std", "left", "right")
NONFINITE_POLICIES = ("raise", "skip")

# Group keys the optimizer itself reads, with their defaults. The projector adds its own
# (``alpha``, ``ortho_reg``, ... for online PCA; ``svd_until``, ``total_steps`` for random)
# and so does the inner rule (``betas``, ``eps``, ...).
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
    # Options of every projector (osd.transport, osd.compensation); off by default.
    "moment_transport": None,
    "compensation": None,
    "compensation_granularity": "channel",
    "compensation_limit": 1.01,
    "svd_method": "svd",
    "svd_niter": 2,
}

# Keys that were renamed, with what to write instead.
RENAMED_KEYS = {
    "svd_fraction": "svd_fraction was renamed svd_until (same meaning: SVD refreshes for the first svd_until * total_steps "
    "steps, random bases after; GoLore@20%, random for the last 20%, is svd_until=0.8)",
}
# Aliases other libraries use for a group key.
KEY_ALIASES = {"projection_type": "proj_type"}  # pytorch_optimizer's GaLore


def optimizer_keys(rule: str, projector: str) -> set[str]:
    """Every keyword a :class:`SubspaceOptimizer` with this rule and projector takes."""
    return set(SUBSPACE_DEFAULTS) | set(get_rule(rule).defaults) | set(get_projector(projector).defaults) | {"compat", "nonfinite"}


def _owners(key: str) -> list[str]:
    """Which rules and projectors take group key ``key`` (for error messages)."""
    return [f"rule {name!r}" for name, rule in RULES.items() if key in rule.defaults] + [
        f"projector {name!r}" for name, projector in PROJECTORS.items() if key in projector.defaults
    ]


def _refuse_foreign_keys(keys: Iterable[str], rule: str, projector: str, where: str) -> None:
    """Raise ``TypeError`` for a key that belongs to another rule or projector, or was renamed."""
    taken = set(SUBSPACE_DEFAULTS) | set(get_rule(rule).defaults) | set(get_projector(projector).defaults)
    for key in keys:
        if key in RENAMED_KEYS:
            raise TypeError(f"{where}: {RENAMED_KEYS[key]}")
        owners = _owners(key)
        if key not in taken and owners:
            raise TypeError(
                f"{where}: {key!r} is a hyperparameter of {' and '.join(owners)}, not of this optimizer "
                f"(rule {rule!r}, projector {projector!r}); it would be ignored"
            )


# Peak learning rate per inner rule when none is given (see the README's defaults table):
# AdamW / Adafactor 1e-2 with scale 0.25 is GaLore's LLaMA-on-C4 recipe; Lion takes a
# 3-10x smaller lr than AdamW (Chen et al., 2023); SGD-momentum a gradient-sized one; Muon's
# "rms" scale gives AdamW-sized updates, so AdamW's lr carries over (Liu et al., 2025).
DEFAULT_LR: dict[str, float] = {"adamw": 1e-2, "adafactor": 1e-2, "lion": 2e-3, "sgd": 0.1, "muon": 1e-2}

# torch.optim's implementation switches: the value each may take here, and why others cannot.
TORCH_SWITCHES: dict[str, tuple[tuple[Any, ...], str]] = {
    "foreach": ((None, False, True), ""),
    "fused": ((None, False), "there is no fused kernel of a subspace step; leave fused unset"),
    "maximize": ((False,), "negate the loss (or the gradients) instead"),
    "differentiable": ((False,), "the step is not differentiable (SVD refreshes, online-PCA state)"),
    "capturable": ((False,), "the step is not CUDA-graph capturable (data-dependent SVD refreshes)"),
}


def _plain(value: Any) -> Any:
    """NumPy (and other ``numbers``) scalars as Python ints / floats, inside tuples and lists too,
    so that ``lr=np.float32(1e-3)`` or ``betas=np.array([0.9, 0.99])`` mean what they say."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, Tensor)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (tuple, list)) or type(value).__name__ == "ndarray":
        return tuple(_plain(v) for v in value)
    return value


def _torch_switches(kwargs: dict[str, Any]) -> None:
    """Pop ``torch.optim``'s implementation switches from ``kwargs``; raise on a value with no meaning here."""
    for key, (allowed, why) in TORCH_SWITCHES.items():
        if key in kwargs:
            value = kwargs.pop(key)
            if value not in allowed:
                raise ValueError(f"{key}={value!r} is not supported by SubspaceOptimizer: {why}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _transposed(shape: torch.Size, proj_type: str) -> bool:
    """Whether the projector acts on the columns (galore_torch's "right" factor).

    ``std``: the smaller side, i.e. columns when ``m >= n``; ``reverse_std``: the larger one.
    """
    m, n = shape
    if proj_type == "std":
        return m >= n
    if proj_type == "reverse_std":
        return m < n
    return proj_type == "right"


class SubspaceOptimizer(torch.optim.Optimizer):
    """Subspace descent with any projection rule and any inner update rule.

    Args:
        params: parameters or param groups. Groups with ``rank`` set are projected; the
            others train full-rank (the ``galore_torch`` convention). Named parameters
            (``model.named_parameters()``) are accepted and used in error messages.
        lr: learning rate of the weights (``lr_W``); default :data:`DEFAULT_LR` of the rule
            (AdamW: 1e-2). NumPy scalars are accepted wherever a number is.
        rule: inner update rule: ``"adamw"``, ``"lion"``, ``"adafactor"``, ``"sgd"`` or
            ``"muon"`` (matrices only: put vectors in a group with another ``rule``).
        projector: ``"online_pca"`` (OSD), ``"svd"`` (GaLore), ``"random"`` (GoLore),
            ``"sketch_pca"`` (online PCA of a sketch of the gradient's moving average, see
            :class:`osd.projectors.SketchedPCAProjector`) or ``"identity"`` (no projection,
            for checking the one code path against torch).
        rank: default rank for every group (``None``: full-rank unless a group sets it).
        update_proj_gap: steps between SVD / random refreshes (``T``); also enters the
            released-code learning rate of OSD's ``P``.
        scale: factor on the projected-back update (GaLore's ``alpha``), projected params
            only; default 0.25, the GaLore and OSD papers' LLaMA runs.
        proj_type: side the projector acts on: ``"std"`` (smaller side), ``"reverse_std"``,
            ``"left"``, ``"right"``, as in ``galore_torch``.
        compat: a reference implementation's conventions for the keys not given
            (``"galore_torch"``, ``"osd_release"``; ``None``: torch's), see :mod:`osd.compat`.
        decay_after_update: apply the decoupled weight decay after the update
            (``W <- W' - lr wd W'``, Hugging Face / ``galore_torch``) instead of before it
            (``torch.optim.AdamW``).
        alpha: OSD, ``lr_P = alpha * lr_W(t)`` (paper: 5).
        ortho_reg: OSD, ``lambda`` of the orthonormality term (paper: 0.1).
        proj_optimizer: OSD, optimizer of ``P``: ``"adam"``, ``"adamw"``, ``"lion"``, ``"sgd"``,
            ``"adafactor"``; ``proj_optimizer_args`` overrides its hyperparameters, e.g.
            ``{"weight_decay": wd}`` for the paper's ``lambda^P = lambda^W`` (default 0 with
            ``"adam"``: the paper's LLaMA runs use ``lambda^W = 0``, and decay pulls ``P``
            towards 0 against its orthonormality).
        proj_lr_rule: OSD, ``"alpha"`` (paper) or ``"released"`` (``lr_W(t) / (max_lr * T)``);
            see :func:`osd.projectors.proj_lr`.
        max_lr: peak lr for ``proj_lr_rule="released"`` (default: the scheduler's ``initial_lr``).
        svd_until, total_steps: GoLore, SVD refreshes for the first ``svd_until * total_steps``
            steps, random after (GoLore@20% = ``svd_until=0.8``).
        svd_method: how every top-``r`` singular basis is computed (OSD's initial ``P``,
            GaLore's refreshes, GoLore's SVD phase): ``"svd"`` (full SVD, GaLore's, default),
            ``"eigh"`` (the same subspace from ``eigh(G G^T)``, cheaper) or ``"randomized"``
            (randomized range finding with ``svd_niter`` power iterations: an approximation,
            much cheaper on large weights); see :func:`osd.projectors._svd_or_fallback`.
        seed: seed of the random projections (each parameter derives its own).
        optim_bits: 32, or 8 for block-wise 8-bit moments (the inner rule's and ``P``'s
            optimizer's state; see :mod:`osd.quantization`); tensors under
            ``min_8bit_size`` elements stay float32, as in bitsandbytes.
        moment_transport: re-express the inner rule's moments when ``P`` moves: ``None``,
            ``"first"``, ``"nonnegative"`` or ``"reset"`` (see :mod:`osd.transport`).
        compensation, compensation_granularity, compensation_limit: use the gradient outside
            ``span(P)``: ``None``, ``"fira"`` or ``"apollo"``, per ``"channel"`` or ``"tensor"``,
            with a norm-growth limiter (see :mod:`osd.compensation`).
        max_grad_norm: clip each parameter's gradient as the inner rule sees it (``R`` for
            projected weights, ``G`` otherwise) to this norm: ``R *= min(1, c / (||R|| + 1e-6))``.
            Per parameter, unlike ``torch.nn.utils.clip_grad_norm_``, so it means the same in
            layer-wise updates (:class:`osd.layerwise.LayerwiseUpdates`), where no global norm exists.
        nonfinite: a NaN or Inf in any gradient ``"raise"``s ``FloatingPointError`` naming
            the parameter (default), or ``"skip"``s the whole step, leaving weights and all
            state untouched and counting it in ``skipped_steps``.
        foreach, fused, maximize, differentiable, capturable: ``torch.optim``'s switches,
            accepted where they change nothing here (``foreach`` any value, the others
            ``None``/``False``); any other value raises ``ValueError`` saying why.
        **rule_hparams: the inner rule's hyperparameters (e.g. ``betas``, ``eps``,
            ``weight_decay`` for AdamW; ``sign_space`` for Lion).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float | None = None,
        *,
        rule: str = "adamw",
        projector: str = "online_pca",
        nonfinite: str = "raise",
        compat: str | None = None,
        **kwargs: Any,
    ) -> None:
        inner, proj = get_rule(rule), get_projector(projector)
        _torch_switches(kwargs)  # foreach (a speed hint: accepted), fused, maximize, ...: refused unless off
        given_lr = lr  # galore_torch's Adafactor reads lr=None as its relative step: refused under compat
        lr = DEFAULT_LR[rule] if lr is None else _plain(lr)
        kwargs = {key: _plain(value) for key, value in kwargs.items()}
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        kwargs = translate_reference_kwargs(rule, given_lr if compat is not None else lr, kwargs)
        _refuse_foreign_keys(kwargs, rule, projector, type(self).__name__)
        taken = {**SUBSPACE_DEFAULTS, **proj.defaults, **inner.defaults}
        unknown = set(kwargs) - set(taken)
        if unknown:
            raise TypeError(
                f"unknown hyperparameter(s) {sorted(unknown)} for rule {rule!r} and projector {projector!r}; "
                f"they take {sorted(taken)}"
            )
        defaults = {"lr": lr, "rule": rule, "projector": projector, **taken, **compat_defaults(compat, rule, set(taken)), **kwargs}
        self.compat = compat
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._group_of: dict[int, dict[str, Any]] = {}
        self._fallbacks: list[str] | None = []  # collected while __init__ adds the groups
        super().__init__(params, defaults)
        fallbacks, self._fallbacks = self._fallbacks, None
        self._warn_full_rank(fallbacks)

    @staticmethod
    def _warn_full_rank(names: list[str]) -> None:
        """One warning for all parameters in rank groups that are not 2-D (biases, norm gains ...)."""
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            warnings.warn(
                f"{len(names)} parameter(s) in groups with a rank are not 2-D ({shown}); they train full-rank. "
                "Pass osd.param_groups(model) to project only the weight matrices.",
                stacklevel=4,
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        """As torch's, plus the defaults of group keys added since a state dict was saved;
        ``load_state_dict`` replaces the group dicts, so the parameter -> group map is rebuilt."""
        super().__setstate__(state)
        self._group_of = {}
        for group in self.param_groups:
            for key, value in SUBSPACE_DEFAULTS.items():
                group.setdefault(key, value)
            self._group_of.update((id(p), group) for p in group["params"])

    # ----------------------------------------------------------------------------------
    # Param groups
    # ----------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as ``torch.optim.Optimizer`` does, and check its hyperparameters.

        A group may set another ``projector`` than the optimizer's (it then gets that
        projector's defaults); keys that belong to a rule or projector the group does not use
        are refused, so that nothing is silently ignored.
        """
        param_group = dict(param_group)
        _torch_switches(param_group)
        param_group = {key: value if key in ("params", "param_names") else _plain(value) for key, value in param_group.items()}
        for alias, key in KEY_ALIASES.items():
            if alias in param_group:
                if key in param_group:
                    raise TypeError(f"param group sets both {alias!r} and its alias {key!r}; keep one")
                param_group = {**param_group, key: param_group[alias]}
                del param_group[alias]
        rule, projector = param_group.get("rule", self.defaults["rule"]), param_group.get("projector", self.defaults["projector"])
        _refuse_foreign_keys([key for key in param_group if key not in ("params", "param_names")], rule, projector, "param group")
        own_defaults = {**get_projector(projector).defaults, **get_rule(rule).defaults}
        param_group = {**{k: v for k, v in own_defaults.items() if k not in self.defaults}, **param_group}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except Exception:
            self.param_groups.pop()
            raise
        for p in group["params"]:
            if p.is_complex():
                self.param_groups.pop()
                raise ValueError(f"complex parameter {self._param_name(group, p)} is not supported")
            if p.dtype == torch.float16:
                self.param_groups.pop()
                raise ValueError(
                    f"parameter {self._param_name(group, p)} is float16, which is not supported: states live in the "
                    "weight's dtype, and float16's range and precision break Adam's second moment and P's updates; "
                    "keep float32 weights (torch.autocast(dtype=torch.float16) for the compute) or use bfloat16"
                )
            if get_rule(group["rule"]).matrices_only and p.dim() != 2:
                self.param_groups.pop()
                raise ValueError(
                    f"rule {group['rule']!r} updates matrices only, and parameter {self._param_name(group, p)} has shape "
                    f"{tuple(p.shape)}: put it in a param group with another rule (e.g. {{'params': [...], 'rule': 'adamw'}})"
                )
        # Documented fallback: vectors and >2-D tensors in a rank group train full-rank.
        fallbacks = [self._param_name(group, p) for p in group["params"] if group["rank"] is not None and p.dim() != 2]
        if self._fallbacks is None:
            self._warn_full_rank(fallbacks)
        else:
            self._fallbacks += fallbacks
        self._group_of.update((id(p), group) for p in group["params"])

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
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

    @staticmethod
    def _param_name(group: dict[str, Any], p: Tensor) -> str:
        names = group.get("param_names")
        index = next(i for i, q in enumerate(group["params"]) if q is p)
        return repr(names[index]) if names else f"#{index} of its group"

    # ----------------------------------------------------------------------------------
    # The step
    # ----------------------------------------------------------------------------------

    def _gradients(self) -> list[tuple[dict[str, Any], Tensor]]:
        """(group, param) for every parameter with a gradient; refuses sparse and complex ones."""
        pairs = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"parameter {self._param_name(group, p)} has a sparse gradient, which is not supported")
                if p.grad.is_complex():
                    raise RuntimeError(f"parameter {self._param_name(group, p)} has a complex gradient, which is not supported")
                pairs.append((group, p))
        return pairs

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimization step over every parameter that has a gradient.

        The gradients' norms are computed first in one pass (``torch._foreach_norm``) and
        checked for NaN/Inf before any state changes; online PCA reuses them as ``||G||_F``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pairs = self._gradients()
        if not pairs:
            return loss
        norms = [sharded.full(norm) for norm in torch._foreach_norm([p.grad for _, p in pairs])]
        if not torch.isfinite(torch.stack(norms)).all():
            if self.nonfinite == "skip":
                self.skipped_steps += 1
                return loss
            group, p = next(pair for pair, norm in zip(pairs, norms) if not torch.isfinite(norm))
            raise FloatingPointError(
                f"non-finite gradient (NaN or Inf) in parameter {self._param_name(group, p)} of shape "
                f"{tuple(p.shape)}; nothing was updated (pass nonfinite='skip' to skip such steps)"
            )
        in_torch: dict[int, tuple[dict[str, Any], list[Tensor]]] = {}
        hparams: dict[int, dict[str, Any]] = {}  # each group's, read once per step
        for (group, p), norm in zip(pairs, norms):
            if self._steps_in_torch(group, p):
                in_torch.setdefault(id(group), (group, []))[1].append(p)
                continue
            if id(group) not in hparams:
                hparams[id(group)] = RULES[group["rule"]].hparams(group)
            self._update_param(group, p, p.grad, norm, hparams=hparams[id(group)])
        for group, params in in_torch.values():
            self._torch_step(group, params, [p.grad for p in params])
        return loss

    # ----------------------------------------------------------------------------------
    # One parameter at a time (layer-wise updates, osd.layerwise)
    # ----------------------------------------------------------------------------------

    def needs_full_grad(self, p: Tensor) -> bool:
        """Whether the next step of ``p`` needs its full gradient ``G``.

        False only for a projected weight whose ``P`` stays fixed through the step and whose
        projection rule does not read ``G`` afterwards (GaLore / GoLore between refreshes):
        then ``R = P^T G`` (see :meth:`project`) is all the step needs, and ``R`` is linear
        in ``G``, so micro-batch gradients can be projected and summed. Online PCA always
        reads ``G`` (``P`` moves with ``G G^T P``, which is not linear in ``G``).
        """
        state = self.state[p]
        if "rank" not in state:
            return True
        group = self._group_of[id(p)]
        return group["compensation"] is not None or PROJECTORS[group["projector"]].needs_grad(state, group)

    @torch.no_grad()
    def project(self, p: Tensor, grad: Tensor) -> Tensor:
        """``R = P^T G`` (``r x n``) of a gradient of ``p``, in canonical orientation."""
        state = self.state[p]
        return state["proj"].mT @ (grad.mT if state["transposed"] else grad)

    @torch.no_grad()
    def step_param(self, p: Tensor, grad: Tensor | None = None, projected: Tensor | None = None) -> bool:
        """Step ``p`` alone, from its full gradient ``grad`` (default ``p.grad``) or from an
        accumulated projected gradient ``projected`` (``R``, valid only when
        :meth:`needs_full_grad` is False). The same update as :meth:`step` gives ``p``.

        Returns False if the gradient was non-finite and ``nonfinite="skip"`` skipped the
        parameter (its weights and state untouched); ``"raise"`` raises ``FloatingPointError``.
        """
        group = self._group_of[id(p)]
        if projected is None:
            grad = p.grad if grad is None else grad
            if grad is None:
                raise RuntimeError(f"parameter {self._param_name(group, p)} has no gradient to step with")
        elif self.needs_full_grad(p):
            raise RuntimeError(f"parameter {self._param_name(group, p)} needs its full gradient this step, not a projected one")
        norm = torch.linalg.vector_norm(grad if projected is None else projected)
        if not torch.isfinite(norm):
            if self.nonfinite == "skip":
                return False
            raise FloatingPointError(f"non-finite gradient (NaN or Inf) in parameter {self._param_name(group, p)} of shape {tuple(p.shape)}")
        self._update_param(group, p, grad, norm, projected)
        return True

    @torch.no_grad()
    def materialize_state(self, p: Tensor, grad: Tensor) -> None:
        """Create the state ``p`` holds after its first step (``P`` included) without
        stepping: on the meta device, this counts an optimizer's memory for free."""
        group = self._group_of[id(p)]
        self._init_state(group, p, grad)
        state = self.state[p]
        if "rank" in state:
            PROJECTORS[group["projector"]].prepare(state, grad.mT if state["transposed"] else grad, group)

    # ----------------------------------------------------------------------------------
    # The update of one parameter
    # ----------------------------------------------------------------------------------

    def _update_param(
        self, group: dict[str, Any], p: Tensor, grad: Tensor | None, grad_norm: Tensor, projected: Tensor | None = None, hparams: dict[str, Any] | None = None
    ) -> None:
        """``grad``: the full gradient (``grad_norm`` its norm), or None with ``projected = P^T G``
        (``grad_norm`` then the norm of ``projected``). ``hparams``: the rule's hyperparameters
        of ``group``, when the caller has read them already (once per group and step)."""
        if projected is None and self._steps_in_torch(group, p):
            self._torch_step(group, [p], [grad])
            return
        state = self.state[p]
        if not state:
            self._init_state(group, p, grad)
        # Only projected parameters carry a rank in their state (no strings there: torch's
        # load_state_dict would mangle them).
        projector = PROJECTORS[group["projector"] if "rank" in state else "identity"]
        rule = RULES[group["rule"]]
        hparams = hparams or rule.hparams(group)

        if grad is not None:
            grad = self._working_grad(group, grad, "rank" in state)
        with self._float_states(state, group, p.dtype):
            G = None if grad is None else grad.mT if state["transposed"] else grad
            if G is not None:
                with transport.transporting(state, group, rule):
                    projector.prepare(state, G, group)
            P = state.get("proj")
            R = projected if projected is not None else G if P is None else P.mT @ G
            rule_input, rule_G = R, G
            if group["max_grad_norm"] is not None:
                norm = grad_norm if P is None or projected is not None else torch.linalg.vector_norm(R)
                clip = (group["max_grad_norm"] / (norm + 1e-6)).clamp(max=1.0)
                rule_input, rule_G = R * clip, None if G is None else G * clip
            direction = rule.direction(rule_input, state, hparams, transport.rule_step(state), "")
            lr, decay = group["lr"], hparams["weight_decay"]
            decay_before = bool(decay) and not group["decay_after_update"]
            if P is not None and group["compensation"] is None and not rule.finalizes(hparams) and not isinstance(p, DTensor):
                # W <- (1 - lr wd) W - lr scale P D as one GEMM: no m x n temporary, one pass over W.
                beta, alpha = (1.0 - lr * decay if decay_before else 1.0), -lr * group["scale"]
                if state["transposed"]:
                    p.addmm_(direction.mT, P.mT, beta=beta, alpha=alpha)
                else:
                    p.addmm_(P, direction, beta=beta, alpha=alpha)
            else:
                update = direction if P is None else compensation.update(state, group, P, direction, rule_G, rule_input)
                update, scale = rule.finalize(update, group["scale"] if P is not None else 1.0, hparams)
                if decay_before:
                    p.mul_(1.0 - lr * decay)
                p.add_(sharded.like_param(update.mT if state["transposed"] else update, p), alpha=-lr * scale)
            if decay and group["decay_after_update"]:
                p.add_(p, alpha=-lr * decay)  # W' - lr wd W', as Hugging Face's AdamW rounds it
            if G is not None:
                with transport.transporting(state, group, rule, in_place=projector.moves_in_advance(state)):
                    projector.advance(state, G, R, grad_norm, group)
        state["step"] += 1

    @staticmethod
    def _projected(group: dict[str, Any], p: Tensor) -> bool:
        """Whether ``p`` is (or, before its first step, will be) trained in a subspace."""
        rank = group["rank"]
        return get_projector(group["projector"]).projects and rank is not None and p.dim() == 2 and rank < min(p.shape)

    def _steps_in_torch(self, group: dict[str, Any], p: Tensor) -> bool:
        """Whether ``p`` steps through its rule's torch kernels (``UpdateRule.torch_step``):
        a full-rank, unsharded parameter with float32 states, no per-parameter clipping and
        torch's decay-before-update, whose rule torch computes with these hyperparameters."""
        rule = RULES[group["rule"]]
        state = self.state.get(p)
        projected = "rank" in state if state else self._projected(group, p)
        return (
            rule.torch_step is not None
            and not projected
            and group["max_grad_norm"] is None
            and not group["decay_after_update"]
            and (group["optim_bits"] == 32 or p.numel() < max(group["min_8bit_size"], 1))
            and not isinstance(p, DTensor)
            and rule.torch_step_allows(rule.hparams(group))
        )

    def _torch_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Step full-rank ``params`` together through ``UpdateRule.torch_step`` (one fused kernel)."""
        rule = RULES[group["rule"]]
        for p, grad in zip(params, grads):
            if not self.state[p]:
                self._init_state(group, p, grad)
        states = [self.state[p] for p in params]
        rule.torch_step(params, grads, states, rule.hparams(group), group["lr"], [state["step"] + 1 for state in states])
        for state in states:
            state["step"] += 1

    @staticmethod
    def _working_grad(group: dict[str, Any], grad: Tensor, projected: bool) -> Tensor:
        """``grad``; a sharded (FSDP2) one is gathered whole unless its rule runs on shards
        (see :mod:`osd.sharded`)."""
        return grad if sharded.keeps_shards(group["rule"], projected) else sharded.full(grad)

    def _init_state(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> None:
        """Per-parameter state: the projector's (``P`` ...) and the inner rule's (moments),
        the latter (and ``P``'s optimizer's) stored in 8 bits if ``optim_bits=8``."""
        state = self.state[p]
        rank = group["rank"]
        projector = get_projector(group["projector"])
        projected = self._projected(group, p)
        if not projected:
            projector = get_projector("identity")
        state["step"] = 0
        state["transposed"] = projected and _transposed(p.shape, group["proj_type"])
        if projected:
            state["rank"] = rank
            state["seed"] = hash((group["seed"], self._param_index(p))) % (2**31)
        grad = self._working_grad(group, grad, projected)
        G = grad.mT if state["transposed"] else grad
        projector.init_state(state, G, rank, group)
        if projected:
            compensation.init_state(state, group, G)
        low_rank_like = G if not projected else G.new_empty(rank, G.shape[1])
        rule = RULES[group["rule"]]
        state.update(rule.init_state(low_rank_like, rule.hparams(group), ""))
        if group["optim_bits"] == 8:
            for key in [k for k, v in state.items() if _quantizable(k, v, group["min_8bit_size"])]:
                _store_8bit(state, key, state.pop(key), self._nonnegative(group, key))

    @staticmethod
    def _nonnegative(group: dict[str, Any], key: str) -> bool:
        if key.startswith("proj_"):
            rule, key = PROJ_RULES[group["proj_optimizer"]][0], key[len("proj_") :]
        else:
            rule = RULES[group["rule"]]
        return key in rule.nonnegative_states

    @contextlib.contextmanager
    def _float_states(self, state: dict[str, Any], group: dict[str, Any], dtype: torch.dtype) -> Iterator[None]:
        """Within the block, 8-bit states are float32 tensors under their own keys; after it
        they are quantised again (the float copies live for one parameter's update only)."""
        keys = [k[: -len(_CODES)] for k in state if isinstance(k, str) and k.endswith(_CODES)]
        for key in keys:
            shape = torch.Size(state[key + _SHAPE].tolist())
            values = quantization.dequantize(state[key + _CODES], state[key + _ABSMAX], not self._nonnegative(group, key), shape)
            # In the dtype float32 states would have: P's for P's optimizer, else the weight's.
            state[key] = values.to(state["proj"].dtype if key.startswith("proj_") else dtype)
        try:
            yield
        finally:
            for key in keys:
                _store_8bit(state, key, state.pop(key), self._nonnegative(group, key))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but 8-bit states keep their dtypes
        (torch casts every state tensor but ``step`` to a floating parameter's dtype), and a
        state that does not fit is refused (``ValueError`` naming the parameter, nothing
        loaded): one saved by another rule, projector, rank, orientation, bit width or
        ``P`` optimizer (:data:`STATE_DEFINING_KEYS`), with other shapes, or non-finite."""
        self._check_loadable(state_dict)
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for p, saved_id in zip(params, saved_ids):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(key, str) and key.endswith((_CODES, _ABSMAX, _SHAPE)):
                    self.state[p][key] = value.to(device=p.device)

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state_dict`` was saved by an optimizer whose maths or
        state layout differ from this one's (group counts and sizes: torch checks them)."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)
        ):
            return
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if "rule" not in saved:
                raise ValueError(f"the state was not saved by a SubspaceOptimizer (param group {index} has no 'rule')")
            for key in STATE_DEFINING_KEYS:
                if key in saved and saved[key] != group[key]:
                    name = self._param_name(group, group["params"][0]) if group["params"] else "(none)"
                    raise ValueError(
                        f"the state was saved with {key}={saved[key]!r} for param group {index} (first parameter {name}); "
                        f"this optimizer has {key}={group[key]!r}"
                    )
            for p, saved_id in zip(group["params"], saved["params"]):
                self._check_param_state(group, p, state_dict["state"].get(saved_id, {}))

    def _check_param_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        """The saved ``state`` of ``p``: the shapes this optimizer would create, finite values."""
        name = self._param_name(group, p)
        for key, value in state.items():
            if isinstance(value, Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"the saved state of parameter {name} holds NaN or Inf in {key!r}")
        if "step" not in state:
            return
        shape = tuple(p.shape)
        if "proj" in state:
            if p.dim() != 2 or state.get("rank") != group["rank"]:
                raise ValueError(f"the saved state of parameter {name} is projected at rank {state.get('rank')}; this optimizer has rank {group['rank']} for its shape {shape}")
            m, n = shape[::-1] if _transposed(p.shape, group["proj_type"]) else shape
            meta = torch.empty(m, group["rank"], device="meta")
            expected = {"proj": meta.shape}
            if group["projector"] == "online_pca":
                rule, _ = PROJ_RULES[group["proj_optimizer"]]
                expected.update({k: v.shape for k, v in rule.init_state(meta, rule.hparams(group), "proj_").items()})
            like = torch.empty(group["rank"], n, device="meta")
        else:
            expected, like = {}, torch.empty(shape, device="meta")
        rule = RULES[group["rule"]]
        expected.update({k: v.shape for k, v in rule.init_state(like, rule.hparams(group), "").items()})
        for key, want in expected.items():
            have = state[key].shape if isinstance(state.get(key), Tensor) else torch.Size(state[key + _SHAPE].tolist()) if key + _SHAPE in state else None
            if have is not None and have != want:
                raise ValueError(f"the saved state of parameter {name} has {key!r} of shape {tuple(have)}; this optimizer's is {tuple(want)} (another model?)")

    def _param_index(self, p: Tensor) -> int:
        """Position of ``p`` among all parameters, the same as in ``state_dict()``."""
        index = 0
        for group in self.param_groups:
            for q in group["params"]:
                if q is p:
                    return index
                index += 1
        raise KeyError("parameter not in this optimizer")


# Group keys that decide the maths and the layout of the state: a state saved under other values
# would be run by this optimizer's maths on another's state, so load_state_dict refuses it.
STATE_DEFINING_KEYS = ("rule", "projector", "rank", "proj_type", "optim_bits", "proj_optimizer")


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


# 8-bit state of key ``k``: ``k:codes`` (uint8), ``k:absmax`` (float32 per block), ``k:shape``.
_CODES, _ABSMAX, _SHAPE = ":codes", ":absmax", ":shape"


def _quantizable(key: Any, value: Any, min_size: int) -> bool:
    """Optimizer states (not ``P`` itself nor the compensation's limiter) that are float tensors
    of at least ``min_size`` elements."""
    return key not in ("proj", compensation.STATE_KEY) and isinstance(value, Tensor) and value.is_floating_point() and value.numel() >= max(min_size, 1)


def _store_8bit(state: dict[str, Any], key: str, value: Tensor, nonnegative: bool) -> None:
    state[key + _CODES], state[key + _ABSMAX] = quantization.quantize(value, signed=not nonnegative)
    state[key + _SHAPE] = torch.tensor(value.shape, dtype=torch.int64)
