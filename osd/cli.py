"""The ``osd`` command: ``osd train``, ``eval RUN``, ``memory``, ``bench NAME``, ``plot RUN_DIR ...``, ``export RUN_DIR OUT_DIR``, ``generate MODEL``."""

from __future__ import annotations

import argparse
import importlib
import sys

from osd import export, generate, memory_report, perplexity
from osd import train as train_module
from osd.bench import BENCHMARKS
from osd.config import build_parser

__all__ = ["main"]


def _plain(text: str) -> str:
    """A docstring line for ``--help``: without reST literal markers."""
    return text.replace("``", "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="osd", description="Gradient-subspace optimizers for LLM training.")
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser(commands.add_parser("train", help="pretrain LLaMA (python -m osd.train)"))
    perplexity.build_parser(commands.add_parser("eval", help="perplexity and bits per byte of a trained model on a text"))
    memory_report.build_parser(commands.add_parser("memory", help="memory breakdown per optimizer, estimated and --measure'd"))
    plot = commands.add_parser("plot", help="draw loss / perplexity curves of runs into one PNG")
    plot.add_argument("run_dirs", nargs="+", help="osd train output directories")
    plot.add_argument("--output", "-o", default="curves.png", help="PNG to write (default: curves.png)")
    plot.add_argument("--smoothing", type=float, default=None, help="EMA weight of the training loss, 0 to 0.99 (default: 1 - 50 / steps)")
    export.build_parser(commands.add_parser("export", help="write a run's model and tokenizer in Hugging Face format (from_pretrained)"))
    generate.build_parser(commands.add_parser("generate", help="sample a continuation of a prompt from a run or an exported model"))
    bench = commands.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS) + " (JSON + Markdown)")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True)
    modules = {name: importlib.import_module(f"osd.bench.{name}") for name in BENCHMARKS}
    for name, module in modules.items():
        sub = module.build_parser(benchmarks.add_parser(name, help=_plain(module.__doc__.split("\n\n")[0].split(": ", 1)[-1])))
        sub.description = _plain(sub.description or "")
    args = parser.parse_args(argv)
    if args.command == "train":
        return train_module.run(args)
    if args.command == "eval":
        return perplexity.run(args)
    if args.command == "memory":
        return memory_report.run(args)
    if args.command == "export":
        return export.run(args)
    if args.command == "generate":
        return generate.run(args)
    if args.command == "bench":
        return modules[args.benchmark].run(args, argv[2:])
    from osd.plot import plot_runs

    try:
        print(f"wrote {plot_runs(args.run_dirs, args.output, args.smoothing)}")
    except FileNotFoundError as error:
        print(f"osd plot: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
