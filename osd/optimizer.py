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
the identity), so the full-rank path is exactly the inner optimizer itself. The parts live
elsewhere: the maths in :mod:`osd.functional`, the rules in :mod:`osd.rules`, the projectors
in :mod:`osd.projectors`, the group keys and their checks in :mod:`osd.hyperparams`, the
per-parameter state's keys and 8-bit storage in :mod:`osd.state_layout`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from osd import compensation, param_state, sharded, state_layout, transport
from osd.hyperparams import DEFAULT_LR, NONFINITE_POLICIES, PROJ_TYPES, SUBSPACE_DEFAULTS, group_with_defaults, optimizer_defaults, optimizer_keys
from osd.hyperparams import check_grad, check_param, param_name, validate_group, warn_full_rank
from osd.projectors import PROJECTORS
from osd.rules import RULES
from osd.state_layout import PROJ, TRANSPOSED, canonical, is_projected

__all__ = ["SubspaceOptimizer", "PROJ_TYPES", "NONFINITE_POLICIES", "DEFAULT_LR", "SUBSPACE_DEFAULTS", "optimizer_keys"]


class SubspaceOptimizer(torch.optim.Optimizer):
    """Subspace descent with any projection rule and any inner update rule.

    Args:
        params: parameters or param groups. Groups with ``rank`` set are projected; the
            others train full-rank (the ``galore_torch`` convention). Named parameters
            (``model.named_parameters()``) are accepted and used in error messages.
        lr: learning rate of the weights (``lr_W``); default :data:`DEFAULT_LR` of the rule
            (AdamW: 1e-2). NumPy scalars are accepted wherever a number is.
        rule: inner update rule (:data:`osd.rules.RULES`): ``"adamw"``, ``"lion"``,
            ``"adafactor"``, ``"sgd"`` or ``"muon"`` (matrices only: put vectors in a group
            with another ``rule``).
        projector: projection rule (:data:`osd.projectors.PROJECTORS`): ``"online_pca"``
            (OSD), ``"svd"`` (GaLore), ``"random"`` (GoLore), ``"sketch_pca"`` or
            ``"identity"`` (no projection, for checking the one code path against torch).
        nonfinite: a NaN or Inf in any gradient ``"raise"``s ``FloatingPointError`` naming
            the parameter (default), or ``"skip"``s the whole step, leaving weights and all
            state untouched and counting it in ``skipped_steps``; ``"unchecked"`` looks for
            none, as torch's optimizers do (a NaN then reaches weights and states): for a
            loop that checks already (``clip_grad_norm_(..., error_if_nonfinite=True)``, a
            ``GradScaler``), it saves the check's read of the gradients that step through
            torch's fused kernel (a fifth to a quarter of that kernel's time here).
        compat: a reference implementation's conventions for the keys not given
            (``"galore_torch"``, ``"osd_release"``; ``None``: torch's), see :mod:`osd.compat`.
        **kwargs: group defaults: the optimizer's own keys (``rank``, ``update_proj_gap``,
            ``scale``, ``proj_type``, ``optim_bits``, ``max_grad_norm``, ...; see
            :mod:`osd.hyperparams`), the rule's (``betas``, ``eps``, ``weight_decay`` ...) and
            the projector's (online PCA's ``alpha``, ``ortho_reg``, ``proj_optimizer``, ...;
            GoLore's ``svd_until``, ``total_steps``). A key that none of them takes is
            refused. ``torch.optim``'s switches (``foreach``, ``fused``, ``maximize``,
            ``differentiable``, ``capturable``) are accepted where they change nothing here.
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
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        defaults = optimizer_defaults(type(self).__name__, lr, rule, projector, compat, kwargs)
        self.compat, self.nonfinite, self.skipped_steps = compat, nonfinite, 0
        self._group_of: dict[int, dict[str, Any]] = {}
        self._fallbacks: list[str] | None = []  # collected while __init__ adds the groups
        super().__init__(params, defaults)
        fallbacks, self._fallbacks = self._fallbacks, None
        warn_full_rank(fallbacks)
        self.register_load_state_dict_pre_hook(param_state.before_load)  # refuses a state that does not fit
        self.register_load_state_dict_post_hook(param_state.after_load)  # 8-bit states keep their dtypes

    def __setstate__(self, state: dict[str, Any]) -> None:
        """As torch's, plus the defaults of group keys added since a state dict was saved (the
        optimizer's and the group's projector's); ``load_state_dict`` replaces the group dicts,
        so the parameter -> group map is rebuilt."""
        super().__setstate__(state)
        self._group_of = {}
        for group in self.param_groups:
            for key, value in {**SUBSPACE_DEFAULTS, **PROJECTORS[group["projector"]].defaults}.items():
                group.setdefault(key, value)
            self._group_of.update((id(p), group) for p in group["params"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as ``torch.optim.Optimizer`` does, and check its hyperparameters.

        A group may set another ``projector`` or ``rule`` than the optimizer's (it then gets
        their defaults); keys that none of its parts takes are refused, so that nothing is
        silently ignored.
        """
        super().add_param_group(group_with_defaults(param_group, self.defaults))
        group = self.param_groups[-1]
        try:
            validate_group(group)
            for p in group["params"]:
                check_param(group, p, param_name(group, p))
        except Exception:
            self.param_groups.pop()
            raise
        # Documented fallback: vectors and >2-D tensors in a rank group train full-rank.
        fallbacks = [param_name(group, p) for p in group["params"] if group["rank"] is not None and p.dim() != 2]
        if self._fallbacks is None:
            warn_full_rank(fallbacks)
        else:
            self._fallbacks += fallbacks
        self._group_of.update((id(p), group) for p in group["params"])

    def _nonfinite(self, group: dict[str, Any], p: Tensor, nothing_updated: bool) -> bool:
        """Handle a non-finite gradient of ``p``: True to skip, else ``FloatingPointError``."""
        if self.nonfinite == "skip":
            return True
        where = f"non-finite gradient (NaN or Inf) in parameter {param_name(group, p)} of shape {tuple(p.shape)}"
        raise FloatingPointError(f"{where}; nothing was updated (pass nonfinite='skip' to skip such steps)" if nothing_updated else where)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimization step over every parameter that has a gradient.

        Every gradient is checked for NaN/Inf before any state changes. The parameters that
        step through this class read their gradients' norms in one pass
        (``torch._foreach_norm``; online PCA reuses them as ``||G||_F``); those that step
        through torch's fused kernels are checked by a plain sum, the cheapest full read (a sum
        that overflows is re-checked element by element, so a finite gradient is never
        refused); ``nonfinite="unchecked"`` leaves out the sums and the synchronisation. Sparse
        and complex gradients are refused (:func:`osd.hyperparams.check_grad`).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pairs = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        for group, p in pairs:
            check_grad(group, p)
        if not pairs:
            return loss
        groups = {id(group): group for group, _ in pairs}
        hparams = {key: RULES[group["rule"]].hparams(group) for key, group in groups.items()}  # read once per group and step
        in_torch = [param_state.steps_in_torch(group, p, self.state.get(p), hparams[id(group)]) for group, p in pairs]
        own = [pair for pair, torch_kernel in zip(pairs, in_torch) if not torch_kernel]
        fused = [pair for pair, torch_kernel in zip(pairs, in_torch) if torch_kernel]
        norms = [sharded.full(norm) for norm in torch._foreach_norm([p.grad for _, p in own])] if own else []
        bad = None if self.nonfinite == "unchecked" else _first_nonfinite(own, norms, fused, [p.grad.sum() for _, p in fused])
        if bad is not None:
            if self._nonfinite(*bad, nothing_updated=True):
                self.skipped_steps += 1
            return loss
        for (group, p), norm in zip(own, norms):
            self._update_param(group, p, p.grad, norm, hparams=hparams[id(group)])
        by_group: dict[int, list[Tensor]] = {}
        for group, p in fused:
            by_group.setdefault(id(group), []).append(p)
        for key, params in by_group.items():
            self._torch_step(groups[key], params, [p.grad for p in params], hparams[key])
        return loss

    # One parameter at a time (layer-wise updates, osd.layerwise) ----------------------

    def needs_full_grad(self, p: Tensor) -> bool:
        """Whether the next step of ``p`` needs its full gradient ``G``.

        False only for a projected weight whose ``P`` stays fixed through the step and whose
        projection rule does not read ``G`` afterwards (GaLore / GoLore between refreshes):
        then ``R = P^T G`` (see :meth:`project`) is all the step needs, and ``R`` is linear
        in ``G``, so micro-batch gradients can be projected and summed. Online PCA always
        reads ``G`` (``P`` moves with ``G G^T P``, which is not linear in ``G``).
        """
        state = self.state[p]
        if not is_projected(state):
            return True
        group = self._group_of[id(p)]
        return group["compensation"] is not None or PROJECTORS[group["projector"]].needs_grad(state, group)

    @torch.no_grad()
    def project(self, p: Tensor, grad: Tensor) -> Tensor:
        """``R = P^T G`` (``r x n``) of a gradient of ``p``, in canonical orientation."""
        state = self.state[p]
        return state[PROJ].mT @ canonical(state, grad)

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
                raise RuntimeError(f"parameter {param_name(group, p)} has no gradient to step with")
        elif self.needs_full_grad(p):
            raise RuntimeError(f"parameter {param_name(group, p)} needs its full gradient this step, not a projected one")
        norm = torch.linalg.vector_norm(grad if projected is None else projected)
        if self.nonfinite != "unchecked" and not torch.isfinite(norm):
            return not self._nonfinite(group, p, nothing_updated=False)
        self._update_param(group, p, grad, norm, projected)
        return True

    @torch.no_grad()
    def materialize_state(self, p: Tensor, grad: Tensor) -> None:
        """Create the state ``p`` holds after its first step (``P`` included) without
        stepping: on the meta device, this counts an optimizer's memory for free."""
        group = self._group_of[id(p)]
        self._init_state(group, p, grad)
        state = self.state[p]
        if is_projected(state):
            PROJECTORS[group["projector"]].prepare(state, canonical(state, grad), group)

    # The update of one parameter -----------------------------------------------------

    def _update_param(
        self, group: dict[str, Any], p: Tensor, grad: Tensor | None, grad_norm: Tensor, projected: Tensor | None = None, hparams: dict[str, Any] | None = None
    ) -> None:
        """``grad``: the full gradient (``grad_norm`` its norm), or None with ``projected = P^T G``
        (``grad_norm`` then the norm of ``projected``). ``hparams``: the rule's hyperparameters
        of ``group``, when the caller has read them already (once per group and step)."""
        rule = RULES[group["rule"]]
        hparams = rule.hparams(group) if hparams is None else hparams
        if projected is None and param_state.steps_in_torch(group, p, self.state.get(p), hparams):
            self._torch_step(group, [p], [grad], hparams)
            return
        state = self.state[p]
        if not state:
            self._init_state(group, p, grad)
        projector = PROJECTORS[group["projector"] if is_projected(state) else "identity"]
        with state_layout.float_states(state, group, p.dtype):
            G = None if grad is None else canonical(state, param_state.working_grad(group, grad, is_projected(state)))
            if G is not None:
                with transport.transporting(state, group, rule):
                    projector.prepare(state, G, group)
            P = state.get(PROJ)
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
                if state[TRANSPOSED]:
                    p.addmm_(direction.mT, P.mT, beta=beta, alpha=alpha)
                else:
                    p.addmm_(P, direction, beta=beta, alpha=alpha)
            else:
                update = direction if P is None else compensation.update(state, group, P, direction, rule_G, rule_input)
                update, scale = rule.finalize(update, group["scale"] if P is not None else 1.0, hparams)
                if decay_before:
                    p.mul_(1.0 - lr * decay)
                p.add_(sharded.like_param(canonical(state, update), p), alpha=-lr * scale)
            if decay and group["decay_after_update"]:
                p.add_(p, alpha=-lr * decay)  # W' - lr wd W', as Hugging Face's AdamW rounds it
            if G is not None:
                with transport.transporting(state, group, rule, in_place=projector.moves_in_advance(state)):
                    projector.advance(state, G, R, grad_norm, group)
        state["step"] += 1

    def _torch_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], hparams: dict[str, Any] | None = None) -> None:
        """Step full-rank ``params`` together through ``UpdateRule.torch_step`` (one fused kernel)."""
        rule = RULES[group["rule"]]
        hparams = rule.hparams(group) if hparams is None else hparams
        for p, grad in zip(params, grads):
            if not self.state[p]:
                self._init_state(group, p, grad)
        states = [self.state[p] for p in params]
        rule.torch_step(params, grads, states, hparams, group["lr"], [state["step"] + 1 for state in states])
        for state in states:
            state["step"] += 1

    def _init_state(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> None:
        """The state of ``p`` before its first step; its seed derives from ``p``'s position
        among all parameters (as in ``state_dict()``)."""
        index = next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"]) if q is p)
        param_state.init_state(self.state[p], group, p, grad, index)


def _first_nonfinite(
    own: list[tuple[dict[str, Any], Tensor]], norms: list[Tensor], fused: list[tuple[dict[str, Any], Tensor]], sums: list[Tensor]
) -> tuple[dict[str, Any], Tensor] | None:
    """The first (group, parameter) whose gradient holds a NaN or Inf, or None; one device
    synchronisation when every gradient is finite. ``norms``: the gradients' norms of
    ``own``; ``sums``: the gradients' sums of ``fused`` (a sum may overflow to Inf on finite
    values, so such a gradient is checked element by element before it is called bad)."""
    if torch.isfinite(torch.stack(norms + sums)).all():
        return None
    bad_norm = (pair for pair, norm in zip(own, norms) if not torch.isfinite(norm))
    bad_sum = (pair for pair, total in zip(fused, sums) if not torch.isfinite(total) and not torch.isfinite(pair[1].grad).all())
    return next(bad_norm, None) or next(bad_sum, None)
