"""``osd bench counterexample``: the GoLore paper's small-batch counterexample, run with
this package's optimizers.

The problem (He et al., ICML 2025, in our notation): a weight ``X`` (``m x n``, ``m < n``,
so every projector acts on its rows) and the quadratic

    f(X) = 1/2 ||A X||_F^2 + <B, X>,   A = diag(a_1, ..., a_{m-r}, 0, ..., 0),   B = [B_top; 0]

whose last ``r`` rows do not enter ``f``. Its minimum is ``X_top* = -B_top / a^2`` (any
bottom rows), ``f* = -1/2 ||B_top / a||^2``. The stochastic gradient is

    g = A^2 X + B + sigma [0; xi],   xi ~ N(0, 1)^{r x n} fresh every step

so the noise has zero mean, lives only in the last ``r`` rows, orthogonal to the true
gradient (top rows), and with a large ``sigma`` it dominates ``g``: the top-``r`` left
singular vectors of ``g`` are the noise rows. GaLore's ``P`` then spans exactly the rows
``f`` ignores and the weights never move where it matters: it stalls at ``f(X_0)``.
Full-rank training sees the true gradient in the top rows and converges; GoLore's random
``P`` overlaps the top rows by ``r / m`` on average and converges, more slowly. OSD's ``P``
starts from the same SVD as GaLore and then tracks the top subspace of the gradients'
second moment, which the noise dominates too; this benchmark measures what it does.

Each projector runs with each inner rule (``sgd`` momentum, ``adamw``) from ``X_0 = 0``,
cosine learning rate to 0, over several noise seeds. Reported: the loss gap
``(f - f*) / (f(X_0) - f*)`` half-way and at the end, the distance
``||X_top - X_top*|| / ||X_top*||`` at the end, and a verdict on the worst seed:
``converged`` (final gap < 1e-2), ``descending`` (final gap below 1 and below half the
half-way gap) or ``stalled``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import torch
from tqdm import tqdm

from osd.bench.results import markdown_table, plot_curves, usage_error, write_results
from osd.config import parse_key_values
from osd.optimizer import SubspaceOptimizer
from osd.presets import METHODS
from osd.projectors import get_projector
from osd.schedule import warmup_cosine

__all__ = ["PROJECTORS", "NoisyQuadratic", "build_parser", "run", "run_projector"]

PROJECTORS = {"full_rank": "identity", **METHODS}  # label -> projector: every projector with a named method
DEFAULT_LR = {"sgd": 0.05, "adamw": 0.01}
# OSD's lr_P = alpha * lr: 0.01 for both rules (alpha 5 at SGD's lr would move P by Adam steps of 0.25).
DEFAULT_ALPHA = {"sgd": 0.2, "adamw": 1.0}
CONVERGED = 1e-2  # a final relative loss gap below this: "converged"
DESCENDING = 0.5  # else a final gap below this fraction of the half-way one: "descending", else "stalled"


class NoisyQuadratic:
    """``f(X) = 1/2 ||A X||^2 + <B, X>`` with noise ``sigma`` in the last ``r`` rows of its gradient."""

    def __init__(self, m: int, n: int, noise_rank: int, sigma: float, seed: int) -> None:
        if not 0 < noise_rank < m < n:
            raise ValueError(f"need 0 < noise_rank < m < n, got noise_rank={noise_rank}, m={m}, n={n}")
        generator = torch.Generator().manual_seed(seed)
        top = m - noise_rank
        self.a = torch.linspace(0.5, 1.0, top, dtype=torch.float64).unsqueeze(1)  # (m - r) x 1
        self.B_top = torch.randn(top, n, generator=generator, dtype=torch.float64)
        self.X_top_star = -self.B_top / self.a**2
        self.f_star = float(-0.5 * (self.B_top / self.a).square().sum())
        self.top, self.noise_rank, self.sigma, self.n = top, noise_rank, sigma, n

    def value(self, X: torch.Tensor) -> float:
        """``f(X)`` (only the top rows enter)."""
        X_top = X[: self.top].double()
        return float(0.5 * (self.a * X_top).square().sum() + (self.B_top * X_top).sum())

    def gradient(self, X: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A stochastic gradient: the true one in the top rows, ``sigma`` N(0, 1) noise in the rest."""
        grad = torch.empty_like(X)
        grad[: self.top] = (self.a**2 * X[: self.top].double() + self.B_top).to(X.dtype)
        grad[self.top :] = self.sigma * torch.randn(self.noise_rank, self.n, generator=generator, dtype=X.dtype)
        return grad

    def distance(self, X: torch.Tensor) -> float:
        """``||X_top - X_top*|| / ||X_top*||``."""
        return float((X[: self.top].double() - self.X_top_star).norm() / self.X_top_star.norm())


