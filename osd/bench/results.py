"""What every benchmark shares: the machine's description, timing, Markdown tables, the
JSON + Markdown writer and a curves plot."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["machine_info", "markdown_table", "measure", "plot_curves", "spread", "summarize", "usage_error", "write_results"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """CPU model, core count, torch version and threads, device, and the 1-minute load
    average at the start (other work on the machine skews timings)."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "load_average_1min": os.getloadavg()[0],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(machine: Mapping[str, Any]) -> str:
    """One Markdown line describing ``machine_info()``."""
    gpu = f" ({machine['gpu']})" if "gpu" in machine else ""
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores; torch {machine['torch']}, {machine['threads']} threads; "
        f"device {machine['device']}{gpu}; load average {machine['load_average_1min']:.2f} at start."
    )


def synchronize(device: torch.device | None) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers it (no-op on the CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(prepare: Callable[[], Callable[[], object]], repeats: int, warmup: int, device: torch.device | None = None) -> list[float]:
    """Milliseconds of ``repeats`` calls after ``warmup`` untimed ones.

    ``prepare()`` does the untimed set-up of one call (a fresh gradient ...) and returns the
    call to time.
    """
    times = []
    for i in range(warmup + repeats):
        call = prepare()
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def summarize(times_ms: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of timings in milliseconds, with every timing kept."""
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms), "max_ms": max(times_ms), "times_ms": list(times_ms)}


def spread(values: Sequence[float], name: str) -> dict[str, float]:
    """``{name}_mean``, ``_std`` (sample; 0 for one value), ``_min`` and ``_max`` of ``values`` (over seeds)."""
    return {
        f"{name}_mean": statistics.fmean(values),
        f"{name}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
        f"{name}_min": min(values),
        f"{name}_max": max(values),
    }


def format_ms(summary: Mapping[str, Any]) -> str:
    """``median (min–max)`` of a :func:`summarize` result."""
    return f"{summary['median_ms']:.2f} ({summary['min_ms']:.2f}–{summary['max_ms']:.2f})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    """A Markdown table; columns from ``numeric_from`` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def usage_error(benchmark: str, message: str) -> int:
    """Print ``osd bench <benchmark>: error: <message>`` on stderr; return exit status 2."""
    print(f"osd bench {benchmark}: error: {message}", file=sys.stderr)
    return 2


SHARED_FILES = ("data/c4_train_sample.jsonl", "tokenizers/t5_tokenizer.json")


def missing_shared(shared: Path, alternative: str) -> str | None:
    """Why the real-text benchmarks cannot run on ``shared`` (a message naming ``--shared`` and
    ``alternative``), or None when it holds :data:`SHARED_FILES`."""
    missing = [name for name in SHARED_FILES if not (Path(shared) / name).is_file()]
    if not missing:
        return None
    return (f"{', '.join(missing)} not found in {shared}: pass --shared DIR, a folder holding a JSON-lines text sample "
            f"({SHARED_FILES[0]}, one {{\"text\": ...}} per line) and a tokenizers JSON ({SHARED_FILES[1]}); {alternative}")


def command_line(benchmark: str, argv: Sequence[str]) -> str:
    """The command that reproduces a run: ``osd bench <benchmark> <argv>``."""
    return shlex.join(["osd", "bench", benchmark, *argv])


def write_results(
    out_dir: str | Path,
    benchmark: str,
    argv: Sequence[str],
    config: Mapping[str, Any],
    results: Any,
    markdown: str,
    machine: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``<benchmark>.json`` (machine, command, config, results) and ``<benchmark>.md``
    (the same machine and command above ``markdown``) into ``out_dir``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = dict(machine or machine_info())
    command = command_line(benchmark, argv)
    payload = {"benchmark": benchmark, "command": command, "machine": machine, "config": dict(config), "results": results}
    json_path, md_path = out / f"{benchmark}.json", out / f"{benchmark}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(f"## `osd bench {benchmark}`\n\n```bash\n{command}\n```\n\n{machine_line(machine)}\n\n{markdown}\n")
    return json_path, md_path


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[Sequence[float]]]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str,
    log_y: bool = True,
    hlines: Mapping[str, float] | None = None,
    legend_loc: str = "best",
) -> Path:
    """One line per label: ``curves[label] = (x, [y of run 1, y of run 2, ...])``; the mean
    over runs is drawn, with the min–max band when there are several runs; ``hlines[label]``
    is a dashed horizontal reference line. ``legend_loc="outside"`` puts the legend right of
    the axes (for many curves). PNG to ``path`` (its folder is created if missing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from osd.plot import readable_axes

    outside = legend_loc == "outside"
    fig, ax = plt.subplots(figsize=(10.5, 5.5) if outside else (8, 5))
    if len(curves) > 10:  # the default cycle has 10 colours: no two curves share one
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    # Curves that coincide (two methods that both stall) stay visible: each its own dash
    # pattern and markers, spaced so that markers of different curves do not sit on each other.
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 2)), "x")]
    for i, (label, (x, ys)) in enumerate(curves.items()):
        length = min(len(y) for y in ys)
        runs = torch.tensor([list(y[:length]) for y in ys], dtype=torch.float64)
        dash, marker = styles[i % len(styles)]
        every = 1 if length <= 20 else (i * max(1, length // 40), max(1, length // 8))
        (line,) = ax.plot(x[:length], runs.mean(0).tolist(), label=label, linewidth=1.6, linestyle=dash,
                          marker=marker, markevery=every, markersize=5, markerfacecolor="none")
        if len(ys) > 1:
            ax.fill_between(x[:length], runs.min(0).values.tolist(), runs.max(0).values.tolist(), color=line.get_color(), alpha=0.15)
    for label, y in (hlines or {}).items():
        ax.axhline(y, color="black", linestyle="--", linewidth=1, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel + (" (log scale)" if log_y else ""), title=title)
    readable_axes(ax, log_y=log_y)
    if outside:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        ax.legend(loc=legend_loc, fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
