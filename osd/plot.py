"""``osd plot``: training loss and validation perplexity of several runs in one PNG."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_metrics", "plot_runs"]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``; ``FileNotFoundError`` naming the file if absent."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} an osd train output directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs: list[str | Path], output: str | Path) -> Path:
    """Draw train loss (left) and validation perplexity (right) against tokens for each run.

    Each run is labelled by its directory name. Returns the path of the PNG written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, ppl_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        label = Path(run_dir).name
        loss_ax.plot([r["tokens"] for r in records], [r["train_loss"] for r in records], label=label, linewidth=1)
        evals = [r for r in records if "val_ppl" in r]
        ppl_ax.plot([r["tokens"] for r in evals], [r["val_ppl"] for r in evals], marker="o", label=label)
    loss_ax.set(xlabel="tokens", ylabel="train loss (per token)", title="training loss")
    ppl_ax.set(xlabel="tokens", ylabel="validation perplexity", title="validation perplexity", yscale="log")
    for ax in (loss_ax, ppl_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
