"""How many bytes an optimizer's state takes, split by what it is for."""

from __future__ import annotations

import torch

__all__ = ["state_bytes"]


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state held in tensors, by kind.

    - ``moments``: the inner rule's state (``exp_avg``, ``exp_avg_sq``, Adafactor's factors, ...);
    - ``projection``: the projection matrices ``P`` (``state["proj"]``);
    - ``proj_optimizer``: the state of ``P``'s own optimizer (``state["proj_*"]``, OSD);
    - ``total``: their sum.

    Works for any ``torch.optim.Optimizer`` (a full-rank torch optimizer has only moments;
    its ``step`` tensors count there too). Counts ``numel * element_size`` of each tensor once.
    """
    counts = {"moments": 0, "projection": 0, "proj_optimizer": 0}
    seen: set[int] = set()
    for param_state in optimizer.state.values():
        for key, value in param_state.items():
            if not isinstance(value, torch.Tensor) or id(value) in seen:
                continue
            seen.add(id(value))
            kind = "projection" if key == "proj" else "proj_optimizer" if key.startswith("proj_") else "moments"
            counts[kind] += value.numel() * value.element_size()
    counts["total"] = sum(counts.values())
    return counts
