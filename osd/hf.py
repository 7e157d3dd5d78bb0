"""Our optimizers in the Hugging Face ``Trainer``, for any ``transformers`` model.

    from transformers import Trainer, TrainingArguments
    from osd.hf import create_trainer_optimizer

    args = TrainingArguments("out", learning_rate=1e-3, weight_decay=0.1, optim_target_modules=["attn", "mlp"])
    optimizer = create_trainer_optimizer(model, args, "osd_adamw", rank=128, scale=0.25)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train()  # the Trainer builds its lr schedule (args.lr_scheduler_type, warmup) on this optimizer

The Trainer saves ``optimizer.state_dict()`` with its checkpoints and reloads it with
``torch.load(weights_only=True)``; our optimizer state holds only tensors, ints and bools,
so ``trainer.train(resume_from_checkpoint=...)`` restores ``P`` and the moments exactly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from osd.optimizer import SubspaceOptimizer
from osd.param_groups import param_groups
from osd.presets import METHODS, optimizer_names

__all__ = ["create_trainer_optimizer", "target_module_names"]

DEFAULT_TARGETS = ("attn", "mlp")


def target_module_names(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules that ``optim_target_modules`` selects.

    As in ``TrainingArguments.optim_target_modules``: a string is a regular expression that
    must match a whole module name; a sequence of strings selects names containing any of them.
    Raises ``ValueError`` if nothing matches.
    """
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if isinstance(targets, str):
        chosen = [name for name in linear if re.fullmatch(targets, name)]
    else:
        chosen = [name for name in linear if any(t in name for t in targets)]
    if not chosen:
        raise ValueError(f"optim_target_modules {targets!r} selects no nn.Linear module of {type(model).__name__}")
    return chosen


def create_trainer_optimizer(
    model: nn.Module,
    args: Any,
    name: str = "osd_adamw",
    rank: int = 128,
    target_modules: str | Sequence[str] | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Optimizer ``name`` (``osd_adamw``, ``galore_adamw``, ``golore_lion`` ...) for ``model``,
    configured from ``args`` (a ``transformers.TrainingArguments``).

    - projected weights: the ``nn.Linear`` modules selected by ``target_modules``, else
      ``args.optim_target_modules``, else names containing ``attn`` or ``mlp``
      (:func:`target_module_names`), at ``rank``; everything else trains full-rank;
    - ``lr = args.learning_rate``; ``args.weight_decay`` (decoupled) on matrices only,
      none on vectors (biases, norm gains), as the Trainer does;
    - AdamW rules take ``betas = (args.adam_beta1, args.adam_beta2)`` and ``eps = args.adam_epsilon``;
    - ``kwargs``: any other hyperparameter (``scale``, ``update_proj_gap``, ``alpha`` ...),
      overriding the above.
    """
    method, _, rule = name.rpartition("_")
    if name not in optimizer_names() or not method:
        raise ValueError(f"{name!r} is not a subspace optimizer; use one of {[n for n in optimizer_names() if '_' in n]}")
    targets = target_modules or getattr(args, "optim_target_modules", None) or DEFAULT_TARGETS
    groups = param_groups(model, rank=rank, target_modules=target_module_names(model, targets))
    full_rank = groups.pop()["params"] if len(groups) == 2 else []
    groups += [
        {"params": [(n, p) for n, p in full_rank if p.dim() >= 2]},
        {"params": [(n, p) for n, p in full_rank if p.dim() < 2], "weight_decay": 0.0},
    ]
    hparams: dict[str, Any] = {"weight_decay": args.weight_decay, "seed": args.seed}
    if rule == "adamw":
        hparams.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    groups = [group for group in groups if group["params"]]
    return SubspaceOptimizer(groups, args.learning_rate, rule=rule, projector=METHODS[method], **{**hparams, **kwargs})
