"""How good and how cheap the cheaper top-r bases (``svd_method``) are, on real gradients.

1. Real gradients: one forward/backward of a LLaMA preset (default 60m, the papers' rank)
   on a batch of packed C4 text (t5 tokenizer, from ``../shared``). For every projected
   weight (canonical orientation, ``m <= n``) each method's basis is compared with the exact
   top-r subspace of the same gradient: largest and median principal angle (degrees) and the
   share of the best rank-r energy it captures, ``||P^T G||^2 / ||U_r^T G||^2``; the table
   gives the worst weight and the median over weights, and each method's total time: what
   OSD's first step (every ``P`` initialised) or a GaLore refresh step costs in bases.
2. Timing at larger shapes (``--timing-preset``, default 1b): one basis per method at each
   distinct projected shape of the preset, times the number of weights of that shape: the
   basis part of the first step at that size (gradients drawn at random; the cost depends
   on the shape, not the values).

    python benchmarks/basis_quality.py                      # 60m real gradients, 1b timings
    python benchmarks/basis_quality.py --preset 130m --timing-preset none
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osd import functional as F  # noqa: E402
from osd.bench.step import PAPER_RANKS, forward_backward  # noqa: E402
from osd.data import PackedBatches, load_documents, load_tokenizer  # noqa: E402
from osd.models import PRESETS, build_model, llama_config  # noqa: E402

PROJECTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def methods(niters: list[int], seed: int) -> dict[str, Callable[[Tensor, int], Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    table: dict[str, Callable[[Tensor, int], Tensor]] = {
        "svd": lambda G, r: F.svd_basis(G, r, "left"),
        "eigh": lambda G, r: F.eigh_basis(G, r),
    }
    for niter in niters:
        table[f"randomized niter={niter}"] = lambda G, r, k=niter: F.randomized_basis(G, r, k, generator)
    return table


def timed(call: Callable[[], Tensor]) -> tuple[Tensor, float]:
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def real_gradients(preset: str, shared: Path, batch_size: int, seq_len: int) -> list[tuple[str, Tensor]]:
    """(name, canonical gradient) of every projected weight after one C4 batch."""
    tokenizer = load_tokenizer(str(shared / "tokenizers" / "t5_tokenizer.json"))
    documents = load_documents(str(shared / "data" / "c4_train_sample.jsonl"), "train")
    batch = next(PackedBatches(documents, tokenizer, batch_size, seq_len))
    torch.manual_seed(0)
    model = build_model(llama_config(preset, tokenizer.vocab_size, seq_len))
    forward_backward(model, batch)
    grads = []
    for name, p in model.named_parameters():
        if name.split(".")[-2] in PROJECTED:
            G = p.grad if p.shape[0] <= p.shape[1] else p.grad.mT
            grads.append((name, G.contiguous()))
    return grads


def quality(grads: list[tuple[str, Tensor]], rank: int, table: dict[str, Callable[[Tensor, int], Tensor]]) -> dict[str, dict[str, float]]:
    per_method: dict[str, dict[str, list[float]]] = {name: {"max": [], "median": [], "energy": [], "seconds": []} for name in table}
    for _, G in grads:
        exact = None
        for name, basis in table.items():
            P, seconds = timed(lambda: basis(G, rank))
            exact = P if name == "svd" else exact
            angles = F.principal_angles(P, exact).rad2deg()
            energy = (P.mT.double() @ G.double()).square().sum() / (exact.mT.double() @ G.double()).square().sum()
            stats = per_method[name]
            stats["max"].append(float(angles.max()))
            stats["median"].append(float(angles.median()))
            stats["energy"].append(float(energy))
            stats["seconds"].append(seconds)
    return {
        name: {
            "worst_max_angle": max(s["max"]),
            "median_max_angle": statistics.median(s["max"]),
            "median_median_angle": statistics.median(s["median"]),
            "worst_energy": min(s["energy"]),
            "median_energy": statistics.median(s["energy"]),
            "total_seconds": sum(s["seconds"]),
        }
        for name, s in per_method.items()
    }


def timing(preset: str, rank: int, table: dict[str, Callable[[Tensor, int], Tensor]]) -> dict[str, float]:
    """Seconds of one basis per projected weight of ``preset``, by method (one timing per distinct shape)."""
    hidden, inter, layers = (PRESETS[preset][k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    shapes = {(hidden, hidden): 4 * layers, (min(hidden, inter), max(hidden, inter)): 3 * layers}
    generator = torch.Generator().manual_seed(0)
    totals = dict.fromkeys(table, 0.0)
    for (m, n), count in shapes.items():
        G = torch.randn(m, n, generator=generator)
        for name, basis in table.items():
            totals[name] += timed(lambda: basis(G, rank))[1] * count
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="60m", choices=list(PRESETS))
    parser.add_argument("--rank", type=int, default=None, help="default: the papers' rank of the preset")
    parser.add_argument("--timing-preset", default="1b", help="preset whose shapes are timed, or 'none' (default: 1b)")
    parser.add_argument("--niters", type=int, nargs="+", default=[0, 1, 2], help="power iterations of the randomized bases (default: 0 1 2)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    args = parser.parse_args()
    if not (args.shared / "data" / "c4_train_sample.jsonl").exists():
        print(f"basis_quality: needs {args.shared}/data/c4_train_sample.jsonl and the t5 tokenizer (--shared)", file=sys.stderr)
        return 2
    rank = args.rank or PAPER_RANKS[args.preset]
    table = methods(args.niters, seed=0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {__import__('os').getloadavg()[0]:.2f}\n")
    results = quality(real_gradients(args.preset, args.shared, args.batch_size, args.seq_len), rank, table)
    print(f"{args.preset}, rank {rank}, real C4 gradients ({args.batch_size} x {args.seq_len}), every projected weight:\n")
    print("| method | all bases (s) | max angle, worst / median weight (deg) | median angle, median weight (deg) | energy captured, worst / median |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['total_seconds']:.2f} | {r['worst_max_angle']:.3g} / {r['median_max_angle']:.3g} | {r['median_median_angle']:.3g} | "
              f"{r['worst_energy']:.5f} / {r['median_energy']:.5f} |")
    if args.timing_preset != "none":
        timing_rank = args.rank or PAPER_RANKS[args.timing_preset]
        totals = timing(args.timing_preset, timing_rank, table)
        print(f"\n{args.timing_preset}, rank {timing_rank}: one basis for every projected weight (random gradients, one timing per shape):\n")
        print("| method | all bases (s) | vs svd |")
        print("|---|---:|---:|")
        for name, seconds in totals.items():
            print(f"| {name} | {seconds:.1f} | {seconds / totals['svd']:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
