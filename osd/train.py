"""``osd train``: pretrain a LLaMA model with a gradient-subspace optimizer, as the papers do.

The components (model presets, data, optimizer, schedule, checkpoints) know nothing of
each other; they meet in :func:`train`. One optimizer step:

    for each of `accumulation` micro-batches: loss_sum / tokens_in_step -> backward
    clip the global gradient norm; optimizer.step(); scheduler.step()

so the loss is averaged per token over the whole step, whatever the accumulation. The
optimizer carries what changes a step (:func:`build_optimizer`): with ``--layerwise`` the
weights step inside the last backward (``osd.layerwise``; ``optimizer.step()`` then finds
nothing left, and ``--grad-clip`` clips per parameter); under torchrun its SVD refreshes are
spread over the ranks (``osd.spread``). Saving and resuming: :class:`osd.checkpoint.RunCheckpoint`.
Validation perplexity is ``exp(total token loss / number of tokens)`` over a fixed set.

    python -m osd.train --model micro --optimizer osd_adamw --rank 32 --steps 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from osd import distributed
from osd.allocator import compact_heap
from osd.checkpoint import CheckpointError, RunCheckpoint
from osd.config import ConfigError, TrainConfig, build_parser, config_from_args
from osd.data import IGNORE_INDEX, DataError, PackedBatches, Tokenizer, load_documents, load_tokenizer, validation_batches
from osd.layerwise import LayerwiseUpdates
from osd.memory import state_bytes
from osd.models import build_model, llama_config
from osd.param_groups import default_rank, projected_modules
from osd.presets import create_optimizer
from osd.run_log import RunLog, banner, log_mode
from osd.runs import DivergenceCheck, Interrupted, RunError, StopRequests, check_out_dir, check_resume, save, start_run_files, write_metrics
from osd.schedule import warmup_cosine
from osd.spread import spread_svd

__all__ = ["train", "train_step", "build_training_model", "build_optimizer", "evaluate", "main", "run"]


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of a batch and the number of predicted tokens.

    ``labels`` are ``input_ids`` with ``IGNORE_INDEX`` (-100) where nothing is to be predicted (padding);
    position ``i`` predicts token ``i + 1``.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device, parallel: distributed.Parallel | None = None
) -> tuple[float, float]:
    """Validation loss per token and perplexity ``exp(sum of token losses / tokens)``.

    Under ``parallel`` each rank takes its rows of every batch and the sums are added over ranks.
    """
    parallel = parallel or distributed.Parallel(device=device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, tokens = token_loss_sum(model, {k: v.to(device) for k, v in parallel.rows(batch).items()})
        total += loss.item()
        count += tokens
    model.train(was_training)
    total, count = distributed.all_sum([total, count], parallel)
    mean = total / count
    return mean, math.exp(mean) if not mean > 709.0 else math.inf  # exp overflows a float past 709


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: max allocated on a GPU; on the CPU the process's peak resident
    set (``VmHWM`` on Linux, which unlike ``ru_maxrss`` does not count the parent's pages
    of a forked child), else ``ru_maxrss``."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_training_model(config: TrainConfig, vocab_size: int, device: torch.device) -> torch.nn.Module:
    """The LLaMA of ``config`` on ``device``, with activation checkpointing if asked for."""
    model = build_model(llama_config(config.model, vocab_size, config.seq_len, config.model_config)).to(device)
    if config.activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_optimizer(config: TrainConfig, model: torch.nn.Module, parallel: distributed.Parallel | None = None) -> torch.optim.Optimizer:
    """The optimizer of ``config`` (:meth:`TrainConfig.optimizer_kwargs`), ready for the loop:
    with ``--layerwise`` its weights step inside backward (:class:`osd.layerwise.LayerwiseUpdates`,
    counting ``config.accumulation`` micro-batches); under ``parallel`` with ``--spread-svd``
    its SVD refreshes are spread over the ranks (:func:`osd.spread.spread_svd`)."""
    optimizer = create_optimizer(model, config.optimizer, **config.optimizer_kwargs())
    if config.layerwise:
        LayerwiseUpdates(optimizer, config.accumulation)
    if config.spread_svd and parallel is not None:
        spread_svd(optimizer, parallel.rank, parallel.world_size)
    return optimizer


def default_rank_of(config: TrainConfig, model: torch.nn.Module) -> int | str | None:
    """What no ``--rank`` means for ``model`` under ``config``'s optimizer: the rank
    :func:`osd.param_groups.default_rank` gives its projected weights (a string naming each
    rank where they differ), or None for a full-rank optimizer."""
    if not config.optimizer.rpartition("_")[0]:
        return None
    targets = config.extra_optimizer_kwargs().get("target_modules", "blocks")
    ranks = sorted({default_rank(module.weight.shape) for module in projected_modules(model, targets).values()})
    return ranks[0] if len(ranks) == 1 else f"default ({', '.join(map(str, ranks))} by weight)"


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    grad_clip: float,
    parallel: distributed.Parallel | None = None,
) -> float:
    """One optimizer step over the global step's ``micro_batches``; returns the train loss per token.

    The loss is summed over the step's tokens and divided by their number, so the step's
    gradient is that of the per-token mean whatever the accumulation and the world size.
    Under ``parallel`` (DDP / FSDP2) this rank runs its share of the micro-batches and
    gradients synchronise on its last one. Then: clip the global gradient norm to
    ``grad_clip`` (0: off), ``optimizer.step()``, ``optimizer.zero_grad()``.
    """
    parallel = parallel or distributed.Parallel(device=micro_batches[0]["input_ids"].device)
    step_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    own = parallel.share(micro_batches)
    local_loss = 0.0
    for k, batch in enumerate(own):
        with distributed.gradient_sync(model, enabled=k == len(own) - 1):
            loss_sum, _ = token_loss_sum(model, batch)
            (loss_sum * parallel.grad_scale / step_tokens).backward()
        local_loss += loss_sum.item()
    train_loss = distributed.all_sum([local_loss], parallel)[0] / step_tokens
    if grad_clip > 0:
        distributed.clip_grad_norm_(list(model.parameters()), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return train_loss


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(name)


def _parallel(config: TrainConfig) -> distributed.Parallel:
    """This process's place in a torchrun job (or a single process), with the batch checked."""
    try:
        parallel = distributed.current(_resolve_device(config.device), fsdp=config.fsdp)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.accumulation % parallel.world_size:
        raise ConfigError(
            f"--total-batch-size ({config.total_batch}) must be a multiple of --batch-size x world size "
            f"({config.batch_size} x {parallel.world_size})"
        )
    if config.layerwise and parallel.world_size > 1:
        raise ConfigError(
            "--layerwise is not supported under DDP/FSDP: a weight's hook fires before its gradient is all-reduced, "
            "so it would step on this rank's gradient alone; drop --layerwise or run one process"
        )
    if config.optim_bits == 8 and parallel.mode == "fsdp":
        raise ConfigError("--optim-bits 8 is not supported with --fsdp (sharded full-rank states); drop one of them")
    if config.batch_size < parallel.world_size:
        raise ConfigError(f"--batch-size ({config.batch_size}) must be at least the world size ({parallel.world_size}): validation splits each batch's rows over ranks")
    return parallel


