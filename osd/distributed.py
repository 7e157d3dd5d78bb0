"""Data-parallel training under ``torchrun``: DDP or FSDP2, on PyTorch's own engine.

``torchrun --nproc-per-node N -m osd.train ...`` starts ``N`` processes; :func:`launched`
joins them into a process group (gloo on the CPU, NCCL on GPUs) from the environment that
torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
The pieces the training loop uses:

* :class:`Parallel`: this process's rank, the world size, its device and the mode
  (``"single"``, ``"ddp"`` or ``"fsdp"``); :func:`wrap` wraps the model accordingly
  (``DistributedDataParallel``, or ``fully_shard`` on every transformer block and the root).
* :func:`gradient_sync`: no gradient communication on the inner micro-batches of an
  accumulated step (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``).
* :func:`all_sum`, :func:`clip_grad_norm_`: sums over ranks; the global gradient norm of
  full or sharded gradients.
* :func:`model_state_dict`, :func:`optimizer_state_dict` and their loaders: checkpoints
  hold whole (unsharded) tensors, so any world size, a single process included, resumes.
* :func:`check_replicas`: a debug check that every rank holds the same ``P`` (and, under
  DDP, the same weights): an all-reduce of per-tensor checksums, raising on a mismatch.

DDP and FSDP average gradients over ranks; the training loop scales each rank's loss by the
world size (:attr:`Parallel.grad_scale`) so that the loss is normalised per token over the
global step, as in a single process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from osd import state_layout
from osd.sharded import full

__all__ = [
    "Parallel",
    "all_sum",
    "check_replicas",
    "clip_grad_norm_",
    "current",
    "gradient_sync",
    "is_main_process",
    "launched",
    "load_model_state_dict",
    "load_optimizer_state_dict",
    "model_state_dict",
    "optimizer_state_dict",
    "unwrap",
    "wrap",
]

T = TypeVar("T")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Parallel:
    """Where this process stands in a data-parallel run (the defaults: one process)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = CPU
    mode: str = "single"  # "single", "ddp" or "fsdp"

    @property
    def is_main(self) -> bool:
        """Rank 0 writes metrics, the config and checkpoints."""
        return self.rank == 0

    @property
    def grad_scale(self) -> float:
        """Factor on each rank's loss: DDP and FSDP average gradients over ranks, and the loss
        is already divided by the tokens of the whole global step."""
        return float(self.world_size)

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items of a global list (``items[rank::world_size]``)."""
        return list(items[self.rank :: self.world_size])

    def rows(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's contiguous block of a batch's rows (``torch.tensor_split``)."""
        return {key: torch.tensor_split(value, self.world_size)[self.rank] for key, value in batch.items()}


@contextlib.contextmanager
def launched(device: str = "auto") -> Iterator[None]:
    """Join torchrun's process group for the duration (gloo on the CPU, NCCL on CUDA) and
    leave it after; nothing happens outside torchrun (no ``WORLD_SIZE`` in the environment)
    or when a group already exists."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        yield
        return
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def current(device: torch.device, fsdp: bool = False) -> Parallel:
    """The :class:`Parallel` of this process: from the process group if there is one.

    ``device`` is the configured device; on CUDA each process takes ``cuda:LOCAL_RANK``.
    Raises ``ValueError`` for ``fsdp`` without a process group (not started by torchrun).
    """
    if not dist.is_initialized():
        if fsdp:
            raise ValueError("--fsdp needs a process group: launch with torchrun --nproc-per-node N -m osd.train ...")
        return Parallel(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return Parallel(dist.get_rank(), dist.get_world_size(), device, "fsdp" if fsdp else "ddp")


def is_main_process() -> bool:
    """Whether this process is rank 0 of its group (or there is no group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def wrap(model: nn.Module, parallel: Parallel) -> nn.Module:
    """``model`` (already on ``parallel.device``) wrapped for ``parallel.mode``.

    FSDP2 shards every module named in the model's ``_no_split_modules`` (the transformer
    blocks of a ``transformers`` model) and then the root, over a 1-D mesh of all ranks.
    Build the optimizer afterwards, from :func:`unwrap` of the result: ``fully_shard``
    replaces the parameters by sharded DTensors.
    """
    if parallel.mode == "ddp":
        return DistributedDataParallel(model, device_ids=[parallel.device.index] if parallel.device.type == "cuda" else None)
    if parallel.mode == "fsdp":
        mesh = init_device_mesh(parallel.device.type, (parallel.world_size,))
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 modules are their own model)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run a forward and backward with (``enabled``) or without gradient communication; use
    ``enabled=False`` on all but the last micro-batch of a step."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    yield


