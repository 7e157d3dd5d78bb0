"""Time one update of the projection matrix ``P`` under each projection rule.

For every shape ``m x n`` (canonical orientation, ``m <= n``) and rank ``r`` this measures
the cost of producing the next ``P`` (``m x r``) from a gradient ``G`` (``m x n``):

- ``online_pca`` (Online Subspace Descent): one step of ``P`` as the optimizer takes it,
  ``OnlinePCAProjector.advance``: the closed-form gradient of the online-PCA loss and one
  Adam step on ``P``. The optimizer already has ``R = P^T G`` and ``||G||_F`` from the
  weight update, so the main column times the update given them; the ``+ R`` column also
  times computing ``R`` and ``||G||_F``, for a reader who wants the stand-alone cost.
- ``svd`` (GaLore): a refresh, ``svd_basis(G, r, "left")``, a full ``torch.linalg.svd``
  in float32 as ``galore_torch`` takes it.
- ``random`` (GoLore): a draw, ``random_basis(m, r, ...)``, the QR of an ``m x r`` Gaussian.

The gradients are realistic rather than white: a rank-``2r`` signal with a ``1/i``
spectrum plus Gaussian noise (fresh noise for every repeat), seeded. Every rule is timed
``--warmup`` times untimed, then ``--repeats`` times; the median, min and max are reported
in milliseconds, with the ratio SVD / online PCA.

The paper (Liang et al., 2024, "Memory-Efficient LLM Training with Online Subspace
Descent") reports online PCA 16x (512x1376) to 142x (4096x11008) faster than torch's SVD
on an A100; this script measures the same ratio on whatever machine it runs on.

Run from the repository root::

    python benchmarks/projection.py                               # LLaMA 60M/350M/1B shapes
    python benchmarks/projection.py --shapes 4096x11008:1024 --repeats 3
    python benchmarks/projection.py --device cuda --json results.json

A Markdown table goes to stdout, and with ``--json PATH`` the same results (every single
time included) with the machine's description go to ``PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from osd import functional as F  # noqa: E402
from osd.optimizer import SUBSPACE_DEFAULTS  # noqa: E402
from osd.projectors import OnlinePCAProjector  # noqa: E402

# (m, n, r): the projected MLP weights of LLaMA 60M, 350M and 1B with GaLore's ranks.
DEFAULT_SHAPES: tuple[tuple[int, int, int], ...] = ((512, 1376, 128), (1024, 2736, 256), (2048, 5461, 512))
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
RULES = ("online_pca", "online_pca_with_R", "svd", "random")
NOISE_TO_SIGNAL = 0.1  # top singular value of the noise, relative to the signal's


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"MxN:R"`` -> ``(min(M, N), max(M, N), R)``, the canonical orientation."""
    try:
        dims, rank = text.lower().split(":")
        a, b = (int(d) for d in dims.split("x"))
        r = int(rank)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 2048x5461:512, got {text!r}") from None
    m, n = min(a, b), max(a, b)
    if not 0 < r < m:
        raise argparse.ArgumentTypeError(f"rank must be in (0, {m}) for {text!r}")
    return m, n, r


class GradientStream:
    """Seeded ``m x n`` gradients: a fixed rank-``k`` signal with a ``1/i`` spectrum plus
    fresh Gaussian noise on every call, scaled so the noise's top singular value is
    ``NOISE_TO_SIGNAL`` times the signal's."""

    def __init__(self, m: int, n: int, signal_rank: int, seed: int, dtype: torch.dtype, device: torch.device) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        k = min(signal_rank, m)
        U, _ = torch.linalg.qr(torch.randn(m, k, generator=self.generator))
        V, _ = torch.linalg.qr(torch.randn(n, k, generator=self.generator))
        spectrum = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
        self.signal = (U * spectrum) @ V.mT
        self.noise_std = NOISE_TO_SIGNAL / (m**0.5 + n**0.5)
        self.dtype, self.device = dtype, device

    def __call__(self) -> Tensor:
        noise = torch.randn(self.signal.shape, generator=self.generator).mul_(self.noise_std)
        return (self.signal + noise).to(device=self.device, dtype=self.dtype)


