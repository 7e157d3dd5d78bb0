"""``osd bench projection``: time of one update of the projection matrix ``P`` per rule.

For every shape ``m x n`` (canonical orientation, ``m <= n``) and rank ``r`` this measures
the cost of producing the next ``P`` (``m x r``) from a gradient ``G`` (``m x n``):

- ``online_pca`` (OSD): one step of ``P`` as the optimizer takes it,
  ``OnlinePCAProjector.advance``: the closed-form gradient of the online-PCA loss and one
  Adam step on ``P``. The optimizer already has ``R = P^T G`` and ``||G||_F`` from the
  weight update, so this column times the update given them; ``online_pca_with_R`` also
  times computing ``R`` and ``||G||_F``, the stand-alone cost.
- ``svd`` (GaLore): a refresh, ``svd_basis(G, r, "left")``, a full float32
  ``torch.linalg.svd`` as ``galore_torch`` takes it.
- ``randomized_svd`` (for reference): ``torch.svd_lowrank(G, q=r + oversample, niter=2)``,
  the first ``r`` left vectors; what a cheaper GaLore refresh could use.
- ``random`` (GoLore): a draw, ``random_basis(m, r, ...)``, the QR of an ``m x r`` Gaussian.

The gradients are realistic rather than white: a rank-``2r`` signal with a ``1/i``
spectrum plus Gaussian noise (fresh noise for every call), seeded. Every rule is timed
``--warmup`` times untimed, then ``--repeats`` times; the median, min and max are reported
in milliseconds, with the ratio SVD / online PCA of the medians. The paper (Liang et al.,
2024) reports online PCA 16x (512x1376) to 142x (4096x11008) faster than SVD on an A100.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from osd import functional as F
from osd.bench.results import (
    format_ms,
    machine_info,
    markdown_table,
    measure,
    summarize,
    usage_error,
    write_results,
)
from osd.optimizer import SUBSPACE_DEFAULTS
from osd.projectors import OnlinePCAProjector

__all__ = ["DEFAULT_SHAPES", "RULES", "GradientStream", "benchmark_shape", "build_parser", "run"]

# (m, n, r): the projected MLP weights of LLaMA 60M, 350M, 1B and 7B with the papers' ranks.
DEFAULT_SHAPES: tuple[tuple[int, int, int], ...] = ((512, 1376, 128), (1024, 2736, 256), (2048, 5461, 512), (4096, 11008, 1024))
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
RULES = ("online_pca", "online_pca_with_R", "svd", "randomized_svd", "random")
NOISE_TO_SIGNAL = 0.1  # top singular value of the noise, relative to the signal's
OVERSAMPLE = 10  # extra columns of the randomized SVD's sketch


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
    fresh Gaussian noise whose top singular value is ``NOISE_TO_SIGNAL`` of the signal's."""

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