def all_sum(values: Sequence[float], parallel: Parallel) -> list[float]:
    """Element-wise sums of ``values`` over all ranks, in float64 (unchanged in one process)."""
    if parallel.world_size == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=parallel.device)
    dist.all_reduce(total)
    return total.tolist()


def clip_grad_norm_(parameters: Sequence[Tensor], max_norm: float) -> Tensor:
    """Scale the gradients so that their global 2-norm is at most ``max_norm``; return that norm.

    ``torch.nn.utils.clip_grad_norm_`` in two parts so that sharded (DTensor) gradients
    work: the norm of sharded gradients is reduced over ranks before it scales them.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = full(torch.nn.utils.get_total_norm(grads))
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole model state on the CPU, keyed as in the bare model (no ``module.``).

    A collective under FSDP (call it on every rank); there only rank 0 receives the tensors.
    """
    return get_model_state_dict(model, options=_FULL)


def load_model_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a :func:`model_state_dict` into a bare, DDP or FSDP2 model (every rank passes it)."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole onto the CPU,
    so that a single process can load it. A collective under FSDP (call it on every rank)."""
    saved = optimizer.state_dict()
    saved["state"] = {
        index: {key: full(value).cpu() if isinstance(value, DTensor) else value for key, value in state.items()}
        for index, state in saved["state"].items()
    }
    return saved


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load an :func:`optimizer_state_dict`; under FSDP the state of sharded parameters that
    their rule keeps sharded (:func:`osd.state_layout.keeps_shards`; every tensor state of a torch
    optimizer) is split like its parameter again (no communication)."""
    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not isinstance(p, DTensor) or not state:
                continue
            if not state_layout.keeps_shards(group, state):
                continue
            for key, value in state.items():
                if isinstance(value, Tensor) and not isinstance(value, DTensor) and value.shape == p.shape:
                    state[key] = distribute_tensor(value.to(p.device_mesh.device_type), p.device_mesh, p.placements, src_data_rank=None)


def _replicated_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, Tensor]]:
    """(name, tensor) of everything every rank must hold identically: the optimizer state that
    is not sharded (``P``, low-rank moments ...) and the parameters that are not sharded."""
    names = {id(p): name for name, p in unwrap(model).named_parameters()}
    tensors = [(name, p.detach()) for name, p in unwrap(model).named_parameters() if not isinstance(p, DTensor)]
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor) and not isinstance(value, DTensor) and value.dim() > 0:
                tensors.append((f"{names.get(id(p), '?')} state {key!r}", value))
    return tensors


def check_replicas(model: nn.Module, optimizer: torch.optim.Optimizer, parallel: Parallel) -> None:
    """Raise ``RuntimeError`` unless every rank holds bitwise-equal replicated tensors.

    Each tensor's checksum is ``(sum x, sum x^2)`` in float64; the element-wise minimum and
    maximum of the checksums over ranks (two all-reduces) must agree. Under FSDP the sharded
    parameters are skipped (ranks hold different shards by design).
    """
    if parallel.world_size == 1:
        return
    tensors = _replicated_tensors(model, optimizer)
    sums = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for _, t in tensors]).to(parallel.device)
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differs = (low != high).any(dim=1)
    if differs.any():
        index = int(differs.nonzero()[0])
        raise RuntimeError(
            f"ranks disagree on {tensors[index][0]}: checksums (sum, sum of squares) range from "
            f"{low[index].tolist()} to {high[index].tolist()} ({int(differs.sum())} of {len(tensors)} tensors differ)"
        )
