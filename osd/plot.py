"""``osd plot``: training loss and validation perplexity of several runs in one PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

__all__ = ["read_metrics", "smooth", "plot_runs", "readable_axes"]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``; ``FileNotFoundError`` naming the file if absent."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} an osd train output directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): ``s_t = weight s_{t-1} + (1 - weight) x_t``,
    divided by ``1 - weight^t`` so the first points are not pulled toward 0."""
    out, average = [], 0.0
    for t, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**t))
    return out


def readable_axes(ax, x_unit: str = "", log_y: bool = False) -> None:
    """Tick labels a reader can read: ``10k``/``1.5M`` on x (no run-together digits, at most 6
    ticks); on a log y axis spanning less than three decades, plain numbers (``20``, ``50``,
    ``100``) instead of powers of ten only (call after plotting: it reads the data's range)."""
    from matplotlib.ticker import EngFormatter, LogLocator, MaxNLocator, ScalarFormatter

    ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.xaxis.set_major_formatter(EngFormatter(unit=x_unit, sep=""))
    if log_y:
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        if high > 1e3 * low:  # many decades: 10^k labels are the readable ones
            ax.grid(alpha=0.3, which="major")
            return
        # under one decade, evenly spaced round numbers (900, 1200, 1500 ...); else 1, 2, 5 x 10^k
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6) if high < 10 * low else LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=range(1, 10)))
        plain = ScalarFormatter()
        plain.set_scientific(False)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter("")
    ax.grid(alpha=0.3, which="major")


def plot_runs(run_dirs: list[str | Path], output: str | Path, smoothing: float | None = None) -> Path:
    """Draw train loss (left: raw, faint; smoothed with :func:`smooth`) and validation
    perplexity (right, log scale) against tokens for each run, labelled by directory name.
    ``smoothing`` defaults to an average over about 2% of the longest run's steps
    (``1 - 50 / steps``, at most 0.99). Returns the path of the PNG written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {run_dir: read_metrics(run_dir) for run_dir in run_dirs}
    if smoothing is None:
        smoothing = min(0.99, max(0.0, 1 - 50 / max(len(records) for records in runs.values())))
    fig, (loss_ax, ppl_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run_dir, records in runs.items():
        label = Path(run_dir).name
        tokens, losses = [r["tokens"] for r in records], [r["train_loss"] for r in records]
        (line,) = loss_ax.plot(tokens, smooth(losses, smoothing), label=label, linewidth=1.5)
        loss_ax.plot(tokens, losses, color=line.get_color(), alpha=0.25, linewidth=0.8)
        evals = [r for r in records if "val_ppl" in r]
        ppl_ax.plot([r["tokens"] for r in evals], [r["val_ppl"] for r in evals], marker="o", markersize=3, label=label, color=line.get_color())
    loss_ax.set(xlabel="tokens", ylabel="train loss per token", title=f"training loss (faint: per step; bold: smoothed {smoothing:.2f})")
    ppl_ax.set(xlabel="tokens", ylabel="validation perplexity (log scale)", title="validation perplexity")
    readable_axes(loss_ax)
    readable_axes(ppl_ax, log_y=True)
    for ax in (loss_ax, ppl_ax):
        ax.legend()
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