def load_data(config: TrainConfig) -> tuple[Tokenizer, PackedBatches, list[dict[str, torch.Tensor]]]:
    """The run's tokenizer, its endless training batches and its fixed validation batches."""
    train_docs = load_documents(config.data, "train", val_docs=config.val_docs)
    val_docs = load_documents(config.val_data or config.data, "validation", val_docs=config.val_docs)
    tokenizer = load_tokenizer(config.tokenizer_spec)
    val_batches = validation_batches(val_docs, tokenizer, config.batch_size, config.seq_len, config.eval_batches, pack=config.pack)
    return tokenizer, PackedBatches(train_docs, tokenizer, config.batch_size, config.seq_len, pack=config.pack), val_batches


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training described by ``config``; return the final metrics.

    Nothing in ``--out-dir`` changes until every check has passed (settings, data, tokenizer,
    model, checkpoint). Raises :class:`RunError` on divergence or a failed save (the last
    checkpoint kept) and :class:`Interrupted` after saving on SIGINT/SIGTERM.
    """
    parallel = _parallel(config)
    out_dir = check_out_dir(config)
    if config.layerwise if config.compact_heap is None else config.compact_heap:
        compact_heap()  # a flat resident peak (osd.allocator)
    tokenizer, batches, val_batches = load_data(config)
    torch.manual_seed(config.seed)
    try:
        model = distributed.wrap(build_training_model(config, tokenizer.vocab_size, parallel.device), parallel)
        optimizer = build_optimizer(config, distributed.unwrap(model), parallel)
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from None
    scheduler = warmup_cosine(optimizer, config.warmup, config.total_steps, config.min_lr_ratio)
    checkpoints = RunCheckpoint(out_dir / "checkpoint.pt", model, optimizer, scheduler, batches, json.loads(config.to_json()), parallel)
    rank = default_rank_of(config, distributed.unwrap(model)) if config.resume else None
    step, tokens_seen = checkpoints.restore_run(lambda saved: check_resume(saved, config, checkpoints.path, rank)) if config.resume else (0, 0)
    if parallel.is_main:
        start_run_files(out_dir, config, step)
    last_step = min(config.total_steps, config.stop_at_step or config.total_steps)
    diverged = DivergenceCheck(tokenizer.vocab_size, patience=3 if config.divergence_check else math.inf)
    record: dict[str, Any] = {}
    state_total: int | None = None
    log = start_log(config, parallel, step, banner(config, distributed.unwrap(model), optimizer, tokenizer.vocab_size, parallel.world_size))
    with StopRequests() as stop, contextlib.closing(log), (out_dir / "metrics.jsonl").open("a") if parallel.is_main else contextlib.nullcontext() as metrics:
        while step < last_step:
            started = time.perf_counter()
            # Every rank reads the whole global step (the batches one process would read) and trains on its share.
            micro_batches = [{k: v.to(parallel.device) for k, v in next(batches).items()} for _ in range(config.accumulation)]
            lr = optimizer.param_groups[0]["lr"]
            try:
                train_loss = train_step(model, optimizer, micro_batches, config.global_grad_clip, parallel)
            except FloatingPointError as error:  # a subspace optimizer refuses a non-finite gradient
                train_loss, cause = math.nan, str(error).split(";")[0]
            else:
                cause = diverged(train_loss)
            scheduler.step()
            if config.check_sync:
                distributed.check_replicas(model, optimizer, parallel)
            step += 1
            read_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
            tokens_seen += read_tokens
            state_total = state_bytes(optimizer)["total"] if state_total is None else state_total  # fixed after step 1
            record = {"step": step, "tokens": tokens_seen, "train_loss": train_loss, "lr": lr, "tokens_per_s": read_tokens / (time.perf_counter() - started),
                      "optimizer_state_bytes": state_total, "peak_memory_bytes": peak_memory_bytes(parallel.device)}
            if cause is None and (step % config.eval_interval == 0 or step == config.total_steps):
                record["val_loss"], record["val_ppl"] = evaluate(model, val_batches, parallel.device, parallel)
            write_metrics(metrics, record, checkpoints.saved_step)
            if cause is not None:
                raise diverged.error(step, cause, checkpoints.saved_step, config.peak_lr)
            log.step(record)
            signum = stop.requested(parallel)
            if (config.save_interval and step % config.save_interval == 0 and not diverged.suspect) or step == last_step or signum:
                save(checkpoints, step, tokens_seen)
            if signum:
                raise Interrupted(signum, step, checkpoints.path)
    log.print(f"wrote {', '.join(str(out_dir / name) for name in ('config.json', 'metrics.jsonl', 'checkpoint.pt'))}"
              + (f", {out_dir / 'tensorboard'}" if config.tensorboard else ""))
    return record


def start_log(config: TrainConfig, parallel: distributed.Parallel, step: int, start_banner: str) -> RunLog:
    """The run's :class:`osd.run_log.RunLog` (bar, plain lines or nothing), its banner printed."""
    mode = log_mode(config.progress, config.quiet, parallel.is_main)
    tensorboard = Path(config.out_dir) / "tensorboard" if config.tensorboard and parallel.is_main else None
    try:
        log = RunLog(mode, config.total_steps, step, config.optimizer, config.log_interval, tensorboard)
    except ImportError as error:
        raise ConfigError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {error}") from None
    log.print(start_banner + (f"\nresuming from step {step}" if step else ""))
    return log


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; bad input is reported in one line (exit status 2)."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Train from parsed ``osd train`` arguments. Every failure is one line on stderr: bad
    input (settings, data, a checkpoint that does not fit) exits 2, a run that fails
    (divergence, a failed save) 1, an interrupted one ``128 + signal`` after saving."""
    try:
        config = config_from_args(args)
        with distributed.launched(config.device):
            result = train(config)
            main_process = distributed.is_main_process()
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"osd train: error: {error}", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"osd train: error: {error}", file=sys.stderr)
        return 1
    except Interrupted as interrupted:
        print(f"osd train: {interrupted}", file=sys.stderr)
        return 128 + interrupted.signum
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C (a save in progress stays aside in its .tmp)
        print("osd train: interrupted at once (a second Ctrl-C, or before the first step); the last complete checkpoint, if any, is kept", file=sys.stderr)
        return 128 + signal.SIGINT
    if "val_ppl" in result and main_process:
        print(f"step {result['step']}: validation loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
