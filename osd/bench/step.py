"""``osd bench step``: optimizer-step time over a whole model, and training throughput.

For each model preset (default the papers' 60m and 130m, t5-base vocabulary) the gradients
are real: one forward/backward of the model on a batch of packed C4 text (t5 tokenizer),
or of uniformly random tokens with ``--random-tokens`` (no tokenizer or data needed; the
optimizer's cost depends on the shapes, not on the values, except through GaLore's SVD,
whose LAPACK iterations hardly vary). With these gradients fixed, ``optimizer.step()`` over
every parameter is timed for:

- ``adamw``: ``torch.optim.AdamW(foreach=True)``, full rank; ``adamw_fused``: the same with
  ``fused=True`` (one kernel per tensor);
- ``galore_adamw``: a regular step (``P`` fixed), the refresh step alone (an SVD of every
  projected gradient, timed with ``update_proj_gap=1``), and the amortised step
  ``regular + (refresh - regular) / gap``;
- ``golore_adamw``: the same with a random draw as the refresh;
- ``osd_adamw``: every step moves ``P`` (one online-PCA step), so there is no refresh;
- ``galore_adamw_8bit``, ``osd_adamw_8bit``: the same with 8-bit states (``optim_bits=8``).

The optimizers step in turn, one step each per round, on the same tensors
(:func:`interleaved_step_times`), so that a shared machine's drifting speed hits them alike.
Each step is set beside its floor (:mod:`osd.bench.floor`): its matrix-product FLOPs at this
machine's GEMM rate plus its compulsory bytes at its bandwidth, both measured again right
after that step; the table gives the median over rounds of step / floor, and for the 8-bit
variants the median over rounds of 8-bit / 32-bit step. The full-rank group (embeddings,
norms) is timed alone too, osd's path against ``torch.optim.AdamW(fused=True)`` on the same
tensors, interleaved, over four times ``--repeats`` rounds. ``aten ops`` counts
the ATen operations (about one kernel launch each on a GPU) of one regular ``step()`` of a
single projected MLP weight of the preset, for the projected optimizers.

Throughput (``--throughput-presets``, default 60m; ``--throughput-optimizers``, default
adamw and osd_adamw): whole training steps, forward + backward + ``optimizer.step()`` on one
batch, each optimizer on its own copy of the model, the optimizers' steps interleaved (round
robin) so that load on the machine hits them alike; timed after warm-up steps. tokens/s uses
the median step plus, for GaLore/GoLore, the amortised refresh overhead ``(refresh -
regular) / gap``; the ratio to AdamW is the median over rounds of AdamW's train step / the
optimizer's (both with their amortised refresh). ``--profile NAME`` also writes a
``torch.profiler`` table of one training step of optimizer ``NAME`` (forward, backward and step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from osd import native
from osd.bench.floor import MachineRates, StepCost, floor_ms, measure_rates, step_cost
from osd.bench.results import (
    format_ms,
    machine_info,
    markdown_table,
    measure,
    missing_shared,
    summarize,
    usage_error,
    write_results,
)
from osd.data import DataError, PackedBatches, load_documents, load_tokenizer
from osd.models import PRESETS, build_model, llama_config
from osd.optimizer import SubspaceOptimizer
from osd.presets import create_optimizer
from osd.train import token_loss_sum

__all__ = ["OPTIMIZERS", "PAPER_RANKS", "build_parser", "run"]

OPTIMIZERS = ("adamw", "adamw_fused", "galore_adamw", "golore_adamw", "osd_adamw", "galore_adamw_8bit", "osd_adamw_8bit")
REFRESHED = {"galore_adamw", "golore_adamw", "galore_adamw_8bit"}  # P changes only at a refresh, every `gap` steps
EIGHT_BIT = "_8bit"
PAPER_RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
T5_VOCAB = 32100  # t5-base tokenizer's size, the vocabulary with --random-tokens


def default_rank(preset: str) -> int:
    """The papers' rank for their presets; a quarter of the hidden size for the small ones."""
    return PAPER_RANKS.get(preset, PRESETS[preset]["hidden_size"] // 4)


def make_optimizer(model: torch.nn.Module, name: str, rank: int, gap: int) -> torch.optim.Optimizer:
    """``name`` as ``osd train`` builds it (lr 1e-3, scale 0.25, no weight decay); AdamW is
    torch's with ``foreach=True`` (``adamw_fused``: ``fused=True``); ``*_8bit``: ``optim_bits=8``."""
    if name in ("adamw", "adamw_fused"):
        return torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if name == "adamw_fused" else {"foreach": True}))
    bits = {"optim_bits": 8} if name.endswith(EIGHT_BIT) else {}
    return create_optimizer(model, name.removesuffix(EIGHT_BIT), lr=1e-3, rank=rank, update_proj_gap=gap, scale=0.25, **bits)


