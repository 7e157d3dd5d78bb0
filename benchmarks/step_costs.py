"""Where the 8-bit and full-rank parts of the optimizer step spend their time (CPU).

The figures behind docs/performance.md, "Not reached, not done":

1. ``ops``: each op of an 8-bit dequantise + quantise of one 65536-element state, best of
   5 x 200 calls, at 1 and 2 threads (the three table lookups against the rest; torch's
   other CPU gathers beside ``index_select``), and the per-call overhead (a 256-element state).
2. ``inplace``: the step's in-place path (``dequantize(out=)``, ``quantize_into``) against
   the allocating one over the 60m model's 224 8-bit states (rank 128: 176 of 128 x 512, 48
   of 128 x 1376), interleaved rounds, median ms.
3. ``compile``: the same maths written as one expression each for the compiler, under
   ``torch.compile`` with dynamic and with static shapes (checked to give the library's
   codes), against the library's eager path, interleaved; skipped where compile cannot build.
4. ``native``: the compiled C kernels (``osd.native``) against the torch ops over the same
   224 states, and over one of 1B's 512 x 5461 moments, interleaved (parts 1-3 and 5 time
   the torch ops: ``OSD_NATIVE_KERNELS=0`` there).
5. ``bnb``: bitsandbytes' CPU block-wise kernels on the same code maps: how many of their
   codes differ from the nearest, whether their dequantised values are the library's, and
   their time against the library's torch ops (skipped without bitsandbytes).
6. ``fullrank``: at 130m's full-rank shapes (2 x 32100 x 768 + 25 norms), torch's fused
   AdamW kernel against the finiteness checks by sum and by norm, interleaved, median ms.

    python benchmarks/step_costs.py                 # all six
    python benchmarks/step_costs.py --parts ops fullrank
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osd import native  # noqa: E402
from osd import quantization as q  # noqa: E402

PARTS = ("ops", "inplace", "compile", "native", "bnb", "fullrank")


def best_us(call: Callable[[], object], calls: int = 200, rounds: int = 5) -> float:
    for _ in range(20):
        call()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def interleaved_ms(calls: dict[str, Callable[[], object]], rounds: int = 8) -> dict[str, float]:
    """Median ms of each call, the calls alternating round by round (load hits them alike)."""
    for call in calls.values():
        call()
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def part_ops() -> None:
    n = 65536
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    blocks = x.view(-1, q.BLOCK_SIZE)
    below, inside = q._code_lookup(True, x.device)
    code_map = q._code_map(True, x.device)
    absmax = blocks.abs().amax(1)
    scaled = (blocks / absmax.unsqueeze(1)).view(-1)
    keys = (scaled.view(torch.int32) >> 16) & 0xFFFF
    codes = below.index_select(0, keys)
    f32, i32, u8, flag = (torch.empty(n, dtype=d) for d in (torch.float32, torch.int32, torch.uint8, torch.bool))
    long_codes = codes.long()
    ops: dict[str, Callable[[], object]] = {
        "abs": lambda: torch.abs(blocks, out=f32.view(-1, q.BLOCK_SIZE)),
        "amax": lambda: torch.amax(blocks, 1),
        "divide": lambda: f32.view(-1, q.BLOCK_SIZE).div_(absmax.unsqueeze(1)),
        "shift": lambda: torch.bitwise_right_shift(scaled.view(torch.int32), 16, out=i32),
        "mask": lambda: i32.bitwise_and_(0xFFFF),
        "LOOKUP code below": lambda: torch.index_select(below, 0, keys, out=u8),
        "LOOKUP midpoint": lambda: torch.index_select(inside, 0, keys, out=f32),
        "compare": lambda: torch.ge(scaled, f32, out=flag),
        "add": lambda: u8.add_(flag),
        "codes to int32": lambda: i32.copy_(codes),
        "LOOKUP code map": lambda: torch.index_select(code_map, 0, codes.int(), out=f32),
        "multiply": lambda: f32.view(-1, q.BLOCK_SIZE).mul_(absmax.unsqueeze(1)),
        # Other CPU gathers for the code-map lookup (int64 indices, which they need):
        "(alt) take": lambda: torch.take(code_map, long_codes),
        "(alt) gather": lambda: torch.gather(code_map, 0, long_codes),
        "(alt) advanced indexing": lambda: code_map[long_codes],
    }
    threads = torch.get_num_threads()
    print(f"\n8-bit ops on one {n}-element state, best us per call:\n")
    print("| op | 1 thread | 2 threads |\n|---|---:|---:|")
    rows = {}
    for count in (1, 2):
        torch.set_num_threads(count)
        for name, call in ops.items():
            rows.setdefault(name, []).append(best_us(call))
    torch.set_num_threads(threads)
    for name, (one, two) in rows.items():
        print(f"| {name} | {one:.0f} | {two:.0f} |")
    small = torch.randn(q.BLOCK_SIZE)
    small_codes, small_absmax = q.quantize(small, True)
    buffer = torch.empty(q.BLOCK_SIZE)

    def round_trip() -> None:
        q.dequantize(small_codes, small_absmax, True, small.shape, out=buffer)
        q.quantize_into(buffer, True, small_codes, small_absmax)

    print(f"\nper-call overhead (dequantise + quantise of a {q.BLOCK_SIZE}-element state): {best_us(round_trip):.0f} us")


@contextlib.contextmanager
def torch_ops() -> Iterator[None]:
    """The 8-bit path through torch's ops, not the compiled kernels, within the block."""
    before = os.environ.get("OSD_NATIVE_KERNELS")
    os.environ["OSD_NATIVE_KERNELS"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["OSD_NATIVE_KERNELS"]
        else:
            os.environ["OSD_NATIVE_KERNELS"] = before


def part_native() -> None:
    if not native.available():
        print("\nnative: skipped (the C kernels could not be built here: no working C compiler)")
        return
    states = sixty_m_states()

    def round_trips() -> None:
        for codes, absmax, signed, shape in states:
            buffer = q.scratch("state0", codes.numel(), torch.float32, codes.device).view(shape)
            q.quantize_into(q.dequantize(codes, absmax, signed, shape, out=buffer), signed, codes, absmax)

    def through_torch() -> None:
        with torch_ops():
            round_trips()

    times = interleaved_ms({"C kernels": round_trips, "torch ops": through_torch})
    print("\n60m's 224 8-bit states, dequantise + quantise, interleaved median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    for signed in (True, False):  # one of 1B's 512 x 5461 moments: the torch ops use both cores there
        x = torch.randn(512, 5461, generator=torch.Generator().manual_seed(1))
        codes, absmax = q.quantize(x if signed else x.abs(), signed)
        buffer = torch.empty(x.shape)

        def one(codes: torch.Tensor = codes, absmax: torch.Tensor = absmax, signed: bool = signed) -> None:
            q.quantize_into(q.dequantize(codes, absmax, signed, x.shape, out=buffer), signed, codes, absmax)

        def one_through_torch() -> None:
            with torch_ops():
                one()

        times = interleaved_ms({"C kernels": one, "torch ops": one_through_torch})
        print(f"one 512 x 5461 {'signed' if signed else 'non-negative'} state, interleaved median ms: " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()))


def part_bnb() -> None:
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    except ImportError:
        print("\nbnb: skipped (bitsandbytes is not installed)")
        return
    print("\nbitsandbytes' CPU block-wise kernels (block 256, the same code maps) against the library, one 65536-element state:")
    for signed in (True, False):
        x = torch.randn(65536, generator=torch.Generator().manual_seed(2)) * 1e-3
        x = x if signed else x.abs() ** 2
        code_map = q._code_map(signed, x.device)
        codes, absmax = q.quantize(x, signed)
        bnb_codes, bnb_absmax = torch.ops.bitsandbytes.quantize_blockwise(x, code_map, q.BLOCK_SIZE)
        same_values = torch.equal(q.dequantize(codes, absmax, signed, x.shape).view(-1), torch.ops.bitsandbytes.dequantize_blockwise(codes, absmax, code_map, q.BLOCK_SIZE, torch.float32))
        buffer = torch.empty_like(x)

        def library() -> None:
            with torch_ops():
                q.quantize_into(q.dequantize(codes, absmax, signed, x.shape, out=buffer), signed, codes, absmax)

        def bnb() -> None:
            out = torch.ops.bitsandbytes.dequantize_blockwise(bnb_codes, bnb_absmax, code_map, q.BLOCK_SIZE, torch.float32)
            torch.ops.bitsandbytes.quantize_blockwise(out, code_map, q.BLOCK_SIZE)

        print(f"- {'signed' if signed else 'non-negative'}: codes differing from the nearest {int((bnb_codes != codes).sum())} of {x.numel()}, "
              f"block maxima equal {torch.equal(bnb_absmax, absmax)}, dequantised values equal {same_values}; "
              f"dequantise + quantise best us: library's torch ops {best_us(library):.0f}, bitsandbytes {best_us(bnb):.0f}")


def sixty_m_states() -> list[tuple[torch.Tensor, torch.Tensor, bool, torch.Size]]:
    generator = torch.Generator().manual_seed(0)
    states = []
    for i, shape in enumerate([(128, 512)] * 176 + [(128, 1376)] * 48):
        signed = i % 2 == 0
        x = torch.randn(shape, generator=generator)
        x = x if signed else x.abs()
        codes, absmax = q.quantize(x, signed)
        states.append((codes, absmax, signed, x.shape))
    return states


def part_inplace() -> None:
    states = sixty_m_states()

    def allocating() -> None:
        for codes, absmax, signed, shape in states:
            q.quantize(q.dequantize(codes, absmax, signed, shape), signed)

    def in_place() -> None:
        for codes, absmax, signed, shape in states:
            buffer = q.scratch("state0", codes.numel(), torch.float32, codes.device).view(shape)
            q.quantize_into(q.dequantize(codes, absmax, signed, shape, out=buffer), signed, codes, absmax)

    times = interleaved_ms({"allocating": allocating, "in place": in_place})
    print("\n60m's 224 8-bit states, dequantise + quantise, interleaved median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))


def part_compile() -> None:
    def quantize_core(flat: torch.Tensor, below: torch.Tensor, inside: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = flat.view(-1, q.BLOCK_SIZE)
        absmax = (blocks.abs() if signed else blocks).amax(1).clamp(min=1e-12)
        scaled = (blocks / absmax.unsqueeze(1)).view(-1)
        keys = (scaled.view(torch.int32) >> 16) & 0xFFFF
        return below[keys] + (scaled >= inside[keys]).to(torch.uint8), absmax

    def dequantize_core(codes: torch.Tensor, absmax: torch.Tensor, code_map: torch.Tensor) -> torch.Tensor:
        return (code_map[codes.long()].view(-1, q.BLOCK_SIZE) * absmax.unsqueeze(1)).view(-1)

    states = sixty_m_states()
    for dynamic in (True, False):
        compile_and_time(quantize_core, dequantize_core, states, dynamic)


def compile_and_time(quantize_core: Callable, dequantize_core: Callable, states: list, dynamic: bool) -> None:
    """``torch.compile(dynamic=...)`` of the two functions: checked against the library's codes
    on two states, then timed against the library's eager path over all of them, interleaved."""
    compiled_q, compiled_d = torch.compile(quantize_core, dynamic=dynamic), torch.compile(dequantize_core, dynamic=dynamic)
    start = time.perf_counter()
    try:
        for codes, absmax, signed, shape in states[:2] + states[-2:]:
            values = compiled_d(codes, absmax, q._code_map(signed, codes.device))
            new_codes, new_absmax = compiled_q(values, *q._code_lookup(signed, codes.device), signed)
            eager_codes, eager_absmax = q.quantize(q.dequantize(codes, absmax, signed, shape), signed)
            assert torch.equal(new_codes, eager_codes) and torch.equal(new_absmax, eager_absmax), "compiled codes differ"
    except Exception as error:  # no C++ toolchain, an inductor limitation: say so and go on
        print(f"\ncompile: skipped ({type(error).__name__}: {error})")
        return
    compile_s = time.perf_counter() - start

    def eager() -> None:
        for codes, absmax, signed, shape in states:
            buffer = q.scratch("state0", codes.numel(), torch.float32, codes.device).view(shape)
            q.quantize_into(q.dequantize(codes, absmax, signed, shape, out=buffer), signed, codes, absmax)

    def compiled() -> None:
        for codes, absmax, signed, _ in states:
            values = compiled_d(codes, absmax, q._code_map(signed, codes.device))
            new_codes, new_absmax = compiled_q(values, *q._code_lookup(signed, codes.device), signed)
            codes.copy_(new_codes)
            absmax.copy_(new_absmax)

    times = interleaved_ms({"eager (in place)": eager, "compiled": compiled})
    print(f"\ntorch.compile(dynamic={dynamic}) of the (de)quantisation: same codes, {compile_s:.1f} s to compile; 60m's states, interleaved median ms: "
          + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))


def part_fullrank() -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(32100, 768)] * 2 + [(768,)] * 25
    params = [torch.randn(s, generator=generator) for s in shapes]
    grads = [torch.randn(s, generator=generator) for s in shapes]
    exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(1.0) for _ in params]

    def fused() -> None:
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=1e-3, beta1=0.9, beta2=0.999,
                            weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)

    times = interleaved_ms({
        "torch fused AdamW": fused,
        "check by sum": lambda: torch.isfinite(torch.stack([g.sum() for g in grads])).all().item(),
        "check by norm": lambda: torch.isfinite(torch.stack(torch._foreach_norm(grads))).all().item(),
    }, rounds=10)
    print("\n130m's full-rank tensors (2 x 32100 x 768 + 25 x 768), interleaved median ms: " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    runs = {"ops": part_ops, "inplace": part_inplace, "compile": part_compile, "native": part_native, "bnb": part_bnb, "fullrank": part_fullrank}
    for part in args.parts:
        with torch_ops() if part in ("ops", "inplace", "compile") else contextlib.nullcontext():
            runs[part]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
