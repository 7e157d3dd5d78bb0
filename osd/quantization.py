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
On a CPU, both directions run as two compiled C loops (:mod:`osd.native`, 1.75-2.5x faster,
the same bits) wherever a C compiler is at hand; the torch ops below are the reference, the
fallback and the GPU path.
The nearest code is found by table lookup on a float's top 16 bits (:func:`_nearest_codes`),
the same codes as ``torch.bucketize`` over the midpoints of the map (tested) at ~20x less
time on this CPU; torchao's branchless binary search is written to be fused by
``torch.compile`` and, run eagerly, is slower still (ties round up in all three).
What is stored are two plain tensors, so ``state_dict()`` still loads with
``torch.load(weights_only=True)`` (torchao's tensor subclass would not).

An optimizer step dequantises every state and quantises it again, so the step's path
(:func:`dequantize` with ``out=``, :func:`quantize_into`) allocates nothing per call: the
float state, the codes and block maxima are written in place, and the index temporaries
live in per-device scratch buffers kept at the largest size seen (:func:`scratch`: 9 bytes
per element of the largest state, 25 MB at a 1B model's ``512 x 5461`` moments, on the torch
path only: the C loops need none; the float
states of :func:`osd.state_layout.float_states` add 4 bytes per element and state slot,
45 MB for OSD-AdamW's four at 1B). This is for the heap, not for speed (an interleaved measurement
gave the same time): no ``numel``-sized temporaries come and go with every state of every
step (docs/memory.md).
"""

from __future__ import annotations

import logging
import math
from functools import cache

import torch
from torch import Tensor

from osd import native

__all__ = ["BLOCK_SIZE", "quantize", "quantize_into", "dequantize", "quantized_nbytes", "scratch"]

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


@cache
def _code_lookup(signed: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """Tables that find the nearest code without a search, keyed by a float32's top 16 bits
    (sign, exponent and 7 mantissa bits), which fix the interval of floats it lies in:
    ``below[k]``, how many midpoints of the code map lie below that interval, and
    ``inside[k]``, the one midpoint inside it (+inf if none). Every interval holds at most
    one midpoint (checked: the codes are 1.4% or more apart, the intervals 0.8% wide)."""
    midpoints = _midpoints(signed, torch.device("cpu"))
    patterns = [(k << 16) - (1 << 32) if k >= 1 << 15 else k << 16 for k in range(1 << 16)]
    first = torch.tensor(patterns, dtype=torch.int32)
    ends = (first.view(torch.float32), (first | 0xFFFF).view(torch.float32))
    low, high = torch.minimum(*ends), torch.maximum(*ends)  # negative floats run backwards
    below = torch.searchsorted(midpoints, low)
    candidate = midpoints[below.clamp(max=len(midpoints) - 1)]
    holds = (below < len(midpoints)) & (candidate <= high)
    if ((torch.searchsorted(midpoints, high, right=True) - below) > 1).any():
        raise AssertionError("an interval of the code lookup holds two midpoints")
    inside = torch.where(holds, candidate, torch.tensor(math.inf))
    return below.to(device=device, dtype=torch.uint8), inside.to(device)


def _nearest_codes(scaled: Tensor, signed: bool, out: Tensor | None = None) -> Tensor:
    """``torch.bucketize(scaled, midpoints, right=True)`` as uint8 (the index of the nearest
    code, ties rounding up), by table lookup (:func:`_code_lookup`): about 5x faster on a CPU.
    ``scaled``: contiguous, 1-D; written into ``out`` if given; temporaries in :func:`scratch`."""
    below, inside = _code_lookup(signed, scaled.device)
    n, device = scaled.numel(), scaled.device
    keys = torch.bitwise_right_shift(scaled.view(torch.int32), 16, out=scratch("keys", n, torch.int32, device)).bitwise_and_(0xFFFF)
    codes = torch.index_select(below, 0, keys, out=out) if out is not None else below.index_select(0, keys)
    midpoint = torch.index_select(inside, 0, keys, out=scratch("values", n, torch.float32, device))
    return codes.add_(torch.ge(scaled, midpoint, out=scratch("above", n, torch.bool, device)))


def _padded_numel(numel: int) -> int:
    return math.ceil(numel / BLOCK_SIZE) * BLOCK_SIZE


def quantized_nbytes(numel: int) -> int:
    """Bytes that :func:`quantize` stores for a tensor of ``numel`` elements."""
    padded = _padded_numel(numel)
    return padded + 4 * (padded // BLOCK_SIZE)


_SCRATCH: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reusable 1-D buffer of ``numel`` elements (contents undefined), grown when needed.
    Only for temporaries that are dead when the function using them returns."""
    key = (name, dtype, device)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def quantize(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``(codes, absmax)``: uint8 codes (``numel`` padded to a multiple of ``BLOCK_SIZE``)
    and the float32 absolute maximum of each block. ``signed=False`` for tensors that are
    never negative (it spends all 256 codes on [0, 1]). ``x`` is left as it is."""
    flat = x.detach().reshape(-1)
    missing = _padded_numel(flat.numel()) - flat.numel()
    work = torch.nn.functional.pad(flat.float(), (0, missing)) if missing else flat.to(torch.float32, copy=True)
    codes = torch.empty(work.numel(), dtype=torch.uint8, device=work.device)
    absmax = torch.empty(work.numel() // BLOCK_SIZE, dtype=torch.float32, device=work.device)
    quantize_into(work, signed, codes, absmax)
    return codes, absmax


def quantize_into(x: Tensor, signed: bool, codes: Tensor, absmax: Tensor) -> None:
    """:func:`quantize` of ``x`` written into ``codes`` and ``absmax`` (its result's sizes),
    using ``x`` itself as scratch space: ``x`` is overwritten. Where ``x`` is not a contiguous
    float32 tensor of whole blocks, :func:`quantize` (which copies it) and a copy of the result."""
    if x.dtype != torch.float32 or not x.is_contiguous() or x.numel() != codes.numel():
        new_codes, new_absmax = quantize(x, signed)
        codes.copy_(new_codes)
        absmax.copy_(new_absmax)
        return
    below, inside = _code_lookup(signed, x.device)
    if native.quantize_blockwise(x.detach(), below, inside, codes, absmax, BLOCK_SIZE):
        return
    blocks = x.detach().view(-1, BLOCK_SIZE)
    # torchao's block scaling (``quant_utils.scale_tensor``), in place.
    magnitudes = torch.abs(blocks, out=scratch("values", x.numel(), torch.float32, x.device).view_as(blocks))
    torch.amax(magnitudes, 1, out=absmax).clip_(1e-12)
    _nearest_codes(blocks.div_(absmax.unsqueeze(1)).view(-1), signed, out=codes)


def dequantize(codes: Tensor, absmax: Tensor, signed: bool, shape: torch.Size, out: Tensor | None = None) -> Tensor:
    """The float32 tensor of ``shape`` that ``codes`` and ``absmax`` stand for; written into
    ``out`` (float32, contiguous, of ``shape``) if given and the codes are whole blocks of it."""
    # torchao's ``quant_utils.dequant_with_qmap``, scaling in place.
    numel = math.prod(shape)
    values = out.view(-1) if out is not None and numel == codes.numel() else torch.empty(codes.numel(), dtype=torch.float32, device=codes.device)
    code_map = _code_map(signed, codes.device)
    if not native.dequantize_blockwise(codes, absmax, code_map, values, BLOCK_SIZE):
        indices = scratch("keys", codes.numel(), torch.int32, codes.device).copy_(codes)
        torch.index_select(code_map, 0, indices, out=values)
        values.view(-1, BLOCK_SIZE).mul_(absmax.unsqueeze(1))
    return values[:numel].view(shape)