def load_batch(args: argparse.Namespace, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], int]:
    """One ``(batch, seq_len)`` batch and the vocabulary size: packed C4, or random tokens."""
    if args.random_tokens:
        ids = torch.randint(0, T5_VOCAB, (args.batch_size, args.seq_len), generator=generator)
        return {"input_ids": ids, "labels": ids}, T5_VOCAB
    tokenizer = load_tokenizer(str(args.shared / "tokenizers" / "t5_tokenizer.json"))
    documents = load_documents(str(args.shared / "data" / "c4_train_sample.jsonl"), "train")
    return next(PackedBatches(documents, tokenizer, args.batch_size, args.seq_len)), tokenizer.vocab_size


def forward_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Mean next-token loss of ``batch``, backpropagated into ``.grad``."""
    loss, tokens = token_loss_sum(model, batch)
    (loss / tokens).backward()


def step_times(model: torch.nn.Module, name: str, rank: int, gap: int, repeats: int, warmup: int) -> tuple[list[float], torch.optim.Optimizer]:
    """``optimizer.step()`` times (ms) with the model's current gradients, and the optimizer;
    the warm-up steps create the state (and, for GaLore/GoLore, take the first refresh)."""
    optimizer = make_optimizer(model, name, rank, gap)
    return measure(lambda: optimizer.step, repeats, warmup, device_of(model)), optimizer


@dataclass
class Timed:
    """One optimizer's steps from :func:`interleaved_step_times`: per timed round, the step
    (ms), its floor (ms) at the rates measured right after it, and those rates."""

    cost: StepCost
    times: list[float] = field(default_factory=list)
    floors: list[float] = field(default_factory=list)
    rates: list[MachineRates] = field(default_factory=list)


def interleaved_step_times(model: torch.nn.Module, names: list[str], rank: int, gap: int, repeats: int, warmup: int) -> dict[str, Timed]:
    """Every optimizer of ``names`` on ``model``'s gradients, one step of each in turn (round
    robin, the weights restored after each step so that all step the same tensors); after
    each timed step the GEMM rates of that optimizer's shapes and the bandwidth are measured
    again, and the step is priced at them. A shared machine's speed drifts by tens of percent
    within minutes: interleaving makes ratios between optimizers, and each step / floor,
    compare like with like. Warm-up rounds create the states (GaLore/GoLore's first refresh)."""
    device = device_of(model)
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    optimizers = {name: make_optimizer(model, name, rank, gap) for name in names}
    timed: dict[str, Timed] = {}
    for i in range(warmup + repeats):
        for name, optimizer in optimizers.items():
            elapsed = measure(lambda: optimizer.step, 1, 0, device)
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
            if i < warmup:
                continue
            entry = timed.setdefault(name, Timed(step_cost(optimizer)))
            rates = measure_rates(sorted(entry.cost.gemm_flops), device, repeats=3, copy_mib=64)
            entry.times += elapsed
            entry.floors.append(floor_ms(entry.cost, rates))
            entry.rates.append(rates)
    return timed


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of ``numerators[i] / denominators[i]`` (paired rounds: drift common to both cancels)."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def step_entry(t: Timed) -> dict[str, Any]:
    """The report entry of one optimizer's interleaved steps: times, cost, floors, their per-round ratio and the rates."""
    return {
        "step": summarize(t.times), "gflop": t.cost.flops / 1e9, "mbytes": t.cost.bytes / 1e6,
        "floor_ms": statistics.median(t.floors), "floors_ms": t.floors, "vs_floor": median_ratio(t.times, t.floors),
        "machine_rates": {"gemm_gflops": {f"{m}x{n}:{r}": [rates.gemm[(m, n, r)] / 1e9 for rates in t.rates] for (m, n, r) in t.cost.gemm_flops},
                          "bandwidth_gbs": [rates.bandwidth / 1e9 for rates in t.rates]},
    }


def full_rank_group_times(model: torch.nn.Module, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Step times (ms) of the full-rank parameters alone (the ones ``osd_adamw`` does not
    project), through osd's full-rank path (checked, the default, and ``nonfinite="unchecked"``)
    and through ``torch.optim.AdamW(fused=True)``, interleaved. The parameters are restored
    after each step, so all three see the same tensors."""
    projected = {id(p) for group in make_optimizer(model, "osd_adamw", 1, 200).param_groups if group.get("rank") for p in group["params"]}
    params = [p for p in model.parameters() if id(p) not in projected]
    optimizers = {"osd": SubspaceOptimizer(params, lr=1e-3, projector="identity"),
                  "osd_unchecked": SubspaceOptimizer(params, lr=1e-3, projector="identity", nonfinite="unchecked"),
                  "torch_fused": torch.optim.AdamW(params, lr=1e-3, fused=True)}
    saved = [p.detach().clone() for p in params]
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for i in range(warmup + repeats):
        for name, optimizer in optimizers.items():
            elapsed = measure(lambda: optimizer.step, 1, 0, device_of(model))
            if i >= warmup:
                times[name] += elapsed
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
    return times


def aten_ops_per_projected_weight(preset: str, name: str, rank: int, gap: int, device: torch.device) -> int:
    """ATen operations dispatched by one regular ``step()`` of an optimizer over a single
    projected ``hidden x intermediate`` weight (the preset's MLP shape)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    shape = (PRESETS[preset]["hidden_size"], PRESETS[preset]["intermediate_size"])
    layer = torch.nn.Module()
    layer.mlp = torch.nn.Linear(*shape, bias=False, device=device)
    layer.mlp.weight.grad = torch.randn_like(layer.mlp.weight)
    optimizer = make_optimizer(layer, name, rank, gap)
    optimizer.step()
    optimizer.step()
    with Count():
        optimizer.step()
    return Count.ops


def interleaved_train_times(model: torch.nn.Module, batch: dict[str, torch.Tensor], names: list[str], rank: int, gap: int, repeats: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Times (ms) of whole training steps and of their forward+backward and step parts, for
    each optimizer on its own copy of ``model``, one step of each in turn."""
    runs = {}
    for name in names:
        copy = copy_model(model)
        runs[name] = (copy, make_optimizer(copy, name, rank, gap))
    times = {name: {"train_step": [], "forward_backward": [], "step": []} for name in names}
    for i in range(warmup + repeats):
        for name, (copy, optimizer) in runs.items():
            optimizer.zero_grad(set_to_none=True)
            fb = measure(lambda: lambda: forward_backward(copy, batch), 1, 0, device_of(copy))
            st = measure(lambda: optimizer.step, 1, 0, device_of(copy))
            if i >= warmup:
                times[name]["forward_backward"] += fb
                times[name]["step"] += st
                times[name]["train_step"].append(fb[0] + st[0])
    return times


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def copy_model(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy of ``model`` (weights cloned, no gradients)."""
    import copy

    clone = copy.deepcopy(model)
    clone.zero_grad(set_to_none=True)
    return clone


def profile_train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], name: str, rank: int, gap: int, path: Path) -> Path:
    """A ``torch.profiler`` table (top ops by CPU time) of one training step after two warm-up steps."""
    from torch.profiler import ProfilerActivity, profile, record_function

    optimizer = make_optimizer(model, name, rank, gap)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, batch)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_of(model).type == "cuda" else [])
    with profile(activities=activities) as prof:
        with record_function("forward_backward"):
            forward_backward(model, batch)
        with record_function("optimizer.step"):
            optimizer.step()
    path.write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40) + "\n")
    return path


