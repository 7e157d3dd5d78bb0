"""Time GaLore's SVD refresh steps under DDP, with the refreshes spread over ranks and without.

Runs ``osd train`` twice under ``torchrun --nproc-per-node N`` (gloo on the CPU, or NCCL
with ``--device cuda``), ``galore_adamw``, once with ``--spread-svd`` (each due SVD computed
by one rank and broadcast) and once with ``--no-spread-svd`` (every rank computes every SVD),
otherwise identical. From each run's ``metrics.jsonl`` it takes the wall time of every step
(tokens read / tokens per second, measured on rank 0, which waits for the slowest rank) and
reports the median time of the refresh steps (``P`` recomputed: steps ``T+1, 2T+1, ...``
counted from 1; the first step's SVD initialises ``P`` on every rank and is not spread) and
of the other steps. The final losses of the two runs are printed too: they must agree.

    python benchmarks/spread_svd.py                       # LLaMA-60M shapes, 2 CPU processes
    python benchmarks/spread_svd.py --json results.json   # also machine-readable
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def step_times(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, seconds, train loss) of every step of a run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    previous, times = 0, []
    for record in records:
        times.append((record["step"], (record["tokens"] - previous) / record["tokens_per_s"], record["train_loss"]))
        previous = record["tokens"]
    return times


def run(out_dir: Path, spread: bool, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
        "-m", "osd.train", "--model", args.model, "--optimizer", "galore_adamw", "--rank", str(args.rank),
        "--update-proj-gap", str(args.gap), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--total-batch-size", str(args.batch_size * args.nproc), "--seq-len", str(args.seq_len),
        "--eval-interval", str(args.steps), "--eval-batches", "1", "--device", args.device, "--no-progress",
        "--spread-svd" if spread else "--no-spread-svd", "--out-dir", str(out_dir), "--overwrite",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(command, env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="60m")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=4, help="update_proj_gap T")
    parser.add_argument("--steps", type=int, default=13)
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per rank")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(Path(tmp) / name, spread, args) for name, spread in (("spread", True), ("every_rank", False))]
    spread, every = results
    print(f"{args.model}, {args.nproc} processes, rank {args.rank}, T {args.gap}, load average {os.getloadavg()[0]:.2f}")
    print("| SVD refreshes | refresh step (s, median) | other step (s, median) | final train loss |")
    print("|---|---:|---:|---:|")
    for result in results:
        label = "spread over ranks" if result["spread_svd"] else "on every rank"
        print(f"| {label} | {result['refresh_step_s']:.3f} | {result['other_step_s']:.3f} | {result['final_train_loss']:.6f} |")
    print(f"refresh-step speed-up: {every['refresh_step_s'] / spread['refresh_step_s']:.2f}x")
    if args.json:
        machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()}
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
