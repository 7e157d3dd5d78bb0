"""How many bytes training takes: optimizer state by kind, and a whole-run estimate.

The estimate counts what a training step holds, by part:

- ``weights``: every parameter;
- ``gradients``: every gradient at once (ordinary steps), or the largest single weight's
  (layer-wise updates without accumulation: each weight steps and frees its gradient in
  backward; see :mod:`osd.layerwise`);
- ``moments``, ``projection``, ``proj_optimizer``: the optimizer state, counted on a copy
  of the model on the meta device, so it is exactly what the real optimizer allocates
  (8-bit storage, float32 embeddings and all);
- ``activations``: what autograd keeps for backward, from :func:`activation_bytes` (an
  estimate; ``osd memory --measure`` puts the measured peak beside it).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from osd import state_layout
from osd.optimizer import SubspaceOptimizer

__all__ = ["PARTS", "activation_bytes", "estimate_memory", "state_bytes"]

PARTS = ("weights", "gradients", "moments", "projection", "proj_optimizer", "activations")


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state held in tensors, by kind.

    - ``moments``: the inner rule's state (``exp_avg``, ``exp_avg_sq``, Adafactor's factors,
      their 8-bit codes and block maxima, ...) and the compensation's limiter (one scalar
      per weight, :mod:`osd.compensation`);
    - ``projection``: the projection matrices ``P``;
    - ``proj_optimizer``: the state of ``P``'s own optimizer (OSD) and the gradient sketch of
      the ``sketch_pca`` projector;
    - ``total``: their sum.

    Which key is which: :func:`osd.state_layout.part`. Works for any ``torch.optim.Optimizer`` (a full-rank torch optimizer has only moments;
    its ``step`` tensors count there too). Counts ``numel * element_size`` of each tensor once.
    """
    counts = dict.fromkeys(state_layout.PARTS, 0)
    seen: set[int] = set()
    for param_state in optimizer.state.values():
        for key, value in param_state.items():
            if not isinstance(value, torch.Tensor) or id(value) in seen:
                continue
            seen.add(id(value))
            counts[state_layout.part(key)] += value.numel() * value.element_size()
    counts["total"] = sum(counts.values())
    return counts


def activation_bytes(config, batch_size: int, seq_len: int, checkpointing: bool, dtype: torch.dtype = torch.float32) -> int:
    """Estimated bytes autograd saves for backward in a ``LlamaForCausalLM`` step.

    Per token, with hidden size ``h``, MLP size ``i`` and vocabulary ``V``, a decoder layer
    saves about ``10 h + 4 i`` values: the inputs and normalised outputs of its two RMSNorms
    (``3 h`` each), ``q, k, v`` and the attention output for the fused attention kernel
    (``4 h``), and the SwiGLU's gate, ``silu(gate)``, up and product (``4 i``). The head saves
    the logits, their shifted copy and the log-softmax (``3 V``, float32). With activation
    checkpointing a layer keeps only its input (``h``) and one layer's ``10 h + 4 i`` is live
    again while it is recomputed.
    """
    h, i, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    tokens = batch_size * seq_len
    per_layer = 10 * h + 4 * i
    kept = layers * h + per_layer if checkpointing else layers * per_layer
    element = torch.empty((), dtype=dtype).element_size()
    return tokens * ((kept + h) * element + 3 * vocab * 4)


def estimate_memory(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    layerwise: bool = False,
    activations: int = 0,
) -> dict[str, int]:
    """Bytes by part (:data:`PARTS`, plus ``total``) of training ``model`` with ``optimizer``.

    Build both on the meta device (``with torch.device("meta"): ...``) to count a model
    of any size without allocating it; the optimizer state is created with
    ``materialize_state`` (subspace optimizers) or one ``step()`` (torch optimizers) on
    meta gradients. ``activations`` comes from :func:`activation_bytes`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() * p.element_size() for p in params]
    _materialize(optimizer, params)
    state = state_bytes(optimizer)
    parts = {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": max(sizes, default=0) if layerwise else sum(sizes),
        "moments": state["moments"],
        "projection": state["projection"],
        "proj_optimizer": state["proj_optimizer"],
        "activations": activations,
    }
    parts["total"] = sum(parts.values())
    return parts


def _materialize(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    for p in params:
        p.grad = torch.empty_like(p)
        if isinstance(optimizer, SubspaceOptimizer):
            optimizer.materialize_state(p, p.grad)
    if not isinstance(optimizer, SubspaceOptimizer):
        optimizer.step()
