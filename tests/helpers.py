"""Small shared helpers for the tests: seeded gradient streams and relative errors."""

from __future__ import annotations

import torch


def gradient_stream(shape: tuple[int, ...], steps: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """``steps`` seeded gradients of ``shape``: a fixed low-rank signal plus fresh noise."""
    gen = torch.Generator().manual_seed(seed)
    if len(shape) != 2:
        return [torch.randn(*shape, generator=gen, dtype=dtype) for _ in range(steps)]
    m, n = shape
    k = max(1, min(m, n) // 4)
    left = torch.randn(m, k, generator=gen, dtype=dtype)
    right = torch.randn(k, n, generator=gen, dtype=dtype)
    signal = left @ right / k**0.5
    return [signal + 0.5 * torch.randn(m, n, generator=gen, dtype=dtype) for _ in range(steps)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor, origin: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected - origin||``: the error relative to how far the
    reference moved, so that a large weight cannot hide a wrong update."""
    return ((actual - expected).norm() / (expected - origin).norm()).item()