def bench_preset(preset: str, args: argparse.Namespace, throughput: bool, bar: tqdm) -> dict[str, Any]:
    """Step times of every optimizer on ``preset``, and its throughput if asked."""
    generator = torch.Generator().manual_seed(args.seed)
    batch, vocab = load_batch(args, generator)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    batch = {key: value.to(device) for key, value in batch.items()}
    model = build_model(llama_config(preset, vocab, args.seq_len)).to(device)
    rank = args.rank or default_rank(preset)
    tokens = batch["input_ids"].numel()
    forward_backward(model, batch)
    result: dict[str, Any] = {"preset": preset, "rank": rank, "parameters": sum(p.numel() for p in model.parameters()), "tokens_per_step": tokens, "optimizers": {}}
    result["native_kernels"] = device.type == "cpu" and native.available()
    bar.set_postfix_str(f"{preset} steps, interleaved")
    timed = interleaved_step_times(model, args.optimizers, rank, args.gap, args.repeats, args.warmup)
    for name in args.optimizers:
        bar.set_postfix_str(f"{preset} {name}")
        entry = step_entry(timed[name])
        thirty_two = timed.get(name.removesuffix(EIGHT_BIT)) if name.endswith(EIGHT_BIT) else None
        if thirty_two:
            entry["vs_32bit"] = median_ratio(timed[name].times, thirty_two.times)
        if name not in ("adamw", "adamw_fused"):
            entry["aten_ops_per_projected_weight"] = aten_ops_per_projected_weight(preset, name, rank, args.gap, device)
        regular = entry["step"]["median_ms"]
        if name in REFRESHED:
            entry["refresh_step"] = summarize(step_times(model, name, rank, 1, args.refresh_repeats, 1)[0])
            entry["refresh_overhead_ms"] = (entry["refresh_step"]["median_ms"] - regular) / args.gap
        entry["amortised_step_ms"] = regular + entry.get("refresh_overhead_ms", 0.0)
        result["optimizers"][name] = entry
        bar.update()
    bar.set_postfix_str(f"{preset} full-rank group")
    group_times = full_rank_group_times(model, 4 * args.repeats, args.warmup)
    result["full_rank_group"] = {key: summarize(value) for key, value in group_times.items()}
    for name in ("osd", "osd_unchecked"):
        result["full_rank_group"][f"{name}_vs_torch_fused"] = median_ratio(group_times[name], group_times["torch_fused"])
    if throughput:
        bar.set_postfix_str(f"{preset} train")
        names = [name for name in args.optimizers if name in args.throughput_optimizers]
        all_times = interleaved_train_times(model, batch, names, rank, args.gap, args.train_repeats, args.train_warmup)
        for name, times in all_times.items():
            entry = result["optimizers"][name]
            entry["train"] = {key: summarize(value) for key, value in times.items()}
            seconds = (entry["train"]["train_step"]["median_ms"] + entry.get("refresh_overhead_ms", 0.0)) / 1e3
            entry["tokens_per_s"] = tokens / seconds
            bar.update()
        base_name = next((name for name in ("adamw", "adamw_fused") if name in all_times), None)
        if base_name:
            result["throughput_baseline"] = base_name

            def amortised(name: str) -> list[float]:
                return [t + result["optimizers"][name].get("refresh_overhead_ms", 0.0) for t in all_times[name]["train_step"]]

            for name in all_times:  # paired rounds: the forward+backward's drift, common to both, cancels
                result["optimizers"][name]["throughput_vs_adamw"] = median_ratio(amortised(base_name), amortised(name))
        if args.profile:
            bar.set_postfix_str(f"{preset} {args.profile} profile")
            path = profile_train_step(model, batch, args.profile, rank, args.gap, Path(args.out) / f"profile_{preset}_{args.profile}.txt")
            result["profile"] = str(path)
    return result


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    step_rows, train_rows, group_rows, rate_lines = [], [], [], []
    for res in results:
        base = res["optimizers"].get("adamw", {}).get("amortised_step_ms")
        for name, e in res["optimizers"].items():
            refresh = format_ms(e["refresh_step"]) if "refresh_step" in e else "—"
            ratio = f"{e['amortised_step_ms'] / base:.2f}x" if base else "—"
            vs_32 = f"{e['vs_32bit']:.2f}x" if "vs_32bit" in e else "—"
            step_rows.append([res["preset"], res["rank"], name, format_ms(e["step"]), f"{e['floor_ms']:.1f}", f"{e['vs_floor']:.2f}x",
                              f"{e['gflop']:.2f}", f"{e['mbytes']:.0f}", e.get("aten_ops_per_projected_weight", "—"), refresh,
                              f"{e['amortised_step_ms']:.2f}", ratio, vs_32])
            if "train" in e:
                t = e["train"]
                train_rows.append([res["preset"], name, format_ms(t["forward_backward"]), format_ms(t["step"]), format_ms(t["train_step"]),
                                   f"{e['tokens_per_s']:.0f}", f"{e['throughput_vs_adamw']:.3f}x" if "throughput_vs_adamw" in e else "—"])
        g = res["full_rank_group"]
        group_rows.append([res["preset"], format_ms(g["osd"]), format_ms(g["osd_unchecked"]), format_ms(g["torch_fused"]),
                           f"{g['osd_vs_torch_fused']:.2f}x", f"{g['osd_unchecked_vs_torch_fused']:.2f}x"])
        rate_lines.append(f"- {res['preset']}: " + rate_ranges([e["machine_rates"] for e in res["optimizers"].values()]))
    text = (
        f"`optimizer.step()` over all parameters, median (min–max) ms of {args.repeats} steps after {args.warmup} warm-up, "
        "the optimizers interleaved (one step of each in turn, on the same tensors); step / floor and 8-bit vs 32-bit are medians of "
        f"per-round ratios (refresh: {args.refresh_repeats} after 1); amortised = regular + (refresh − regular) / {args.gap}.\n\n"
        + markdown_table(["preset", "rank", "optimizer", "step (ms)", "floor (ms)", "step / floor", "GFLOP", "MB moved", "aten ops / projected weight",
                          "refresh step (ms)", "amortised step (ms)", "vs AdamW (foreach)", "8-bit vs 32-bit"], step_rows, numeric_from=3)
        + "\n\nFloor = matrix-product FLOPs at the measured GEMM rate of their shape + compulsory bytes at the measured copy bandwidth, "
        "each measured right after every timed step (lowest–highest over the run):\n"
        + "\n".join(rate_lines)
        + "\n\n8-bit (de)quantisation: "
        + ("the compiled C kernels (osd.native)" if all(res.get("native_kernels") for res in results) else "torch ops (osd.native not available here, or not on a CPU)")
        + f"\n\nThe full-rank group alone (parameters osd_adamw does not project), interleaved, median (min–max) ms of {4 * args.repeats} rounds; osd / torch: the median of per-round ratios:\n\n"
        + markdown_table(["preset", "osd full-rank path", "osd, nonfinite='unchecked'", "torch AdamW fused", "osd / torch fused", "unchecked / torch fused"], group_rows)
        + "\n"
    )
    if train_rows:
        batch = f"{args.batch_size} x {args.seq_len}"
        text += (
            f"\nTraining throughput, batch {batch} tokens: {args.train_repeats} steps after {args.train_warmup} warm-up, the optimizers interleaved, "
            "median (min–max) ms; tokens/s from the median step plus the amortised refresh; vs AdamW: the median over rounds of "
            "AdamW's train step / this optimizer's (each round runs one step of each).\n\n"
            + markdown_table(["preset", "optimizer", "forward+backward (ms)", "step (ms)", "train step (ms)", "tokens/s", "vs AdamW"], train_rows, numeric_from=2)
            + "\n"
        )
    return text


