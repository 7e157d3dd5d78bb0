"""``osd bench spread``: GaLore's SVD refresh steps under DDP, spread over the ranks and not.

Runs ``osd train`` twice under ``torchrun --nproc-per-node N`` (gloo on the CPU, or NCCL
with ``--device cuda``), ``galore_adamw``, once with ``--spread-svd`` (each due SVD computed
by one rank and broadcast, :mod:`osd.spread`) and once with ``--no-spread-svd`` (every rank
computes every SVD), otherwise identical. From each run's ``metrics.jsonl`` it takes the
wall time of every step (tokens read / tokens per second, measured on rank 0, which waits
for the slowest rank) and reports the median time of the refresh steps (``P`` recomputed:
steps ``T+1, 2T+1, ...`` counted from 1; the first step's SVD initialises ``P`` on every
rank and is not spread) and of the other steps. The final train losses of the two runs are
reported too: they must agree (spreading changes where an SVD is computed, not its result).

    osd bench spread                          # LLaMA-60M shapes, 2 CPU processes
    osd bench spread --nproc 4 --device cuda  # 4 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from osd.bench.results import markdown_table, usage_error, write_results

__all__ = ["build_parser", "run"]

ROOT = Path(__file__).resolve().parents[2]  # the checkout holding the osd package


def step_times(run_dir: Path) -> list[tuple[int, float, float]]:
    """``(step, seconds, train loss)`` of every step of a run, from its ``metrics.jsonl``."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    previous, times = 0, []
    for record in records:
        times.append((record["step"], (record["tokens"] - previous) / record["tokens_per_s"], record["train_loss"]))
        previous = record["tokens"]
    return times


def timed_run(out_dir: Path, spread: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One ``torchrun ... osd.train`` run with or without ``--spread-svd``, and its step times."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
        "-m", "osd.train", "--model", args.model, "--optimizer", "galore_adamw", "--rank", str(args.rank),
        "--update-proj-gap", str(args.gap), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--total-batch-size", str(args.batch_size * args.nproc), "--seq-len", str(args.seq_len),
        "--eval-interval", str(args.steps), "--eval-batches", "1", "--device", args.device, "--no-progress",
        "--spread-svd" if spread else "--no-spread-svd", "--out-dir", str(out_dir), "--overwrite",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(command, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    times = step_times(out_dir)
    refresh = [t for step, t, _ in times if step > 1 and (step - 1) % args.gap == 0]
    other = [t for step, t, _ in times if step > 1 and (step - 1) % args.gap != 0]
    return {
        "spread_svd": spread,
        "refresh_step_s": statistics.median(refresh),
        "other_step_s": statistics.median(other),
        "refresh_steps": len(refresh),
        "final_train_loss": times[-1][2],
        "step_seconds": [t for _, t, _ in times],
    }


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The Markdown table of both runs and the refresh steps' speed-up."""
    rows = [
        ["spread over ranks" if r["spread_svd"] else "on every rank", f"{r['refresh_step_s']:.3f}", f"{r['other_step_s']:.3f}", f"{r['final_train_loss']:.6f}"]
        for r in results
    ]
    spread, every = results
    return (
        f"{args.model}, {args.nproc} processes, rank {args.rank}, T {args.gap}, {args.steps} steps\n\n"
        + markdown_table(["SVD refreshes", "refresh step (s, median)", "other step (s, median)", "final train loss"], rows)
        + f"\n\nrefresh-step speed-up: {every['refresh_step_s'] / spread['refresh_step_s']:.2f}x"
    )


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="osd bench spread")
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--model", default="60m", help="model preset (default 60m)")
    parser.add_argument("--rank", type=int, default=128, help="GaLore's rank (default 128)")
    parser.add_argument("--gap", type=int, default=4, help="update_proj_gap T (default 4)")
    parser.add_argument("--steps", type=int, default=13, help="optimizer steps per run (default 13)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per rank (default 2)")
    parser.add_argument("--seq-len", type=int, default=64, help="default 64")
    parser.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default cpu")
    parser.add_argument("--out", default="runs/bench/spread", help="output folder (default: runs/bench/spread)")
    return parser


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """``osd bench spread``: run with parsed arguments (``argv``, recorded as the command)."""
    if args.nproc < 2:
        return usage_error("spread", f"--nproc must be at least 2 (one process has nothing to spread), got {args.nproc}")
    if args.gap < 2 or args.steps < args.gap + 2:
        return usage_error("spread", f"need --gap >= 2 and --steps >= --gap + 2 (a refresh step and a regular one to compare), got {args.gap}, {args.steps}")
    with tempfile.TemporaryDirectory() as tmp:
        results = [timed_run(Path(tmp) / name, spread, args) for name, spread in (("spread", True), ("every_rank", False))]
    json_path, md_path = write_results(args.out, "spread", argv, dict(vars(args)), results, report(results, args))
    print(md_path.read_text())
    print(f"wrote {json_path}, {md_path}", file=sys.stderr)
    return 0
