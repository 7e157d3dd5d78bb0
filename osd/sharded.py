"""Sharded (FSDP2 / DTensor) parameters inside :class:`osd.optimizer.SubspaceOptimizer`.

Under ``torch.distributed.fsdp.fully_shard`` every parameter ``W`` (``m x n``) and its
gradient ``G`` are DTensors split by rows across the ``w`` ranks: a rank holds ``~m/w`` rows.

* A **projected** weight needs ``G`` whole: the SVD and the online-PCA step act on the
  whole matrix, and ``R = P^T G`` sums over the rows (or columns) that other ranks hold.
  Its gradient is therefore all-gathered (:func:`full`); every rank then computes the same
  ``P``, ``R``, moments and full update ``P D`` from the same numbers, and keeps only its own
  rows of that update (:func:`like_param`). Cost per projected weight and step: one
  all-gather of ``G`` (each rank receives ``(w-1)/w * m n`` elements, the same volume as
  FSDP's own all-gather of ``W``), a transient ``m x n`` gradient and update on each rank
  (freed after the weight is updated), and the low-rank state (``P``: ``m r``, AdamW
  moments ``2 r n``) replicated on every rank rather than split ``w`` ways.
* A **full-rank** parameter (embeddings, ``lm_head``, norms) under an elementwise rule
  (AdamW, Lion, SGD: ``UpdateRule.elementwise``) needs nothing from other ranks: the rule runs on the local shard and its
  state is sharded like the parameter (:func:`keeps_shards`). Adafactor's factored second
  moment averages over rows and columns, so it takes the gathered route as well.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from osd.rules import get_rule

__all__ = ["full", "keeps_shards", "like_param"]


def keeps_shards(rule: str, projected: bool) -> bool:
    """Whether a parameter's gradient and rule state stay sharded (else: gathered, replicated):
    a full-rank parameter whose rule is elementwise (:attr:`osd.rules.UpdateRule.elementwise`)."""
    return not projected and get_rule(rule).elementwise


def full(tensor: Tensor) -> Tensor:
    """The whole tensor behind a DTensor (a collective: every rank must call it in the same
    order); any other tensor unchanged."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like_param(update: Tensor, param: Tensor) -> Tensor:
    """``update`` (the whole ``param``-shaped update, the same on every rank) laid out as
    ``param``: this rank's shard of it if ``param`` is a DTensor (no communication)."""
    if isinstance(param, DTensor) and not isinstance(update, DTensor):
        return distribute_tensor(update, param.device_mesh, param.placements, src_data_rank=None)
    return update