def run_projector(
    problem: NoisyQuadratic, projector: str, rule: str, lr: float, rank: int, steps: int, gap: int, alpha: float, seed: int, log_every: int, **options: Any
) -> dict[str, Any]:
    """Train ``X`` from 0 with ``SubspaceOptimizer(rule=rule, projector=projector, **options)``;
    return the relative loss gap every ``log_every`` steps and the final gap and distance."""
    m = problem.top + problem.noise_rank
    X = torch.nn.Parameter(torch.zeros(m, problem.n))
    group: dict[str, Any] = {"params": [X], **options}
    if projector != "identity":
        group.update(rank=rank, update_proj_gap=gap, seed=seed, scale=1.0)  # the GoLore analysis: no scale
    if "alpha" in get_projector(projector).defaults:
        group["alpha"] = alpha
    optimizer = SubspaceOptimizer([group], lr, rule=rule, projector=projector)
    scheduler = warmup_cosine(optimizer, 0, steps, 0.0)
    generator = torch.Generator().manual_seed(seed)
    initial_gap = problem.value(X.detach()) - problem.f_star
    gaps, logged_steps = [1.0], [0]
    for step in range(1, steps + 1):
        X.grad = problem.gradient(X.detach(), generator)
        optimizer.step()
        scheduler.step()
        if step % log_every == 0 or step == steps:
            gaps.append((problem.value(X.detach()) - problem.f_star) / initial_gap)
            logged_steps.append(step)
    return {"steps": logged_steps, "loss_gap": gaps, "final_loss_gap": gaps[-1], "final_distance": problem.distance(X.detach())}


