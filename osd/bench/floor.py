"""The floor of an optimizer step: its matrix-product FLOPs and compulsory memory traffic,
priced at this machine's measured GEMM rate and memory bandwidth.

For a projected weight in canonical orientation (``G``, ``W``: ``m x n``, ``P``: ``m x r``):

- products: ``R = P^T G`` and the update ``P D`` cost ``2 m n r`` FLOPs each; an online-PCA
  step adds ``Y = G Z`` (``2 m n r``) and four ``m x r x r`` products (``P^T Y``, ``P^T P``,
  ``Y (A - 2I)``, ``P (Z^T Z ...)``: ``8 m r^2``). A GaLore / GoLore step between refreshes
  has only the first two.
- bytes: ``G`` read once, ``W`` read and written once, every state tensor (moments, 8-bit
  codes and block maxima, ``P``'s optimizer's moments) read and written once, ``P`` read
  once (and written once when it moves, online PCA).

A full-rank parameter costs no products and ``grad + 2 param + 2 states`` bytes, what a
fused AdamW reads and writes. Elementwise FLOPs are not counted: at a few per byte they hide
behind the memory traffic. The floor is ``sum(FLOPs_w / rate_w) + bytes / bandwidth``, where
``rate_w`` is the measured rate of an ``(r x m) @ (m x n)`` product of that weight's shape
(matrix products and streaming do not overlap in an eager step) and the bandwidth that of a
large copy.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from osd.state_layout import PROJ, eight_bit_keys, is_projected

__all__ = ["StepCost", "MachineRates", "step_cost", "measure_rates", "floor_ms"]


@dataclass
class StepCost:
    """FLOPs of the matrix products per weight shape ``(m, n, r)``, and bytes moved, of one step."""

    gemm_flops: dict[tuple[int, int, int], float] = field(default_factory=dict)
    bytes: float = 0.0

    @property
    def flops(self) -> float:
        return sum(self.gemm_flops.values())


@dataclass
class MachineRates:
    """Measured GEMM rate (FLOP/s) per product shape ``(m, n, r)`` and memory bandwidth (B/s)."""

    gemm: dict[tuple[int, int, int], float]
    bandwidth: float


def _state_bytes(state: dict[Any, Any]) -> int:
    """Bytes of the optimizer state tensors of one parameter (not ``P``, steps or shapes)."""
    return sum(v.nbytes for k, v in state.items() if isinstance(v, Tensor) and k not in (PROJ, "step") and not str(k).endswith(eight_bit_keys("")[2]))


def step_cost(optimizer: torch.optim.Optimizer) -> StepCost:
    """The cost of one regular step of ``optimizer``, read from its (initialised) state."""
    cost = StepCost()
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            cost.bytes += p.nbytes * 3 + 2 * _state_bytes(state)  # G read, W read + write, states read + write
            if not is_projected(state):
                continue
            P = state[PROJ]
            m, r = P.shape
            n = p.numel() // m
            moves = group.get("projector") == "online_pca"
            flops = 4 * m * n * r + (2 * m * n * r + 8 * m * r * r if moves else 0)
            cost.gemm_flops[(m, n, r)] = cost.gemm_flops.get((m, n, r), 0.0) + flops
            cost.bytes += P.nbytes * (2 if moves else 1)
    return cost


def _median_seconds(call: Any, repeats: int, device: torch.device) -> float:
    call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_rates(shapes: list[tuple[int, int, int]], device: torch.device | str = "cpu", repeats: int = 5, copy_mib: int = 256) -> MachineRates:
    """GEMM rate of ``(r x m) @ (m x n)`` (``P^T G``) for each shape, and the bandwidth of
    copying ``copy_mib`` MiB (read + write), both as medians of ``repeats`` runs."""
    device = torch.device(device)
    gemm = {}
    for m, n, r in shapes:
        P, G = torch.randn(m, r, device=device), torch.randn(m, n, device=device)
        gemm[(m, n, r)] = 2 * m * n * r / _median_seconds(lambda: P.mT @ G, repeats, device)
    src = torch.ones(copy_mib * 2**18, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.nbytes / _median_seconds(lambda: dst.copy_(src), repeats, device)
    return MachineRates(gemm, bandwidth)


def floor_ms(cost: StepCost, rates: MachineRates) -> float:
    """The step's floor in milliseconds: products at their shapes' rates plus bytes at the bandwidth."""
    return 1e3 * (sum(flops / rates.gemm[shape] for shape, flops in cost.gemm_flops.items()) + cost.bytes / rates.bandwidth)
