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
- ``eigh`` (``svd_method="eigh"``): the same subspace from ``eigh(G G^T)``,
  :func:`osd.functional.eigh_basis`;
- ``randomized`` (``svd_method="randomized"``): randomized range finding with
  ``--svd-niter`` power iterations, :func:`osd.functional.randomized_basis`; an approximation.
- ``random`` (GoLore): a draw, ``random_basis(m, r, ...)``, the QR of an ``m x r`` Gaussian.

The gradients are realistic rather than white: a rank-``2r`` signal with a ``1/i``
spectrum plus Gaussian noise (fresh noise for every call), seeded. Every rule is timed
``--warmup`` times untimed, then ``--repeats`` times; the median, min and max are reported
in milliseconds, with the ratio SVD / online PCA of the medians. For ``eigh`` and
``randomized`` the largest principal angle (degrees) between their basis and the exact
top-``r`` subspace of the same gradient is reported too. The paper (Liang et al.,
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
from osd.state_layout import PROJ, RANK, SEED, TRANSPOSED

__all__ = ["DEFAULT_SHAPES", "RULES", "GradientStream", "benchmark_shape", "build_parser", "run"]

# (m, n, r): the projected MLP weights of LLaMA 60M, 350M, 1B and 7B with the papers' ranks.
DEFAULT_SHAPES: tuple[tuple[int, int, int], ...] = ((512, 1376, 128), (1024, 2736, 256), (2048, 5461, 512), (4096, 11008, 1024))
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
RULES = ("online_pca", "online_pca_with_R", "svd", "eigh", "randomized", "random")
APPROXIMATE = ("eigh", "randomized")  # bases compared with the SVD's by their principal angles
NOISE_TO_SIGNAL = 0.1  # top singular value of the noise, relative to the signal's


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
    state: dict[str, Any] = {"step": 0, TRANSPOSED: False, RANK: rank, SEED: 0}
    projector.init_state(state, grads(), rank, group)

    def prepare() -> Callable[[], None]:
        G = grads()
        P = state[PROJ]
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


def basis_quality(grads: GradientStream, rank: int, basis: Callable[[Tensor], Tensor]) -> dict[str, float]:
    """How close ``basis(G)`` is to the exact top-``rank`` subspace ``U_r`` of the same
    ``G`` (a fresh gradient from ``grads``): the largest and the median principal angle
    (degrees), and the share of the best rank-``r`` energy it captures,
    ``||P^T G||^2 / ||U_r^T G||^2`` (1 for the exact subspace)."""
    G = grads()
    exact, approx = F.svd_basis(G, rank, "left"), basis(G)
    angles = F.principal_angles(approx, exact).rad2deg()
    energy = (approx.mT.double() @ G.double()).square().sum() / (exact.mT.double() @ G.double()).square().sum()
    return {"max_angle_deg": float(angles.max()), "median_angle_deg": float(angles.median()), "energy": float(energy)}


def time_random(m: int, rank: int, seed: int, dtype: torch.dtype, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """One GoLore draw: a Haar-random ``m x rank`` orthonormal matrix, moved to ``device``."""
    generator = torch.Generator().manual_seed(seed)
    return measure(lambda: lambda: F.random_basis(m, rank, generator, dtype, device), repeats, warmup, device)


def benchmark_shape(m: int, n: int, rank: int, repeats: int, warmup: int, seed: int, device: torch.device, dtype: torch.dtype, niter: int = 2) -> dict[str, Any]:
    """Every rule at one shape, with the ratios of the medians to online PCA's and the
    principal angles of the cheaper bases to the SVD's."""
    grads = GradientStream(m, n, signal_rank=2 * rank, seed=seed, dtype=dtype, device=device)
    generator = torch.Generator().manual_seed(seed)
    bases: dict[str, Callable[[Tensor], Tensor]] = {
        "svd": lambda G: F.svd_basis(G, rank, "left"),
        "eigh": lambda G: F.eigh_basis(G, rank),
        "randomized": lambda G: F.randomized_basis(G, rank, niter, generator),
    }
    rules = {
        "online_pca": summarize(time_online_pca(grads, rank, False, repeats, warmup, device)),
        "online_pca_with_R": summarize(time_online_pca(grads, rank, True, repeats, warmup, device)),
        **{name: summarize(time_basis(grads, basis, repeats, warmup, device)) for name, basis in bases.items()},
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
        "randomized_over_online_pca": rules["randomized"]["median_ms"] / osd,
        "quality": {name: basis_quality(grads, rank, bases[name]) for name in APPROXIMATE},
    }


def quality_cell(quality: dict[str, float]) -> str:
    return f"{quality['max_angle_deg']:.2g} / {quality['median_angle_deg']:.2g}, {quality['energy']:.4f}"


def report(results: list[dict[str, Any]], repeats: int, warmup: int, dtype: str, niter: int) -> str:
    header = ["shape (m x n)", "rank", "online PCA (ms)", "online PCA + R (ms)", "SVD (ms)", "eigh (ms)", "randomized (ms)", "random (ms)",
              "SVD / online PCA", "SVD / (online PCA + R)", "randomized / online PCA",
              "eigh: max / median angle (deg), energy", "randomized: max / median angle (deg), energy"]
    rows = [
        [f"{r['m']} x {r['n']}", r["rank"], *(format_ms(r["rules"][rule]) for rule in RULES),
         f"{r['svd_over_online_pca']:.1f}x", f"{r['svd_over_online_pca_with_R']:.1f}x", f"{r['randomized_over_online_pca']:.1f}x",
         *(quality_cell(r["quality"][name]) for name in APPROXIMATE)]
        for r in results
    ]
    return (
        f"{dtype}; median (min–max) ms per update of `P` over {repeats} calls after {warmup} warm-up; randomized: "
        f"{niter} power iterations; angles: principal angles to the SVD's top-r subspace; energy: "
        f"||P^T G||^2 over the best rank-r energy.\n\n"
        f"{markdown_table(header, rows, numeric_from=2)}\n"
    )


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
    parser.add_argument("--svd-niter", type=int, default=SUBSPACE_DEFAULTS["svd_niter"], help="power iterations of the randomized basis (default: the optimizer's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/projection", help="output folder (default: runs/bench/projection)")
    return parser


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """``osd bench projection``: run with parsed arguments (``argv``, recorded as the command);
    bad input is one line on stderr and exit status 2."""
    if args.repeats < 1 or args.warmup < 0 or args.svd_niter < 0:
        return usage_error("projection", "--repeats must be >= 1, --warmup and --svd-niter >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        return usage_error("projection", "--device cuda, but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    machine = machine_info(device)
    results = [
        benchmark_shape(m, n, rank, args.repeats, args.warmup, args.seed, device, dtype, args.svd_niter)
        for m, n, rank in tqdm(args.shapes, desc="projection", unit="shape", file=sys.stderr)
    ]
    config = {"shapes": args.shapes, "repeats": args.repeats, "warmup": args.warmup, "dtype": args.dtype, "seed": args.seed, "svd_niter": args.svd_niter}
    text = report(results, args.repeats, args.warmup, args.dtype, args.svd_niter)
    json_path, md_path = write_results(args.out, "projection", argv, config, results, text, machine)
    print(md_path.read_text())
    print(f"wrote {json_path}, {md_path}", file=sys.stderr)
    return 0