def projector_group(lr: float = 1e-3) -> dict[str, Any]:
    """A param group with the optimizer's defaults for online PCA (Adam on ``P``, alpha 5,
    ortho_reg 0.1, the paper's lr rule)."""
    return {**SUBSPACE_DEFAULTS, "lr": lr}


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(prepare: Callable[[], Callable[[], object]], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of ``repeats`` calls after ``warmup`` untimed ones. ``prepare()`` does the
    untimed set-up of one call (a fresh gradient ...) and returns the call to time."""
    times = []
    for i in range(warmup + repeats):
        call = prepare()
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        elapsed = (time.perf_counter() - start) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return times


def time_online_pca(grads: GradientStream, rank: int, with_R: bool, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """One OSD step of ``P``. ``P`` starts from the SVD basis of a first gradient (as the
    optimizer's ``init_state``) and keeps moving, with Adam's state, over the repeats."""
    projector, group = OnlinePCAProjector(), projector_group()
    projector.validate(group)
    state: dict[str, Any] = {"step": 0, "transposed": False, "rank": rank, "seed": 0}
    projector.init_state(state, grads(), rank, group)

    def prepare() -> Callable[[], None]:
        G = grads()
        P = state["proj"]
        R, grad_norm = (None, None) if with_R else (P.mT @ G, G.norm())

        def step() -> None:
            r, norm = (P.mT @ G, G.norm()) if with_R else (R, grad_norm)
            projector.advance(state, G, r, norm, group)
            state["step"] += 1

        return step

    return measure(prepare, repeats, warmup, device)


def time_svd(grads: GradientStream, rank: int, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """One GaLore refresh: the top-``rank`` left singular vectors of a fresh gradient."""

    def prepare() -> Callable[[], Tensor]:
        G = grads()
        return lambda: F.svd_basis(G, rank, "left")

    return measure(prepare, repeats, warmup, device)


def time_random(m: int, rank: int, seed: int, dtype: torch.dtype, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """One GoLore draw: a Haar-random ``m x rank`` orthonormal matrix, moved to ``device``."""
    generator = torch.Generator().manual_seed(seed)

    def prepare() -> Callable[[], Tensor]:
        return lambda: F.random_basis(m, rank, generator, dtype, device)

    return measure(prepare, repeats, warmup, device)


def summarize(times: list[float]) -> dict[str, Any]:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "times_ms": times}


def benchmark_shape(m: int, n: int, rank: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """All rules at one shape; the ratios are of medians."""
    grads = GradientStream(m, n, signal_rank=2 * rank, seed=args.seed, dtype=dtype, device=device)
    repeats, warmup = args.repeats, args.warmup
    rules = {
        "online_pca": summarize(time_online_pca(grads, rank, False, repeats, warmup, device)),
        "online_pca_with_R": summarize(time_online_pca(grads, rank, True, repeats, warmup, device)),
        "svd": summarize(time_svd(grads, rank, repeats, warmup, device)),
        "random": summarize(time_random(m, rank, args.seed, dtype, repeats, warmup, device)),
    }
    svd = rules["svd"]["median_ms"]
    return {
        "m": m,
        "n": n,
        "rank": rank,
        "rules": rules,
        "svd_over_online_pca": svd / rules["online_pca"]["median_ms"],
        "svd_over_online_pca_with_R": svd / rules["online_pca_with_R"]["median_ms"],
    }


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine skews timings
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_times(summary: dict[str, Any]) -> str:
    return f"{summary['median_ms']:.2f} ({summary['min_ms']:.2f}–{summary['max_ms']:.2f})"


def markdown_table(results: list[dict[str, Any]]) -> str:
    header = (
        "| shape (m x n) | rank | online PCA (ms) | online PCA + R (ms) | SVD (ms) | random (ms) "
        "| SVD / online PCA | SVD / (online PCA + R) |"
    )
    lines = [header, "|" + "|".join(["---"] * 2 + ["---:"] * 6) + "|"]
    for res in results:
        cells = [f"{res['m']} x {res['n']}", str(res["rank"])]
        cells += [format_times(res["rules"][rule]) for rule in RULES]
        cells += [f"{res['svd_over_online_pca']:.1f}x", f"{res['svd_over_online_pca_with_R']:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=list(DEFAULT_SHAPES), metavar="MxN:R", help="shapes and ranks (default: 512x1376:128 1024x2736:256 2048x5461:512)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per rule and shape (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of G and P (SVD is always taken in float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    machine = machine_info(device)

    results = []
    for m, n, rank in args.shapes:
        print(f"timing {m} x {n}, rank {rank} ...", file=sys.stderr, flush=True)
        results.append(benchmark_shape(m, n, rank, args, device, dtype))

    gpu = f" ({machine['gpu']})" if "gpu" in machine else ""
    print(f"Machine: {machine['cpu']}; torch {machine['torch']}; {machine['threads']} threads; device {machine['device']}{gpu}; "
          f"load average {machine['load_average_1min']:.2f} at start")
    print(f"dtype {args.dtype}; {args.repeats} repeats after {args.warmup} warm-up; median (min–max) ms per update of P\n")
    print(markdown_table(results))

    if args.json is not None:
        config = {"repeats": args.repeats, "warmup": args.warmup, "dtype": args.dtype, "seed": args.seed}
        args.json.write_text(json.dumps({"machine": machine, "config": config, "results": results}, indent=2) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
