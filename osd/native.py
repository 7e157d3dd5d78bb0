"""The 8-bit (de)quantisation of :mod:`osd.quantization` as compiled C loops, for CPU tensors.

Run as torch ops, a dequantise + quantise of one state is eleven passes over it, three of
them table lookups (``index_select``, a serial loop); the same maths as one C loop per
direction (``csrc/blockwise8.c``) gives the same codes, maxima and values bit for bit
(``tests/test_native.py``) in 1.75-2.5x less time on this project's CPU
(``benchmarks/step_costs.py --parts native``; docs/performance.md).

Why not a library: bitsandbytes' CPU kernels are the nearest, but its quantiser picks other
codes than the nearest (about 3% of them for a second moment) and runs slower than the torch
path; ``torch.compile`` of the same maths was no faster than eager here; and a
``torch.utils.cpp_extension`` build needs the torch headers and a minute per build, for two
loops that use nothing of torch.

The source is compiled at first use by the machine's C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) into a cache folder (``$OSD_CACHE_DIR``, else ``~/.cache/osd``), under
a name that hashes the source, the compiler and its flags, and is loaded with
:mod:`ctypes` (which lets go of the GIL during the call). Where no compiler works, or with
``OSD_NATIVE_KERNELS=0``, the torch ops run instead, with the same results.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "dequantize_blockwise", "quantize_blockwise"]

SOURCE = Path(__file__).with_name("csrc") / "blockwise8.c"
FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")
_log = logging.getLogger(__name__)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    configured = os.environ.get("OSD_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "osd"


@cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use (atomically: a half-written file is never
    loaded, and processes building at once each rename a whole one into place); None, with a
    debug log line saying why, where that fails."""
    compiler = _compiler()
    if compiler is None:
        _log.debug("no C compiler ($CC, cc, gcc, clang): 8-bit states use torch ops")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(), platform.machine().encode()])).hexdigest()[:16]
    path = _cache_dir() / f"blockwise8-{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as work:
                built = Path(work) / path.name
                subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], check=True, capture_output=True, timeout=120)
                os.replace(built, path)
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        _log.debug("could not build %s with %s (%s %s): 8-bit states use torch ops", SOURCE.name, compiler, error, detail.decode(errors="replace"))
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.osd_dequantize_blockwise.argtypes = [pointer] * 4 + [size] * 2
    library.osd_quantize_blockwise.argtypes = [pointer] * 5 + [size] * 2
    library.osd_dequantize_blockwise.restype = library.osd_quantize_blockwise.restype = None
    return library


def available() -> bool:
    """Whether the kernels run (compiled here, and not switched off by ``OSD_NATIVE_KERNELS=0``)."""
    return os.environ.get("OSD_NATIVE_KERNELS", "1") != "0" and _library() is not None


def _fits(*tensors: tuple[Tensor, torch.dtype, int]) -> bool:
    """Plain (not subclassed: no DTensor), contiguous CPU tensors of these dtypes and sizes."""
    return all(type(t) is Tensor and t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() and t.numel() == numel for t, dtype, numel in tensors)


def dequantize_blockwise(codes: Tensor, absmax: Tensor, code_map: Tensor, out: Tensor, block: int) -> bool:
    """``out = code_map[codes] * absmax`` per block of ``block`` elements, if the kernels are
    available and the tensors are contiguous CPU tensors of the expected dtypes and sizes
    (uint8 codes, float32 rest, ``out`` the size of ``codes``); False, untouched, otherwise."""
    blocks = absmax.numel()
    if not (available() and _fits((codes, torch.uint8, blocks * block), (absmax, torch.float32, blocks), (code_map, torch.float32, 256), (out, torch.float32, blocks * block))):
        return False
    _library().osd_dequantize_blockwise(codes.data_ptr(), absmax.data_ptr(), code_map.data_ptr(), out.data_ptr(), blocks, block)
    return True


def quantize_blockwise(x: Tensor, below: Tensor, inside: Tensor, codes: Tensor, absmax: Tensor, block: int) -> bool:
    """Block maxima of ``|x|`` into ``absmax`` and nearest codes into ``codes`` (the tables of
    :func:`osd.quantization._code_lookup`), if the kernels are available and the tensors fit
    (``x`` float32 of ``codes``' size); False, untouched, otherwise. ``x`` is only read."""
    blocks = absmax.numel()
    table = 1 << 16
    if not (available() and _fits((x, torch.float32, blocks * block), (below, torch.uint8, table), (inside, torch.float32, table), (codes, torch.uint8, blocks * block), (absmax, torch.float32, blocks))):
        return False
    _library().osd_quantize_blockwise(x.data_ptr(), below.data_ptr(), inside.data_ptr(), codes.data_ptr(), absmax.data_ptr(), blocks, block)
    return True
