"""GaLore's SVD refreshes spread over the ranks of a data-parallel run.

Under DDP every rank holds the same all-reduced gradients, so every rank would compute the
same SVD of every projected weight every ``update_proj_gap`` steps. :func:`spread_refreshes`,
run at the start of ``optimizer.step()`` (a step pre-hook that :func:`spread_svd` installs
once, so every caller of ``step()`` gets it: ``osd train``, the Hugging Face Trainer, your
own loop), instead has weight ``i`` (in the order
of the refreshes due at this step) computed by rank ``i mod w`` alone, with the projector's
own ``prepare`` (so the result is exactly what every rank would have computed), and then
broadcast from that rank into every other rank's ``P``. It marks the step in
``state["basis_step"]``, so that the optimizer's own ``prepare`` does not recompute it.

Cost per refresh step: each rank computes ``~1/w`` of the SVDs; one broadcast of ``P``
(``m r`` elements) per projected weight. Under FSDP the gradient of every due weight is
all-gathered once more (every rank takes part; the owner keeps it until its SVD is done).
Steps with no refresh due cost nothing. Random bases (GoLore) take the same route; their
draw is cheap, but it keeps one code path. Online PCA (OSD) has no periodic refresh.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.hooks import RemovableHandle

from osd import sharded
from osd.projectors import PROJECTORS, refresh_due
from osd.state_layout import BASIS_STEP, PROJ, canonical, is_projected

__all__ = ["spread_refreshes", "spread_svd"]

# The built-in projectors whose refreshes are spread (for reference: :func:`spread_refreshes`
# asks each group's projector, ``Projector.refreshes_periodically``, so one registered later counts too).
SPREAD_PROJECTORS = tuple(name for name, projector in PROJECTORS.items() if projector.refreshes_periodically)


def spread_svd(optimizer: torch.optim.Optimizer, rank: int | None = None, world_size: int | None = None) -> RemovableHandle | None:
    """Install :func:`spread_refreshes` as a step pre-hook of ``optimizer``, for this process's
    ``rank`` of ``world_size`` (default: the initialised process group's); return its handle,
    or None in a single process (nothing to spread)."""
    if rank is None or world_size is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size == 1:
        return None
    return optimizer.register_step_pre_hook(lambda opt, args, kwargs: spread_refreshes(opt, rank, world_size))


def spread_refreshes(optimizer: torch.optim.Optimizer, rank: int, world_size: int) -> None:
    """Compute the ``P`` refreshes due at this step once over all ranks, not on every rank.

    Only parameters whose state exists (after their first step) take part; a weight whose
    gradient holds NaN or Inf is not marked, so the optimizer's own handling applies. Call it
    on every rank (collective); every rank checks every due gradient, so all agree.
    """
    if world_size == 1:
        return
    due = []
    for group in optimizer.param_groups:
        projector = PROJECTORS.get(group.get("projector"))
        if projector is None or not projector.refreshes_periodically or group.get("moment_transport") is not None:
            continue  # a weight with moment transport needs its old P at the refresh: not spread
        for p in group["params"]:
            state = optimizer.state.get(p)
            if p.grad is not None and state and is_projected(state) and refresh_due(state, group):
                due.append((group, p, state))
    owned, finite = [], []
    for i, (group, p, state) in enumerate(due):
        grad = sharded.full(p.grad)  # collective under FSDP: every rank, every due weight
        finite.append(bool(torch.isfinite(grad).all()))
        if i % world_size == rank and finite[-1]:
            owned.append((group, state, canonical(state, grad)))
    for group, state, G in owned:
        PROJECTORS[group["projector"]].prepare(state, G, group)
    for _, _, state in due:  # gloo and NCCL broadcast contiguous tensors only
        state[PROJ] = state[PROJ].contiguous()
    works = [dist.broadcast(state[PROJ], src=i % world_size, async_op=True) for i, (_, _, state) in enumerate(due)]
    for work in works:
        work.wait()
    for (_, _, state), ok in zip(due, finite):
        if ok:  # else the optimizer raises or skips the step, and a retry refreshes P itself
            state[BASIS_STEP] = state["step"]
