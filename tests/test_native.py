"""The compiled CPU kernels of the 8-bit path (``osd.native``) against the torch ops they
replace: the same codes, block maxima and values bit for bit, the same optimizer steps, and
the torch ops as the fallback where no compiler works."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

import osd
from osd import native, quantization

pytest.importorskip("torchao", reason="8-bit states use torchao's code maps")
needs_kernels = pytest.mark.skipif(not native.available(), reason="the C kernels could not be built here (no working C compiler); the torch path runs instead")


@contextlib.contextmanager
def torch_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with monkeypatch.context() as patch:
        patch.setenv("OSD_NATIVE_KERNELS", "0")
        assert not native.available()
        yield


def awkward_values(numel: int, signed: bool, seed: int) -> torch.Tensor:
    """Twelve decades of magnitude, a block of zeros, -0.0, subnormals, the largest floats,
    infinities, NaNs (several in one block), code-map values and midpoints exactly."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=generator) * torch.logspace(-10, 2, numel)[torch.randperm(numel, generator=generator)]
    x = x if signed else x.abs()
    code_map = quantization._code_map(signed, torch.device("cpu"))
    x[:256] = 0.0
    x[256:512] = code_map[torch.arange(256)]  # a block scaled by 1.0: every code exactly
    x[512:767] = quantization._midpoints(signed, torch.device("cpu"))  # ties
    x[767] = 1.0
    x[800], x[801], x[802] = -0.0, 1e-40, 3.4e38
    x[1100], x[1101], x[1102] = float("inf"), float("nan"), -float("nan")
    x[1300], x[1301] = -float("inf"), float("nan")
    return x


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@needs_kernels
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("numel", [256 * 8, 256 * 257, 128 * 1376])
def test_kernels_give_the_torch_paths_bits(signed: bool, numel: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x = awkward_values(numel, signed, seed=numel)
    codes, absmax = quantization.quantize(x, signed)
    values = quantization.dequantize(codes, absmax, signed, x.shape)
    with torch_path(monkeypatch):
        torch_codes, torch_absmax = quantization.quantize(x, signed)
        torch_values = quantization.dequantize(codes, absmax, signed, x.shape)
    assert torch.equal(codes, torch_codes)
    assert same(absmax, torch_absmax)
    assert same(values, torch_values)
    assert codes[256:512].tolist() == list(range(256))  # every code of the map is its own nearest


@needs_kernels
def test_kernels_leave_their_input_and_take_only_what_fits() -> None:
    x = torch.randn(256 * 4)
    kept = x.clone()
    codes, absmax = torch.empty(x.numel(), dtype=torch.uint8), torch.empty(4)
    below, inside = quantization._code_lookup(True, x.device)
    assert native.quantize_blockwise(x, below, inside, codes, absmax, quantization.BLOCK_SIZE)
    assert torch.equal(x, kept)
    # Not contiguous, another dtype, a size that is not the codes': refused, nothing written.
    written = codes.clone()
    assert not native.quantize_blockwise(x.view(4, 256).t(), below, inside, codes, absmax, quantization.BLOCK_SIZE)
    assert not native.quantize_blockwise(x.double(), below, inside, codes, absmax, quantization.BLOCK_SIZE)
    assert not native.dequantize_blockwise(codes, absmax, quantization._code_map(True, x.device), torch.empty(256 * 3), quantization.BLOCK_SIZE)
    assert torch.equal(codes, written)


@needs_kernels
def test_eight_bit_osd_steps_the_same_with_and_without_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five steps of 8-bit OSD-AdamW (W's and P's moments in 8 bits): weights and every state
    tensor bit for bit the same through the kernels and through the torch ops."""

    def run() -> tuple[list[torch.Tensor], list[dict]]:
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(64, 96), (96, 40), (50,)]]
        opt = osd.OSDAdamW([{"params": params[:2], "rank": 8}, {"params": params[2:]}], lr=1e-2, optim_bits=8, min_8bit_size=0)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            opt.step()
        return [p.detach().clone() for p in params], [dict(state) for state in opt.state.values()]

    params, states = run()
    with torch_path(monkeypatch):
        torch_params, torch_states = run()
    assert all(torch.equal(a, b) for a, b in zip(params, torch_params))
    for state, torch_state in zip(states, torch_states):
        assert state.keys() == torch_state.keys()
        assert all(torch.equal(state[k], torch_state[k]) for k in state if isinstance(state[k], torch.Tensor))


def test_without_a_compiler_the_torch_path_runs(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No compiler on the path (and no cached build): no kernels, and 8-bit states still
    quantise, through torch's ops, to the same codes."""
    x = awkward_values(256 * 6, True, seed=3)
    expected = quantization.quantize(x, True)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("OSD_CACHE_DIR", str(tmp_path / "cache"))
    native._library.cache_clear()
    try:
        assert not native.available()
        codes, absmax = quantization.quantize(x, True)
        assert torch.equal(codes, expected[0]) and same(absmax, expected[1])
    finally:
        native._library.cache_clear()


@needs_kernels
def test_the_build_is_cached_and_reused(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("OSD_CACHE_DIR", str(tmp_path))
    native._library.cache_clear()
    try:
        assert native.available()
        (built,) = tmp_path.glob("blockwise8-*.so")
        stamp = built.stat().st_mtime_ns
        native._library.cache_clear()
        assert native.available()
        assert built.stat().st_mtime_ns == stamp and list(tmp_path.iterdir()) == [built]  # no leftovers
    finally:
        native._library.cache_clear()