def rate_ranges(rates: list[dict[str, Any]]) -> str:
    """``GEMM GFLOP/s by shape (lo–hi, ...); bandwidth lo–hi GB/s`` over every measurement of the optimizers."""
    by_shape: dict[str, list[float]] = {}
    for measured in rates:
        for shape, values in measured["gemm_gflops"].items():
            by_shape.setdefault(shape, []).extend(values)
    bandwidths = [value for measured in rates for value in measured["bandwidth_gbs"]]
    gemm = ", ".join(f"{shape}: {min(values):.0f}–{max(values):.0f}" for shape, values in by_shape.items())
    return f"GEMM GFLOP/s by shape m x n : r ({gemm}); bandwidth {min(bandwidths):.1f}–{max(bandwidths):.1f} GB/s"


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="osd bench step")
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--presets", nargs="+", default=["60m", "130m"], choices=list(PRESETS), help="model presets (default: 60m 130m)")
    parser.add_argument("--throughput-presets", nargs="*", default=["60m"], help="presets whose training throughput is measured (default: 60m)")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS), help="default: all")
    parser.add_argument("--throughput-optimizers", nargs="+", default=["adamw", "osd_adamw"], choices=list(OPTIMIZERS),
                        help="optimizers whose training throughput is measured, interleaved, each on its own model copy (default: adamw osd_adamw)")
    parser.add_argument("--rank", type=int, default=None, help="rank for every preset (default: the papers' rank, 60m: 128, 130m: 256)")
    parser.add_argument("--gap", type=int, default=200, help="GaLore/GoLore update_proj_gap the refresh is amortised over (default: 200)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch (default: 16)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed optimizer steps (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (default: 2)")
    parser.add_argument("--refresh-repeats", type=int, default=3, help="timed refresh steps (default: 3)")
    parser.add_argument("--train-repeats", type=int, default=3, help="timed training steps (default: 3)")
    parser.add_argument("--train-warmup", type=int, default=2, help="untimed training steps first (default: 2)")
    parser.add_argument("--profile", choices=list(OPTIMIZERS), default=None, help="also profile one training step of this optimizer")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default cpu")
    parser.add_argument("--random-tokens", action="store_true", help="random token ids (vocab 32100) instead of C4 text")
    parser.add_argument("--shared", type=Path, default=Path("../shared"), help="folder with the C4 sample and t5 tokenizer (default: ../shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/step", help="output folder (default: runs/bench/step)")
    return parser


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """``osd bench step``: run with parsed arguments (``argv``, recorded as the command);
    bad input is one line on stderr and exit status 2."""
    for name in ("repeats", "refresh_repeats", "train_repeats", "gap", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            return usage_error("step", f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.train_warmup < 0:
        return usage_error("step", "--warmup and --train-warmup must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        return usage_error("step", "--device cuda, but CUDA is not available")
    unknown = set(args.throughput_presets) - set(args.presets)
    if unknown:
        return usage_error("step", f"--throughput-presets {sorted(unknown)} are not among --presets {args.presets}")
    if not args.random_tokens and (why := missing_shared(args.shared, "or run with --random-tokens (timings do not depend on the text)")):
        return usage_error("step", why)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.device)
    n_train = len(set(args.optimizers) & set(args.throughput_optimizers))
    total = sum(len(args.optimizers) + (n_train if p in args.throughput_presets else 0) for p in args.presets)
    try:
        with tqdm(total=total, desc="step", unit="bench", file=sys.stderr) as bar:
            results = [bench_preset(preset, args, preset in args.throughput_presets, bar) for preset in args.presets]
    except DataError as error:
        return usage_error("step", str(error))
    config = {key: value if not isinstance(value, Path) else str(value) for key, value in vars(args).items()}
    json_path, md_path = write_results(args.out, "step", argv, config, results, report(results, args), machine)
    print(md_path.read_text())
    print(f"wrote {json_path}, {md_path}", file=sys.stderr)
    return 0
