"""``osd memory``: what training a LLaMA preset costs in memory, part by part, per optimizer.

For one preset, rank and batch it prints (and writes as JSON / Markdown / PNG) the
estimate of :func:`osd.memory.estimate_memory` for AdamW, 8-bit AdamW, GaLore and OSD, with
and without layer-wise updates and 8-bit states. ``--measure`` also trains each of them
for a few steps, each in a fresh process, and reports its measured peak beside the
estimate: on a GPU the max allocated; on the CPU the peak resident set MINUS the process's
baseline (its resident set once torch, transformers and the data are loaded, before the model
exists: about 0.5 GB, the same for every row), so that what is compared is what training adds.

    osd memory --model 60m --rank 128 --batch-size 1 --seq-len 256
    osd memory --model 1b --rank 512 --dtype bfloat16          # the GaLore paper's Table 2 setting
    osd memory --model nano --rank 16 --measure --plot memory.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from osd.config import ConfigError, TrainConfig
from osd.memory import PARTS, activation_bytes, estimate_memory
from osd.models import PRESETS, build_model, llama_config
from osd.presets import create_optimizer
from osd.train import train

__all__ = ["VARIANTS", "estimate", "measure", "main"]

# (optimizer, layer-wise, optimizer bits): the rows of the report.
VARIANTS: list[tuple[str, bool, int]] = [
    ("adamw", False, 32),
    ("adamw", False, 8),
    ("galore_adamw", False, 32),
    ("galore_adamw", False, 8),
    ("galore_adamw", True, 32),
    ("galore_adamw", True, 8),
    ("osd_adamw", False, 32),
    ("osd_adamw", False, 8),
    ("osd_adamw", True, 32),
    ("osd_adamw", True, 8),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GB = 1e9


def label(config: TrainConfig) -> str:
    """``galore_adamw + layer-wise + 8-bit`` and the like."""
    return " + ".join([config.optimizer] + ["layer-wise"] * config.layerwise + ["8-bit"] * (config.optim_bits == 8))


def estimate(config: TrainConfig, vocab_size: int, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Bytes by part of training ``config`` (one micro-batch of ``batch_size x seq_len``),
    counted on a meta-device copy of the model and its optimizer."""
    with torch.device("meta"):
        model = build_model(llama_config(config.model, vocab_size, config.seq_len, config.model_config)).to(dtype)
        optimizer = create_optimizer(model, config.optimizer, **config.optimizer_kwargs())
    activations = activation_bytes(model.config, config.batch_size, config.seq_len, config.activation_checkpointing, dtype)
    return estimate_memory(model, optimizer, layerwise=config.layerwise, activations=activations)


def _baseline_bytes(config: TrainConfig) -> int:
    """This process's resident set with torch, the model's code, the tokenizer and the data
    loaded, before any model exists (0 on a GPU, where only tensors are counted)."""
    if config.device == "cuda":
        return 0
    from transformers import LlamaForCausalLM  # noqa: F401 (imported for its memory)

    from osd.data import load_documents, load_tokenizer

    load_tokenizer(config.tokenizer_spec)
    load_documents(config.data, "train", val_docs=config.val_docs)
    load_documents(config.val_data or config.data, "validation", val_docs=config.val_docs)
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


def _train_and_report(config: TrainConfig, limit_bytes: int | None, results: Any) -> None:
    if limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    try:
        baseline = _baseline_bytes(config)
        peak = train(config)["peak_memory_bytes"]
        results.put({"peak": peak - baseline, "process_peak": peak, "baseline": baseline})
    except (MemoryError, RuntimeError) as error:
        results.put({"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"})