def time_online_pca(grads: GradientStream, rank: int, with_R: bool, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """One OSD step of ``P`` with the optimizer's defaults (Adam on ``P``, alpha 5, lambda
    0.1). ``P`` starts from the SVD basis of a first gradient and keeps moving, with Adam's
    state, over the calls."""
    projector = OnlinePCAProjector()
    group = {**SUBSPACE_DEFAULTS, **projector.defaults, "lr": 1e-3}
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


def time_basis(grads: GradientStream, basis: Callable[[Tensor], Tensor], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """``basis(G)`` of a fresh gradient per call (an SVD refresh, a randomized one)."""

    def prepare() -> Callable[[], Tensor]:
        G = grads()
        return lambda: basis(G)

    return measure(prepare, repeats, warmup, device)


def randomized_basis(G: Tensor, rank: int) -> Tensor:
    """Top-``rank`` left singular vectors of ``G`` by a randomized SVD (Halko et al.), in float32."""
    U, _, _ = torch.svd_lowrank(G.float(), q=min(rank + OVERSAMPLE, min(G.shape)), niter=2)
    return U[:, :rank].to(G.dtype)


def time_random(m: int, rank: int, seed: int, dtype: torch.dtype, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """One GoLore draw: a Haar-random ``m x rank`` orthonormal matrix, moved to ``device``."""
    generator = torch.Generator().manual_seed(seed)
    return measure(lambda: lambda: F.random_basis(m, rank, generator, dtype, device), repeats, warmup, device)


def benchmark_shape(m: int, n: int, rank: int, repeats: int, warmup: int, seed: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Every rule at one shape, with the ratios of the medians to online PCA's."""
    grads = GradientStream(m, n, signal_rank=2 * rank, seed=seed, dtype=dtype, device=device)
    rules = {
        "online_pca": summarize(time_online_pca(grads, rank, False, repeats, warmup, device)),
        "online_pca_with_R": summarize(time_online_pca(grads, rank, True, repeats, warmup, device)),
        "svd": summarize(time_basis(grads, lambda G: F.svd_basis(G, rank, "left"), repeats, warmup, device)),
        "randomized_svd": summarize(time_basis(grads, lambda G: randomized_basis(G, rank), repeats, warmup, device)),
        "random": summarize(time_random(m, rank, seed, dtype, repeats, warmup, device)),
    }
    osd = rules["online_pca"]["median_ms"]
    return {
        "m": m,
        "n": n,
        "rank": rank,
        "rules": rules,
        "svd_over_online_pca": rules["svd"]["median_ms"] / osd,
        "svd_over_online_pca_with_R": rules["svd"]["median_ms"] / rules["online_pca_with_R"]["median_ms"],
        "randomized_svd_over_online_pca": rules["randomized_svd"]["median_ms"] / osd,
    }


def report(results: list[dict[str, Any]], repeats: int, warmup: int, dtype: str) -> str:
    header = ["shape (m x n)", "rank", "online PCA (ms)", "online PCA + R (ms)", "SVD (ms)", "randomized SVD (ms)", "random (ms)",
              "SVD / online PCA", "SVD / (online PCA + R)", "randomized SVD / online PCA"]
    rows = [
        [f"{r['m']} x {r['n']}", r["rank"], *(format_ms(r["rules"][rule]) for rule in RULES),
         f"{r['svd_over_online_pca']:.1f}x", f"{r['svd_over_online_pca_with_R']:.1f}x", f"{r['randomized_svd_over_online_pca']:.1f}x"]
        for r in results
    ]
    return f"{dtype}; median (min–max) ms per update of `P` over {repeats} calls after {warmup} warm-up.\n\n{markdown_table(header, rows, numeric_from=2)}\n"


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="osd bench projection")
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=list(DEFAULT_SHAPES), metavar="MxN:R",
                        help="shapes and ranks (default: 512x1376:128 1024x2736:256 2048x5461:512 4096x11008:1024)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per rule and shape (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of G and P (SVDs are taken in float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/projection", help="output folder (default: runs/bench/projection)")
    return parser


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """``osd bench projection``: run with parsed arguments (``argv``, recorded as the command);
    bad input is one line on stderr and exit status 2."""
    if args.repeats < 1 or args.warmup < 0:
        return usage_error("projection", "--repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        return usage_error("projection", "--device cuda, but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    machine = machine_info(device)
    results = [
        benchmark_shape(m, n, rank, args.repeats, args.warmup, args.seed, device, dtype)
        for m, n, rank in tqdm(args.shapes, desc="projection", unit="shape", file=sys.stderr)
    ]
    config = {"shapes": args.shapes, "repeats": args.repeats, "warmup": args.warmup, "dtype": args.dtype, "seed": args.seed}
    json_path, md_path = write_results(args.out, "projection", argv, config, results, report(results, args.repeats, args.warmup, args.dtype), machine)
    print(md_path.read_text())
    print(f"wrote {json_path}, {md_path}", file=sys.stderr)
    return 0
