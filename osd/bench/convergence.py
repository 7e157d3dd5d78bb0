"""``osd bench convergence``: the same small LLaMA, the same packed C4 tokens, the same seeds
and token budget, trained by ``osd.train.train`` with each optimizer; validation perplexity
(mean and spread over seeds), curves, and the optimizer-state bytes of each.

An optimizer is given as ``NAME[:KEY=VALUE,...]``: an ``osd train`` optimizer name and any
:class:`osd.config.TrainConfig` fields that differ from the shared settings, e.g.
``osd_adamw:alpha=1`` or ``galore_lion:lr=0.001``. The same syntax makes a sweep::

    osd bench convergence                                          # the default six, two seeds
    osd bench convergence --configs osd_adamw:alpha=1 osd_adamw:alpha=20 --seeds 0 --out runs/bench/sweep

Every run is an ordinary ``osd train`` output directory under ``OUT/runs/<config>/seed<k>``.
This is a CPU-scale check (a model of a few million parameters, a few hundred thousand
tokens), not the papers' setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from osd.bench.results import markdown_table, plot_curves, spread, usage_error, write_results
from osd.config import ConfigError, TrainConfig
from osd.data import DataError
from osd.plot import read_metrics
from osd.train import train

__all__ = ["DEFAULT_CONFIGS", "build_parser", "parse_spec", "run", "run_convergence"]

# Adam-inner runs share --lr (GaLore's recipe: 1e-2 with scale 0.25); Lion takes a 10x
# smaller step, as the Lion paper advises against AdamW's.
DEFAULT_CONFIGS = ("adamw", "galore_adamw", "golore_adamw", "osd_adamw", "galore_lion:lr=0.001", "osd_lion:lr=0.001")
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
RUN_FIELDS = {"optimizer", "seed", "out_dir", "progress", "resume", "stop_at_step"}  # set per run, not by a spec


def _value(text: str) -> Any:
    """``"1e-3"`` -> 0.001, ``"5"`` -> 5, ``"true"`` -> True, anything else stays a string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"osd_adamw:alpha=1,lr=0.003"`` -> ``("osd_adamw", {"alpha": 1, "lr": 0.003})``.

    Raises :class:`ConfigError` naming a malformed item or a key that is not a settable
    ``TrainConfig`` field.
    """
    name, _, rest = spec.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not value:
            raise ConfigError(f"config {spec!r}: {item!r} is not KEY=VALUE")
        if key not in FIELDS or key in RUN_FIELDS:
            raise ConfigError(f"config {spec!r}: {key!r} is not a setting a config may override; choose from {sorted(FIELDS - RUN_FIELDS)}")
        overrides[key] = _value(value.strip())
    return name, overrides


def _run_dir(spec: str) -> str:
    return spec.replace(":", "__").replace(",", "_").replace("=", "-")


def run_convergence(base: dict[str, Any], specs: Sequence[str], seeds: Sequence[int], out: Path) -> dict[str, Any]:
    """Train every spec with every seed; per run the final metrics, per spec their summary.

    ``base`` holds the ``TrainConfig`` fields shared by all runs.
    """
    configs = []
    for spec in specs:
        name, overrides = parse_spec(spec)
        for seed in seeds:
            settings = {**base, **overrides, "optimizer": name, "seed": seed, "progress": False}
            settings["out_dir"] = str(out / "runs" / _run_dir(spec) / f"seed{seed}")
            configs.append((spec, seed, TrainConfig(**settings)))  # checked before any run starts

    runs: dict[str, list[dict[str, Any]]] = {spec: [] for spec in specs}
    bar = tqdm(configs, desc="convergence", unit="run", file=sys.stderr)
    for spec, seed, config in bar:
        bar.set_postfix_str(f"{spec} seed {seed}")
        started = time.perf_counter()
        final = train(config)
        records = read_metrics(config.out_dir)
        runs[spec].append({
            "seed": seed,
            "lr": config.lr,
            "val_loss": final["val_loss"],
            "val_ppl": final["val_ppl"],
            "tokens": final["tokens"],
            "optimizer_state_bytes": final["optimizer_state_bytes"],
            "wall_s": time.perf_counter() - started,
            "curve": {"tokens": [r["tokens"] for r in records if "val_ppl" in r], "val_ppl": [r["val_ppl"] for r in records if "val_ppl" in r]},
            "run_dir": config.out_dir,
        })
    summary = {}
    for spec, results in runs.items():
        summary[spec] = {
            **spread([r["val_ppl"] for r in results], "val_ppl"),
            "optimizer_state_bytes": results[0]["optimizer_state_bytes"],
            "runs": results,
        }
    ordering = sorted(summary, key=lambda spec: summary[spec]["val_ppl_mean"])
    return {"configs": summary, "ordering": ordering}


def report(results: dict[str, Any], seeds: Sequence[int]) -> str:
    """The Markdown table (sorted by mean perplexity) and the ordering line."""
    rows = []
    for rank, spec in enumerate(results["ordering"], 1):
        s = results["configs"][spec]
        per_seed = ", ".join(f"{r['val_ppl']:.2f}" for r in s["runs"])
        rows.append([
            f"{rank}. `{spec}`",
            f"{s['runs'][0]['lr']:g}",
            f"{s['val_ppl_mean']:.2f} ± {s['val_ppl_std']:.2f}",
            f"{s['val_ppl_min']:.2f}–{s['val_ppl_max']:.2f}",
            per_seed,
            f"{s['optimizer_state_bytes'] / 2**20:.2f}",
            f"{statistics.fmean(r['wall_s'] for r in s['runs']):.0f}",
        ])
    header = ["config", "lr", "val ppl mean ± std", "min–max", "per seed", "optimizer state (MiB)", "wall s / run"]
    ordering = " < ".join(f"`{spec}`" for spec in results["ordering"])
    return (
        f"Final validation perplexity over seeds {list(seeds)} (lower is better).\n\n"
        f"{markdown_table(header, rows)}\n\nOrdering by mean perplexity: {ordering}\n"
    )


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="osd bench convergence")
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), metavar="NAME[:K=V,...]", help=f"optimizers and their overrides (default: {' '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds (default: 0 1)")
    parser.add_argument("--shared", type=Path, default=Path("../shared"), help="folder with data/c4_train_sample.jsonl and tokenizers/t5_tokenizer.json (default: ../shared)")
    parser.add_argument("--model", default="nano", help="model preset (default: nano)")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak lr unless a config sets its own (default: 1e-2)")
    parser.add_argument("--rank", type=int, default=16, help="rank of the projected weights (default: 16, a quarter of nano's hidden size)")
    parser.add_argument("--update-proj-gap", type=int, default=20, help="GaLore/GoLore refresh interval (default: 20)")
    parser.add_argument("--scale", type=float, default=0.25, help="factor on projected updates (default: 0.25)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--tokens", type=int, default=98_304, help="token budget of every run (default: 98304 = 96 steps of 8 x 128)")
    parser.add_argument("--eval-interval", type=int, default=24)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--val-docs", type=int, default=100, help="C4 documents held out for validation (default: 100)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/convergence"), help="output folder (default: runs/bench/convergence)")
    return parser


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """``osd bench convergence``: run with parsed arguments (``argv``, recorded as the command);
    bad input is one line on stderr and exit status 2."""
    base = {
        "model": args.model, "lr": args.lr, "rank": args.rank, "update_proj_gap": args.update_proj_gap, "scale": args.scale,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "tokens": args.tokens, "eval_interval": args.eval_interval,
        "eval_batches": args.eval_batches, "val_docs": args.val_docs,
        "data": str(args.shared / "data" / "c4_train_sample.jsonl"), "tokenizer": str(args.shared / "tokenizers" / "t5_tokenizer.json"),
    }
    try:
        results = run_convergence(base, args.configs, args.seeds, args.out)
    except (ConfigError, DataError) as error:
        return usage_error("convergence", str(error))
    curves = {spec: (s["runs"][0]["curve"]["tokens"], [r["curve"]["val_ppl"] for r in s["runs"]]) for spec, s in results["configs"].items()}
    png = plot_curves(curves, args.out / "convergence.png", "tokens", "validation perplexity", f"{args.model}, C4, mean and min–max over seeds")
    results["plot"] = str(png)
    json_path, md_path = write_results(args.out, "convergence", argv, {**base, "configs": args.configs, "seeds": args.seeds}, results, report(results, args.seeds))
    print(md_path.read_text())
    print(f"wrote {json_path}, {md_path}, {png}", file=sys.stderr)
    return 0
