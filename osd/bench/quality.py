"""``osd bench quality``: which optimizer trains the best model on this CPU, each at its tuned learning rate.

The protocol (defaults; ``--quick`` scales it down for the test suite):

1. Tokenizer: a byte-level BPE of ``--vocab`` (2048) entries trained on the TRAINING split of
   the C4 sample (all but its last ``--val-docs`` documents), so the LLaMA ``micro`` preset's
   projected matrices (attention and MLP) hold 60% of its parameters, not the 2% of a
   t5-vocabulary model.
2. Budget: ``--passes`` (1) full passes over the training tokens, batch 16 x 128, linear
   warmup (10%) then cosine to 10%, gradient clipping 1.0; validation on the first 16 full
   batches of the held-out split (32512 predicted tokens), 8 times per run and at the end.
3. Methods, one rank for all (``--rank-fraction`` of the hidden size): full-rank AdamW
   (``torch.optim.AdamW``), GaLore, GoLore@20% (SVD for the first 80% of steps, random
   after, the GoLore paper's recipe), OSD at the paper's defaults (alpha 5, lambda 0.1, Adam
   on P) and OSD with alpha tuned; then each option beyond the papers on OSD and on GaLore
   (Fira and APOLLO compensation, first-moment transport, Muon in the subspace) and the
   sketched online-PCA projector, every one tuned the same way. ``--methods`` picks some;
   methods can be added to an existing benchmark folder later (finished runs are kept).
4. Tuning, on seed 0 and the validation split: every method's lr over its grid (values
   about 3x apart); where the best lr is at an edge of the grid, the grid grows by one
   value on that side (``--extend`` times at most). OSD's alpha is then tuned the same way
   at OSD's best lr. The best setting of each method then runs on every ``--seeds`` seed.
5. Report: final validation loss (mean, std, min–max over seeds), perplexity, bits per
   byte; the held-out split's unigram entropy (the loss of the best model that knows only
   token frequencies) and the untrained model's loss beside the table; which differences
   exceed the spread (min–max ranges that do not overlap); curves of validation loss
   against tokens (``quality.png``).

Every run is an ordinary ``osd train`` folder under ``OUT/runs/<method>/<setting>/seed<k>``
with its final checkpoint (``osd eval`` scores it on any text) and a ``result.json``. The
benchmark is resumable: finished runs are read back, an interrupted one continues from its
last checkpoint, and ``--max-minutes`` stops starting new runs after that long (exit status
3: run the same command again to continue), so it can run in chunks under a shared lock.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from osd.bench.results import markdown_table, plot_curves, spread, usage_error, write_results
from osd.bpe import train_bpe
from osd.config import ConfigError, TrainConfig
from osd.data import DataError, load_documents, load_tokenizer, validation_batches
from osd.models import PRESETS
from osd.perplexity import token_stream
from osd.plot import read_metrics
from osd.train import build_training_model, evaluate, train

__all__ = ["METHODS", "Protocol", "build_parser", "prepare", "run", "run_protocol", "unigram_entropy"]

# label -> (osd train optimizer, fixed settings). "osd_alpha" is "osd" with alpha tuned.
# The OSD rows were measured with P initialised by the SVD (OSD's default until 2026-12-03),
# so they pin it and reproduce docs/benchmarks.md; "osd_randomized" is today's default.
_SVD_INIT = "svd_method=svd"
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {}),
    "galore": ("galore_adamw", {}),
    "osd": ("osd_adamw", {"optimizer_args": _SVD_INIT}),
    "osd_alpha": ("osd_adamw", {"optimizer_args": _SVD_INIT}),
    "golore": ("golore_adamw", {"optimizer_args": "svd_until=0.8"}),
    # The options beyond the papers (README: "Beyond the papers"), each on OSD and on GaLore.
    "osd_fira": ("osd_adamw", {"optimizer_args": f"compensation=fira,{_SVD_INIT}"}),
    "galore_fira": ("galore_adamw", {"optimizer_args": "compensation=fira"}),
    "osd_apollo": ("osd_adamw", {"optimizer_args": f"compensation=apollo,{_SVD_INIT}"}),
    "galore_apollo": ("galore_adamw", {"optimizer_args": "compensation=apollo"}),
    "osd_transport": ("osd_adamw", {"optimizer_args": f"moment_transport=first,{_SVD_INIT}"}),
    "galore_transport": ("galore_adamw", {"optimizer_args": "moment_transport=first"}),
    "osd_muon": ("osd_muon", {"optimizer_args": _SVD_INIT}),
    "galore_muon": ("galore_muon", {}),
    "osd_sketch": ("osd_sketch_adamw", {"optimizer_args": _SVD_INIT}),
    # The cheaper bases (docs/performance.md): OSD's initial P (its default) and GaLore's
    # refreshes by randomized range finding instead of the SVD.
    "osd_randomized": ("osd_adamw", {"optimizer_args": "svd_method=randomized,svd_niter=1"}),
    "galore_randomized": ("galore_adamw", {"optimizer_args": "svd_method=randomized,svd_niter=2"}),
}
# The default table: every method but the cheaper-basis variants (run by name: the default
# table keeps its ~90-minute budget).
DEFAULT_METHODS = tuple(name for name in METHODS if not name.endswith("_randomized"))
PAPER_ALPHA = 5.0
UNFINISHED = 3  # exit status when --max-minutes stopped the benchmark before the table


class Paused(Exception):
    """Raised before a run would start after the time budget of this invocation."""


@dataclass
class Protocol:
    """The settings every run of one benchmark shares, and the tuning grids."""

    data: str
    model: str = "micro"
    vocab: int = 2048
    seq_len: int = 128
    batch_size: int = 16
    passes: float = 1.0
    rank_fraction: float = 0.25
    update_proj_gap: int = 50
    scale: float = 0.25
    val_docs: int = 100
    evals: int = 8  # validation points per run
    max_eval_batches: int = 16  # 16 x 16 x 127 = 32512 predicted tokens
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    adamw_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    subspace_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    alphas: tuple[float, ...] = (1.0, 5.0, 25.0)
    extend: int = 2
    derived: dict[str, Any] = field(default_factory=dict)  # filled by prepare()

    @property
    def rank(self) -> int:
        return max(1, round(self.rank_fraction * PRESETS[self.model]["hidden_size"]))

    def lr_grid(self, method: str) -> list[float]:
        return list(self.adamw_lrs if method == "adamw" else self.subspace_lrs)


QUICK = {"model": "nano", "vocab": 512, "seq_len": 64, "batch_size": 8, "passes": 0.1, "evals": 4, "max_eval_batches": 16,
         "seeds": (0, 1), "extend": 0, "update_proj_gap": 20}


def unigram_entropy(batches: Sequence[dict[str, torch.Tensor]], vocab_size: int) -> float:
    """Entropy (nats) of the empirical distribution of the predicted tokens of ``batches``
    (``labels[:, 1:]``): the validation loss of a model that knows exactly their frequencies
    and nothing else."""
    targets = torch.cat([b["labels"][:, 1:].flatten() for b in batches])
    p = torch.bincount(targets[targets >= 0], minlength=vocab_size).double()
    p = p[p > 0] / p.sum()
    return -(p * p.log()).sum().item()


def prepare(protocol: Protocol, out: Path) -> Protocol:
    """Train (or reuse) the BPE at ``out/tokenizer.json``; count the training tokens; measure
    the validation split's unigram entropy and the untrained model's loss; the results go
    into ``protocol.derived`` (and ``out/protocol.json``, reused on a relaunch)."""
    saved = out / "protocol.json"
    if saved.is_file():
        previous = json.loads(saved.read_text())
        # The method list is not a shared setting: methods can be added to a benchmark.
        shared = lambda settings: {k: v for k, v in settings.items() if k not in ("derived", "methods")}  # noqa: E731
        if shared(previous) != json.loads(json.dumps(shared(asdict(protocol)))):
            raise ConfigError(f"{out} holds a benchmark with other settings ({saved}); use another --out")
        protocol.derived = previous["derived"]
        return protocol
    train_docs = load_documents(protocol.data, "train", val_docs=protocol.val_docs)
    texts = list(train_docs.iterate())
    tokenizer_path = train_bpe(texts, protocol.vocab, out / "tokenizer.json").resolve()
    tokenizer = load_tokenizer(str(tokenizer_path))
    train_tokens = sum(len(ids) + 1 for ids in tokenizer.encode(texts))
    val_docs = load_documents(protocol.data, "validation", val_docs=protocol.val_docs)
    val = validation_batches(val_docs, tokenizer, protocol.batch_size, protocol.seq_len, protocol.max_eval_batches)
    val_stream, val_bytes = token_stream(val_docs, tokenizer)
    config = _config(protocol, "adamw", 1e-3, 0, out / "untrained", {"tokenizer": str(tokenizer_path), "tokens": train_tokens})
    torch.manual_seed(0)
    model = build_training_model(config, tokenizer.vocab_size, torch.device("cpu"))
    params = dict(model.named_parameters())
    projected = sum(p.numel() for n, p in params.items() if p.ndim == 2 and (".self_attn." in n or ".mlp." in n))
    tokens = math.ceil(protocol.passes * train_tokens)
    steps = math.ceil(tokens / (protocol.batch_size * protocol.seq_len))
    protocol.derived = {
        "tokenizer": str(tokenizer_path),
        "train_docs": train_docs.num_docs,
        "train_tokens": train_tokens,
        "tokens": tokens,
        "steps": steps,
        "eval_interval": max(1, steps // protocol.evals),
        "val_tokens": sum(int(b["labels"][:, 1:].numel()) for b in val),
        "val_tokens_per_byte": len(val_stream) / val_bytes,
        "unigram_entropy": unigram_entropy(val, tokenizer.vocab_size),
        "untrained_loss": evaluate(model, val, torch.device("cpu"))[0],
        "parameters": sum(p.numel() for p in params.values()),
        "projected_parameters": projected,
        "rank": protocol.rank,
        "hidden_size": PRESETS[protocol.model]["hidden_size"],
    }
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(asdict(protocol), indent=2) + "\n")
    return protocol


def _config(protocol: Protocol, method: str, lr: float, seed: int, out_dir: Path, extra: dict[str, Any], alpha: float | None = None) -> TrainConfig:
    optimizer, fixed = METHODS[method]
    derived = protocol.derived
    settings: dict[str, Any] = {
        "model": protocol.model, "optimizer": optimizer, "lr": lr, "seed": seed, "seq_len": protocol.seq_len,
        "batch_size": protocol.batch_size, "data": protocol.data, "val_docs": protocol.val_docs,
        "eval_batches": protocol.max_eval_batches, "out_dir": str(out_dir), "progress": False, "device": "cpu",
        "rank": protocol.rank, "update_proj_gap": protocol.update_proj_gap, "scale": protocol.scale,
        "tokenizer": derived.get("tokenizer"), "tokens": derived.get("tokens"), "eval_interval": derived.get("eval_interval", 1),
        "save_interval": derived.get("eval_interval", 0), "resume": (out_dir / "checkpoint.pt").is_file(), "overwrite": not (out_dir / "checkpoint.pt").is_file(), **fixed, **extra,
    }
    if alpha is not None:
        settings["alpha"] = alpha
    return TrainConfig(**settings)


class Runner:
    """Trains one (method, lr, alpha, seed) run, or reads back its ``result.json``."""

    def __init__(self, protocol: Protocol, out: Path, max_seconds: float | None, log: Callable[[str], None]):
        self.protocol, self.out, self.log = protocol, out, log
        self.deadline = None if max_seconds is None else time.monotonic() + max_seconds

    def run_dir(self, method: str, lr: float, seed: int, alpha: float | None = None) -> Path:
        # OSD with alpha tuned shares its runs with OSD at the paper's alpha.
        base = "osd" if method == "osd_alpha" else method
        setting = f"lr{lr:g}" + ("" if alpha in (None, PAPER_ALPHA) else f"-alpha{alpha:g}")
        return self.out / "runs" / base / setting / f"seed{seed}"

    def __call__(self, method: str, lr: float, seed: int, alpha: float | None = None) -> dict[str, Any]:
        run_dir = self.run_dir(method, lr, seed, alpha)
        result_path = run_dir / "result.json"
        if result_path.is_file():
            return json.loads(result_path.read_text())
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Paused
        config = _config(self.protocol, method, lr, seed, run_dir, {}, alpha)
        self.log(f"training {run_dir.relative_to(self.out)}")
        started = time.perf_counter()
        final = train(config)
        evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
        result = {
            "method": method, "optimizer": config.optimizer, "lr": lr, "alpha": config.alpha if config.optimizer.startswith("osd") else None,
            "seed": seed, "val_loss": final["val_loss"], "val_ppl": final["val_ppl"], "tokens": final["tokens"],
            "optimizer_state_bytes": final["optimizer_state_bytes"], "wall_s": time.perf_counter() - started,
            "curve": {"tokens": [r["tokens"] for r in evals], "val_loss": [r["val_loss"] for r in evals]}, "run_dir": str(run_dir),
        }
        result_path.write_text(json.dumps(result, indent=2) + "\n")
        return result


def _loss(result: dict[str, Any]) -> float:
    return result["val_loss"] if math.isfinite(result["val_loss"]) else math.inf


def tune(values: list[float], score: Callable[[float], float], extend: int) -> tuple[float, dict[float, float]]:
    """The value of ``values`` with the lowest ``score``; while it sits at an edge of the
    grid, add the next value on that side (same ratio as the grid's first step), ``extend``
    times at most. Returns the best value and the score of every value tried."""
    values = sorted(values)
    ratio = values[1] / values[0] if len(values) > 1 else 3.0
    scores: dict[float, float] = {}
    for attempt in range(extend + 1):
        scores.update({v: score(v) for v in values if v not in scores})
        best = min(values, key=scores.__getitem__)
        if attempt == extend or len(values) < 2 or best not in (values[0], values[-1]):
            break
        values = [values[0] / ratio, *values] if best == values[0] else [*values, values[-1] * ratio]
    return best, dict(sorted(scores.items()))


def run_protocol(protocol: Protocol, runner: Runner) -> dict[str, Any]:
    """Tune every method on seed 0, then run its best setting on every seed; the summaries."""
    first = protocol.seeds[0]
    tuned: dict[str, dict[str, Any]] = {}
    for method in protocol.methods:
        if method == "osd_alpha":
            continue
        lr, grid = tune(protocol.lr_grid(method), lambda lr: _loss(runner(method, lr, first)), protocol.extend)
        tuned[method] = {"lr": lr, "alpha": None, "lr_grid": grid}
    if "osd_alpha" in protocol.methods:
        lr = tuned["osd"]["lr"] if "osd" in tuned else tune(protocol.lr_grid("osd"), lambda v: _loss(runner("osd", v, first)), protocol.extend)[0]
        alpha, grid = tune(list(protocol.alphas), lambda a: _loss(runner("osd_alpha", lr, first, a)), protocol.extend)
        tuned["osd_alpha"] = {"lr": lr, "alpha": alpha, "alpha_grid": grid}
    summary = {}
    for method in protocol.methods:
        best = tuned[method]
        runs = [runner(method, best["lr"], seed, best["alpha"]) for seed in protocol.seeds]
        losses = [r["val_loss"] for r in runs]
        summary[method] = {
            **best,
            **spread(losses, "val_loss"),
            "val_ppl_mean": statistics.fmean(math.exp(x) for x in losses),
            "bits_per_byte_mean": statistics.fmean(losses) * protocol.derived["val_tokens_per_byte"] / math.log(2),
            "optimizer_state_bytes": runs[0]["optimizer_state_bytes"],
            "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs),
            "runs": runs,
        }
    ordering = sorted(summary, key=lambda m: summary[m]["val_loss_mean"])
    return {"methods": summary, "ordering": ordering, "comparisons": compare(summary, ordering)}


def compare(summary: dict[str, dict[str, Any]], ordering: list[str]) -> list[dict[str, Any]]:
    """Every pair (better first, by mean loss) of methods with different runs: the difference
    of mean losses, and whether it exceeds the spread (the seeds' min–max ranges do not overlap)."""
    pairs = []
    for i, a in enumerate(ordering):
        for b in ordering[i + 1 :]:
            sa, sb = summary[a], summary[b]
            if [r["run_dir"] for r in sa["runs"]] == [r["run_dir"] for r in sb["runs"]]:
                continue
            pairs.append({"better": a, "worse": b, "difference": sb["val_loss_mean"] - sa["val_loss_mean"],
                          "exceeds_spread": sa["val_loss_max"] < sb["val_loss_min"]})
    return pairs


def _setting(entry: dict[str, Any]) -> str:
    return f"{entry['lr']:g}" + ("" if entry.get("alpha") is None else f", α {entry['alpha']:g}")


def report(results: dict[str, Any], protocol: Protocol, wall_s: float) -> str:
    """The Markdown: the regime, the table, the tuning grids and which differences exceed the spread."""
    d, methods = protocol.derived, results["methods"]
    entropy, untrained = d["unigram_entropy"], d["untrained_loss"]
    seeds = list(protocol.seeds)
    rows = []
    for place, method in enumerate(results["ordering"], 1):
        s = methods[method]
        rows.append([
            f"{place}. {method}", f"`{METHODS[method][0]}`", _setting(s),
            f"{s['val_loss_mean']:.4f} ± {s['val_loss_std']:.4f}", f"{s['val_loss_min']:.4f}–{s['val_loss_max']:.4f}",
            f"{s['val_ppl_mean']:.2f}", f"{s['bits_per_byte_mean']:.4f}", f"{entropy - s['val_loss_mean']:.3f}",
            f"{s['optimizer_state_bytes'] / 2**20:.2f}", f"{s['wall_s_mean']:.0f}",
        ])
    header = ["method", "optimizer", "tuned lr", f"val loss mean ± std ({len(seeds)} seeds)", "min–max", "val ppl", "bits/byte",
              "below unigram (nats)", "optimizer state (MiB)", "wall s / run"]
    grid_rows = []
    for method in protocol.methods:
        s = methods[method]
        name, grid = ("alpha", s["alpha_grid"]) if "alpha_grid" in s else ("lr", s["lr_grid"])
        cells = ", ".join(f"{v:g}: {loss:.4f}" + (" ←" if v == s[name] else "") for v, loss in grid.items())
        grid_rows.append([method, name, cells])
    lines = []
    for c in results["comparisons"]:
        verdict = "exceeds the spread (min–max ranges do not overlap)" if c["exceeds_spread"] else "inside the noise (ranges overlap)"
        lines.append(f"- {c['better']} < {c['worse']}: {c['difference']:.4f} nats, {verdict}")
    share = d["projected_parameters"] / d["parameters"]
    return (
        f"Regime: LLaMA `{protocol.model}` ({d['parameters'] / 1e6:.2f}M parameters, {share:.0%} of them in the projected "
        f"attention/MLP matrices), byte-level BPE of {protocol.vocab} entries trained on the training split "
        f"({d['train_docs']} C4 documents, {d['train_tokens']} tokens); {protocol.passes:g} pass = {d['tokens']} tokens = "
        f"{d['steps']} steps of {protocol.batch_size} x {protocol.seq_len}; warmup 10%, cosine to 10%, clip 1.0; "
        f"rank {d['rank']} = {protocol.rank_fraction:g} x hidden size {d['hidden_size']} for every subspace method, "
        f"scale {protocol.scale:g}, GaLore/GoLore refresh every {protocol.update_proj_gap} steps; validation: the last "
        f"{protocol.val_docs} documents, {d['val_tokens']} predicted tokens.\n\n"
        f"**Unigram entropy of the validation tokens: {entropy:.4f} nats (perplexity {math.exp(entropy):.2f})**; "
        f"untrained model: {untrained:.4f} nats.\n\n"
        f"Final validation loss (nats per token, lower is better), each method at its best setting on seed {seeds[0]}, "
        f"then on seeds {seeds}:\n\n{markdown_table(header, rows, numeric_from=2)}\n\n"
        f"Tuning on seed {seeds[0]} (final validation loss per value; ← chosen):\n\n"
        f"{markdown_table(['method', 'tuned', 'value: loss'], grid_rows, numeric_from=3)}\n\n"
        f"Differences of mean loss:\n\n" + "\n".join(lines) + f"\n\nWall time of this table's runs: {wall_s / 60:.1f} min.\n"
    )


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="osd bench quality")
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--shared", type=Path, default=Path("../shared"), help="folder with data/c4_train_sample.jsonl (default: ../shared)")
    parser.add_argument("--quick", action="store_true", help="the test-suite variant: nano preset, 512 entries, 0.1 pass, seeds 0 1, no grid extension")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help=f"methods (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds of the final runs, the first also tunes (default: 0 1 2)")
    parser.add_argument("--adamw-lrs", nargs="+", type=float, help="AdamW's lr grid (default: 1e-3 3e-3 1e-2)")
    parser.add_argument("--subspace-lrs", nargs="+", type=float, help="the subspace methods' lr grid (default: 3e-3 1e-2 3e-2)")
    parser.add_argument("--alphas", nargs="+", type=float, help="OSD's alpha grid (default: 1 5 25)")
    parser.add_argument("--extend", type=int, help="grid extensions where the best value is at an edge (default: 2)")
    parser.add_argument("--max-minutes", type=float, help="start no new run after this long; exit status 3 if unfinished (run again to continue)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/quality"), help="output folder (default: runs/bench/quality)")
    return parser


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    """The :class:`Protocol` of the parsed flags (``--quick`` first, then explicit flags)."""
    settings: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in ("methods", "seeds", "adamw_lrs", "subspace_lrs", "alphas"):
        if getattr(args, name):
            settings[name] = tuple(getattr(args, name))
    if args.extend is not None:
        settings["extend"] = args.extend
    return Protocol(data=str(args.shared / "data" / "c4_train_sample.jsonl"), **settings)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """``osd bench quality``: bad input is one line on stderr (status 2); unfinished, status 3."""
    protocol = protocol_from_args(args)
    out: Path = args.out
    log = lambda message: print(f"osd bench quality: {message}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        prepare(protocol, out)
        runner = Runner(protocol, out, None if args.max_minutes is None else 60 * args.max_minutes, log)
        results = run_protocol(protocol, runner)
    except Paused:
        log(f"stopped after --max-minutes {args.max_minutes:g}; finished runs are kept: run the same command again to continue")
        return UNFINISHED
    except (ConfigError, DataError) as error:
        return usage_error("quality", str(error))
    wall_s = sum(r["wall_s"] for r in _all_runs(out))
    png = plot_curves(_curves(results["methods"]), out / "quality.png", "tokens", "validation loss (nats per token)",
                      f"{protocol.model}, C4, best lr per method: mean and min–max over seeds {list(protocol.seeds)}",
                      log_y=False, hlines={"unigram entropy of the validation tokens": protocol.derived["unigram_entropy"]},
                      legend_loc="outside")
    results.update(plot=str(png), wall_s=wall_s)
    json_path, md_path = write_results(out, "quality", argv, asdict(protocol), results, report(results, protocol, wall_s))
    print(md_path.read_text())
    log(f"wrote {json_path}, {md_path}, {png}")
    return 0


def _curves(methods: dict[str, dict[str, Any]]) -> dict[str, tuple[list[float], list[list[float]]]]:
    """Validation loss against tokens per method, one curve per distinct set of runs (OSD with
    alpha tuned is labelled with OSD where the tuned alpha is the paper's)."""
    curves: dict[str, tuple[list[float], list[list[float]]]] = {}
    labels: dict[tuple[str, ...], str] = {}
    for method, s in methods.items():
        key = tuple(r["run_dir"] for r in s["runs"])
        if key in labels:  # the same runs: rename the curve, keep its place (and colour)
            old, labels[key] = labels[key], f"{labels[key]} = {method} ({_setting(s)})"
            curves = {labels[key] if label == old else label: curve for label, curve in curves.items()}
            continue
        labels[key] = method
        curves[method] = (s["runs"][0]["curve"]["tokens"], [r["curve"]["val_loss"] for r in s["runs"]])
    return curves


def _all_runs(out: Path) -> list[dict[str, Any]]:
    """Every finished run's result under ``out/runs`` (the tuning runs included)."""
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*/seed*/result.json"))]
