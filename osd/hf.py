"""Our optimizers in the Hugging Face ``Trainer``, for any ``transformers`` model.

The shortest route: the Trainer builds the optimizer itself (so it also works where it
refuses a ready-made one, e.g. under FSDP), from ``optimizer_cls_and_kwargs``:

    from transformers import Trainer, TrainingArguments
    from osd.hf import optimizer_cls_and_kwargs

    args = TrainingArguments("out", learning_rate=1e-2, optim_target_modules="blocks", optim_args="rank=128")
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, "osd_adamw"))
    trainer.train()  # the Trainer adds its lr schedule (args.lr_scheduler_type, warmup) to this optimizer

``TrainingArguments(optim="osd_adamw")`` cannot work: ``optim`` is a closed list of
transformers' own names. The ready-made route, ``optimizers=(create_trainer_optimizer(model,
args, ...), None)``, still works without FSDP.

The Trainer saves ``optimizer.state_dict()`` with its checkpoints and reloads it with
``torch.load(weights_only=True)``; our optimizer state holds only tensors, ints and bools,
so ``trainer.train(resume_from_checkpoint=...)`` restores ``P`` and the moments exactly.

No layer-wise mode here: the Trainer clips the global gradient norm after the backward,
when a layer-wise run has already stepped and freed the gradients (layer-wise runs clip per
parameter, inside the optimizer), and the last accumulation of an epoch may hold fewer
micro-batches than :class:`osd.layerwise.LayerwiseUpdates` counts on. transformers' own
``galore_adamw_layerwise`` refuses gradient accumulation and DDP for such reasons.
``osd train --layerwise`` does it right.

Under DDP or FSDP the SVD refreshes of GaLore / GoLore are spread over the ranks, as in
``osd train`` (:func:`osd.spread.spread_svd`, a step pre-hook).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from osd.optimizer import SubspaceOptimizer
from osd.param_groups import Targets, describe, optimizer_groups
from osd.presets import METHODS, optimizer_names
from osd.spread import spread_svd as install_spread

__all__ = ["TrainerOptimizer", "create_trainer_optimizer", "optimizer_cls_and_kwargs", "parse_optim_args"]

logger = logging.getLogger(__name__)


def parse_optim_args(text: str | None) -> dict[str, Any]:
    """``TrainingArguments.optim_args`` (``"rank=128, scale=0.25, proj_type=std"``) as keywords:
    each value an int, a float, ``True``/``False``/``None`` where it reads as one, else a string."""
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"optim_args: expected key=value, got {item!r}")
        value = value.strip()
        for kind in (int, float):
            try:
                kwargs[key.strip()] = kind(value)
                break
            except ValueError:
                continue
        else:
            kwargs[key.strip()] = {"True": True, "False": False, "None": None}.get(value, value)
    return kwargs


def _check_subspace(name: str) -> None:
    if name not in optimizer_names() or "_" not in name:
        raise ValueError(f"{name!r} is not a subspace optimizer; use one of {[n for n in optimizer_names() if '_' in n]}")


def create_trainer_optimizer(
    model: nn.Module,
    args: Any,
    name: str = "osd_adamw",
    rank: int | None = None,
    target_modules: Targets | None = None,
    spread_svd: bool = True,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Optimizer ``name`` (``osd_adamw``, ``galore_adamw``, ``golore_lion`` ...) for ``model``,
    configured from ``args`` (a ``transformers.TrainingArguments``).

    - projected weights: those ``target_modules`` selects, else ``args.optim_target_modules``,
      else ``"blocks"`` (every linear map but the embeddings and the head; see
      :mod:`osd.param_groups`), at ``rank`` (default: a quarter of each weight's smaller side);
      everything else trains full-rank;
    - ``lr = args.learning_rate``; ``args.weight_decay`` (decoupled) on matrices only,
      none on vectors (biases, norm gains), as the Trainer does; the groups follow
      :func:`osd.param_groups.optimizer_groups` as ``osd.create_optimizer``'s do (float32
      embedding states under ``optim_bits=8``, Muon's vectors and embeddings on AdamW);
    - AdamW rules take ``betas = (args.adam_beta1, args.adam_beta2)`` and ``eps = args.adam_epsilon``;
    - ``args.optim_args`` (``"rank=128, scale=0.25"``), then ``kwargs``: any other
      hyperparameter (``scale``, ``update_proj_gap``, ``alpha`` ...), overriding the above;
    - under a process group of several ranks (DDP, FSDP), GaLore's / GoLore's SVD refreshes
      are spread over the ranks (:func:`osd.spread.spread_svd`) unless ``spread_svd=False``.
    """
    _check_subspace(name)
    method, _, rule = name.rpartition("_")
    kwargs = {**parse_optim_args(getattr(args, "optim_args", None)), **kwargs}
    rank = kwargs.pop("rank", rank)
    targets = target_modules or getattr(args, "optim_target_modules", None) or "blocks"
    groups = optimizer_groups(model, rule, rank, targets, optim_bits=kwargs.get("optim_bits", 32), decay_vectors=False)
    hparams: dict[str, Any] = {"weight_decay": args.weight_decay, "seed": args.seed}
    if rule == "adamw":
        hparams.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    optimizer = SubspaceOptimizer(groups, args.learning_rate, rule=rule, projector=METHODS[method], **{**hparams, **kwargs})
    logger.info("%s: %s", name, describe(optimizer.param_groups))
    if spread_svd:
        install_spread(optimizer)
    return optimizer


class TrainerOptimizer:
    """The optimizer factory the Trainer calls as ``TrainerOptimizer()(model, **kwargs)``
    (transformers' protocol for optimizers that need the model); see :func:`optimizer_cls_and_kwargs`."""

    def __call__(self, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        return create_trainer_optimizer(model, **kwargs)


def optimizer_cls_and_kwargs(
    args: Any, name: str = "osd_adamw", rank: int | None = None, target_modules: Targets | None = None, **kwargs: Any
) -> tuple[type, dict[str, Any]]:
    """``Trainer(optimizer_cls_and_kwargs=...)`` for optimizer ``name``: the Trainer then builds
    :func:`create_trainer_optimizer` ``(model, args, name, rank, target_modules, **kwargs)`` itself."""
    _check_subspace(name)
    return TrainerOptimizer, {"args": args, "name": name, "rank": rank, "target_modules": target_modules, **kwargs}