def run_counterexample(args: argparse.Namespace) -> dict[str, Any]:
    """Every (rule, projector) over every seed; per pair the runs and the summary."""
    results: dict[str, Any] = {}
    pairs = [(rule, name) for rule in args.rules for name in args.projectors]
    for rule, name in tqdm(pairs, desc="counterexample", unit="run", file=sys.stderr):
        runs = []
        for seed in args.seeds:
            problem = NoisyQuadratic(args.m, args.n, args.rank, args.sigma, seed)
            options = args.options if PROJECTORS[name] != "identity" else {}
            runs.append(run_projector(problem, PROJECTORS[name], rule, args.lr[rule], args.rank, args.steps, args.gap, args.alpha[rule], seed, args.log_every, **options))
        gaps = [r["final_loss_gap"] for r in runs]
        halfway = [r["loss_gap"][len(r["loss_gap"]) // 2] for r in runs]
        results[f"{rule}/{name}"] = {
            "rule": rule,
            "projector": name,
            "lr": args.lr[rule],
            "final_loss_gap_mean": statistics.fmean(gaps),
            "final_loss_gap_max": max(gaps),
            "halfway_loss_gap_mean": statistics.fmean(halfway),
            "final_distance_mean": statistics.fmean(r["final_distance"] for r in runs),
            "verdict": verdict(gaps, halfway),
            "runs": runs,
        }
    return results


def verdict(final_gaps: list[float], halfway_gaps: list[float]) -> str:
    """``converged``, ``descending`` or ``stalled``, judged on the worst seed."""
    if max(final_gaps) < CONVERGED:
        return "converged"
    if all(final < min(1.0, DESCENDING * half) for final, half in zip(final_gaps, halfway_gaps)):
        return "descending"
    return "stalled"


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    rows = [
        [f"`{r['rule']}`", r["projector"], f"{r['lr']:g}", f"{r['halfway_loss_gap_mean']:.2e}", f"{r['final_loss_gap_mean']:.2e}",
         f"{r['final_loss_gap_max']:.2e}", f"{r['final_distance_mean']:.3f}", r["verdict"]]
        for r in results.values()
    ]
    header = ["rule", "projection", "lr", "gap half-way (mean)", "final gap (mean)", "final gap (worst seed)", "distance to optimum (mean)", "verdict"]
    return (
        f"X: {args.m} x {args.n}, noise in the last r = {args.rank} rows with sigma = {args.sigma}, rank r = {args.rank}, "
        f"{args.steps} steps, cosine lr to 0, refresh every {args.gap} steps, OSD alpha {args.alpha}, seeds {args.seeds}"
        f"{f', options {args.options}' if args.options else ''}. "
        "Loss gap = (f - f*) / (f(X0) - f*) (1 = no progress); distance = ||X_top - X_top*|| / ||X_top*||; "
        f"verdict on the worst seed: converged (final gap < {CONVERGED:g}), descending (final < 1 and < {DESCENDING:g} x half-way), else stalled.\n\n"
        f"{markdown_table(header, rows, numeric_from=2)}\n"
    )


def _per_rule(text: str) -> tuple[str, float]:
    rule, _, value = text.partition("=")
    try:
        return rule, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RULE=VALUE (e.g. sgd=0.05), got {text!r}") from None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="osd bench counterexample")
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--m", type=int, default=32, help="rows of X (default 32)")
    parser.add_argument("--n", type=int, default=64, help="columns of X, > m (default 64)")
    parser.add_argument("--rank", type=int, default=8, help="rank of the projections and of the noise (default 8)")
    parser.add_argument("--sigma", type=float, default=10.0, help="noise scale (default 10)")
    parser.add_argument("--steps", type=int, default=5000, help="optimizer steps (default 5000)")
    parser.add_argument("--gap", type=int, default=50, help="GaLore/GoLore update_proj_gap (default 50)")
    parser.add_argument("--rules", nargs="+", default=list(DEFAULT_LR), choices=list(DEFAULT_LR), help="inner rules (default: sgd adamw)")
    parser.add_argument("--projectors", nargs="+", default=list(PROJECTORS), choices=list(PROJECTORS), help="default: all four")
    parser.add_argument("--lr", nargs="+", type=_per_rule, default=[], metavar="RULE=LR", help=f"learning rates (default: {DEFAULT_LR})")
    parser.add_argument("--alpha", nargs="+", type=_per_rule, default=[], metavar="RULE=ALPHA", help=f"OSD's lr_P / lr per rule (default: {DEFAULT_ALPHA})")
    parser.add_argument(
        "--options", type=str, default="", metavar="KEY=VALUE,...",
        help="more optimizer keys for every projected run, e.g. moment_transport=nonnegative or sketch_beta=0.999,sketch_size=32",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of B and of the noise (default 0 1 2)")
    parser.add_argument("--log-every", type=int, default=10, help="record the loss every N steps (default 10)")
    parser.add_argument("--out", default="runs/bench/counterexample", help="output folder (default: runs/bench/counterexample)")
    return parser


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """``osd bench counterexample``: run with parsed arguments (``argv``, recorded as the command);
    bad input is one line on stderr and exit status 2."""
    unknown = {rule for rule, _ in args.lr + args.alpha} - set(DEFAULT_LR)
    if unknown:
        return usage_error("counterexample", f"--lr/--alpha name unknown rules {sorted(unknown)}; known: {list(DEFAULT_LR)}")
    args.lr = {**DEFAULT_LR, **dict(args.lr)}
    args.alpha = {**DEFAULT_ALPHA, **dict(args.alpha)}
    try:
        args.options = parse_key_values(args.options)
        for name in args.projectors:
            if PROJECTORS[name] != "identity":
                SubspaceOptimizer([torch.zeros(2, 2)], projector=PROJECTORS[name], **args.options)
    except (ValueError, TypeError) as error:
        return usage_error("counterexample", f"--options: {error}")
    if not 0 < args.rank < args.m < args.n:
        return usage_error("counterexample", f"need 0 < --rank < --m < --n, got {args.rank}, {args.m}, {args.n}")
    if min(args.steps, args.gap, args.log_every) < 1:
        return usage_error("counterexample", "--steps, --gap and --log-every must be >= 1")
    results = run_counterexample(args)
    for rule in args.rules:
        curves = {r["projector"]: (r["runs"][0]["steps"], [run["loss_gap"] for run in r["runs"]]) for r in results.values() if r["rule"] == rule}
        plot_curves(curves, f"{args.out}/counterexample_{rule}.png", "step", "loss gap (f - f*) / (f(X0) - f*)", f"GoLore counterexample, {rule} inner rule, sigma {args.sigma}")
    config = dict(vars(args))
    json_path, md_path = write_results(args.out, "counterexample", argv, config, results, report(results, args))
    print(md_path.read_text())
    print(f"wrote {json_path}, {md_path}", file=sys.stderr)
    return 0