def measure(config: TrainConfig, limit_bytes: int | None = None) -> dict[str, Any]:
    """Train ``config`` in a fresh process; ``{"peak": bytes}`` or ``{"error": why}``.

    ``limit_bytes`` caps the child's address space (``RLIMIT_AS``), so a configuration that
    does not fit fails with an allocation error instead of waking the OOM killer.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_train_and_report, args=(config, limit_bytes, results))
    child.start()
    child.join()
    if not results.empty():
        return results.get()
    return {"error": f"the training process died (exit code {child.exitcode}; -9 is the OOM killer)"}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The report as a Markdown table, in GB (10^9 bytes)."""
    measured = any("measured" in row for row in rows)
    header = ["configuration", *PARTS, "total", "weights + states"] + ["measured peak - baseline"] * measured
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        parts = row["estimate"]
        states = parts["weights"] + parts["moments"] + parts["projection"] + parts["proj_optimizer"]
        cells = [row["label"], *(f"{parts[p] / GB:.3f}" for p in PARTS), f"**{parts['total'] / GB:.3f}**", f"{states / GB:.3f}"]
        if measured:
            result = row.get("measured", {})
            cells.append(f"{result['peak'] / GB:.3f}" if "peak" in result else result.get("error", "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """A stacked bar per configuration, one colour per part, measured peaks as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows)), 5))
    bottoms = [0.0] * len(rows)
    for part in PARTS:
        heights = [row["estimate"][part] / GB for row in rows]
        ax.bar(range(len(rows)), heights, bottom=bottoms, label=part)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for i, total in enumerate(bottoms):
        ax.text(i, total, f"{total:.2f}", ha="center", va="bottom", fontsize=8)
    peaks = [(i, row["measured"]["peak"] / GB) for i, row in enumerate(rows) if "peak" in row.get("measured", {})]
    if peaks:
        ax.scatter(*zip(*peaks, strict=True), marker="_", s=600, color="black", label="measured peak - process baseline", zorder=3)
    ax.set_xticks(range(len(rows)), [row["label"].replace(" + ", "\n+ ") for row in rows], fontsize=8)
    ax.set_ylabel("GB (10^9 bytes)")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=8)  # top to bottom, as the bars are stacked
    ax.margins(y=0.08)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="osd memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="60m", help=f"model preset: {', '.join(PRESETS)} (default: 60m)")
    parser.add_argument("--rank", type=int, default=128, help="rank of GaLore / OSD (default: 128)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch (default: 1)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--vocab-size", type=int, default=32000, help="vocabulary (default: 32000, the papers' t5-base); with --measure, the tokenizer's")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights and states (default: float32; the GaLore paper's table is bfloat16)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="count (and train) with activation checkpointing")
    parser.add_argument("--optimizers", default=None, help="comma list of rows, e.g. 'adamw,osd_adamw+layerwise+8bit' (default: all ten)")
    parser.add_argument("--measure", action="store_true", help="also train each row a few steps in a fresh process and report its peak memory")
    parser.add_argument("--steps", type=int, default=3, help="training steps of a measurement (default: 3)")
    parser.add_argument("--memory-limit-gb", type=float, default=None, help="address-space cap of each measurement, in GB (a row that does not fit then fails cleanly)")
    parser.add_argument("--data", default="embedded", help="training text of a measurement (as osd train --data)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer of a measurement (as osd train --tokenizer)")
    parser.add_argument("--out", default=None, help="directory for memory.json and memory.md")
    parser.add_argument("--plot", default=None, help="write the breakdown as a stacked bar PNG here")
    return parser


def _variants(spec: str | None) -> list[tuple[str, bool, int]]:
    if spec is None:
        return VARIANTS
    variants = []
    for item in spec.split(","):
        name, *flags = item.strip().split("+")
        unknown = set(flags) - {"layerwise", "8bit"}
        if unknown:
            raise ConfigError(f"--optimizers: unknown option(s) {sorted(unknown)} in {item!r}; use +layerwise and +8bit")
        variants.append((name, "layerwise" in flags, 8 if "8bit" in flags else 32))
    return variants


def run(args: argparse.Namespace) -> int:
    """``osd memory`` from parsed arguments; bad input is one line on stderr, status 2."""
    try:
        if args.measure and args.dtype != "float32":
            raise ConfigError("--measure trains in float32; drop --dtype or --measure")
        vocab_size = args.vocab_size
        if args.measure:
            from osd.data import load_tokenizer

            vocab_size = load_tokenizer(args.tokenizer or ("bytes" if args.data == "embedded" else "t5-base")).vocab_size
        configs = [
            TrainConfig(
                model=args.model, optimizer=name, rank=args.rank, layerwise=layerwise, optim_bits=bits,
                activation_checkpointing=args.activation_checkpointing, batch_size=args.batch_size, seq_len=args.seq_len,
                steps=args.steps, warmup_steps=1, eval_batches=1, eval_interval=10**9, data=args.data,
                tokenizer=args.tokenizer, out_dir="", progress=False, quiet=True, device="cpu",
            )
            for name, layerwise, bits in _variants(args.optimizers)
        ]
    except (ConfigError, ValueError) as error:
        print(f"osd memory: error: {error}", file=sys.stderr)
        return 2
    rows = []
    for config in configs:
        row = {"label": label(config), "config": dataclasses.asdict(config), "estimate": estimate(config, vocab_size, DTYPES[args.dtype])}
        if args.measure:
            out_dir = Path(args.out or "runs/memory") / label(config).replace(" + ", "_")
            limit = int(args.memory_limit_gb * GB) if args.memory_limit_gb else None
            row["measured"] = measure(dataclasses.replace(config, out_dir=str(out_dir), overwrite=True), limit)
        rows.append(row)
        print(f"{row['label']}: estimate {row['estimate']['total'] / GB:.3f} GB" + (f", measured {row['measured']}" if args.measure else ""), file=sys.stderr)
    title = f"LLaMA-{args.model}, rank {args.rank}, batch {args.batch_size} x {args.seq_len}, {args.dtype}" + (", activation checkpointing" if args.activation_checkpointing else "")
    table = f"{title}\n\n{markdown_table(rows)}"
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "memory.json").write_text(json.dumps({"title": title, "rows": rows}, indent=2))
        (out / "memory.md").write_text(table)
    if args.plot:
        plot(rows, Path(args.plot), title)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
