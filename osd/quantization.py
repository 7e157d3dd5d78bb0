"""Block-wise 8-bit storage of optimizer states (Dettmers et al., "8-bit Optimizers via
Block-wise Quantization", 2022), on any device.

A float tensor ``x`` is flattened, zero-padded to a multiple of ``BLOCK_SIZE`` and cut into
blocks; each block keeps its absolute maximum ``s_b`` (float32) and every element the
uint8 index of the nearest value of ``x / s_b`` in a dynamic-exponent code map (256
values in [-1, 1], or [0, 1] for states that are never negative such as Adam's second
moment). Storage: ``numel_padded`` bytes of codes + 4 bytes per block, about 1/4 of
float32.

The code maps, block scaling and dequantisation are torchao's (``torchao.optim``), the same
as behind its ``AdamW8bit``; they are plain PyTorch ops, so they run on CPU and GPU alike.
The nearest-code search is ``torch.bucketize`` over the midpoints of the map: torchao's
branchless binary search is written to be fused by ``torch.compile`` and, run eagerly, is
about 4x slower on this CPU; the codes are the same (ties round up in both). What is stored are two plain tensors, so ``state_dict()`` still loads with
``torch.load(weights_only=True)`` (torchao's tensor subclass would not).
"""

from __future__ import annotations

import logging
import math
from functools import cache

import torch
from torch import Tensor

__all__ = ["BLOCK_SIZE", "quantize", "dequantize", "quantized_nbytes"]

BLOCK_SIZE = 256


@cache
def _quant_utils():
    """torchao's quantisation helpers, imported on first use (torchao takes seconds to
    import and logs warnings about CUDA kernels it cannot load on a CPU-only machine).
    Cached: the logger's level is silenced and restored once, not on every (de)quantisation."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torchao.optim import quant_utils
    except ImportError as error:
        raise ImportError("8-bit optimizer states need torchao: pip install 'osd-optim[train]' (or torchao)") from error
    finally:
        logger.setLevel(level)
    return quant_utils


@cache
def _code_map(signed: bool, device: torch.device) -> Tensor:
    return torch.tensor(_quant_utils().create_dynamic_map(signed=signed), dtype=torch.float32, device=device)


@cache
def _midpoints(signed: bool, device: torch.device) -> Tensor:
    code_map = _code_map(signed, device)
    return (code_map[1:] + code_map[:-1]) / 2


def _padded_numel(numel: int) -> int:
    return math.ceil(numel / BLOCK_SIZE) * BLOCK_SIZE


def quantized_nbytes(numel: int) -> int:
    """Bytes that :func:`quantize` stores for a tensor of ``numel`` elements."""
    padded = _padded_numel(numel)
    return padded + 4 * (padded // BLOCK_SIZE)


def quantize(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``(codes, absmax)``: uint8 codes (``numel`` padded to a multiple of ``BLOCK_SIZE``)
    and the float32 absolute maximum of each block. ``signed=False`` for tensors that are
    never negative (it spends all 256 codes on [0, 1])."""
    flat = x.detach().reshape(-1).float()
    missing = _padded_numel(flat.numel()) - flat.numel()
    blocks = (torch.nn.functional.pad(flat, (0, missing)) if missing else flat).view(-1, BLOCK_SIZE)
    # torchao's block scaling (``quant_utils.scale_tensor``), with the maximum taken without an |x| temporary.
    absmax = torch.linalg.vector_norm(blocks, ord=math.inf, dim=1).clip_(1e-12)
    scaled = blocks / absmax.unsqueeze(1)
    return torch.bucketize(scaled, _midpoints(signed, x.device), out_int32=True, right=True).to(torch.uint8).view(-1), absmax


def dequantize(codes: Tensor, absmax: Tensor, signed: bool, shape: torch.Size) -> Tensor:
    """The float32 tensor of ``shape`` that ``codes`` and ``absmax`` stand for."""
    # torchao's ``quant_utils.dequant_with_qmap``, scaling in place.
    blocks = _code_map(signed, codes.device)[codes.int()].view(absmax.shape[0], -1).mul_(absmax.unsqueeze(1))
    return blocks.view(-1)[: math.prod(shape)].view(shape)
