"""What ``osd train`` tells its user while it runs: a banner, progress, and where the results went.

Three ways to show progress, chosen by :func:`log_mode`:

- ``"bar"``: a tqdm bar on stderr, when stderr is a terminal and ``--progress`` is on;
- ``"lines"``: one plain line on stdout every ``--log-interval`` steps and at every
  evaluation, when the output goes to a file or a pipe (no ``\\r`` updates in a log file), or
  with ``--no-progress``;
- ``"off"``: nothing (``--quiet``, ranks other than 0, benchmarks that train many runs).

The banner and the final "wrote ..." line are printed in the first two modes. Optionally
(``--tensorboard``) the same scalars also go to a TensorBoard event file in
``out_dir/tensorboard``; ``metrics.jsonl`` is written in every mode.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from osd.param_groups import describe

__all__ = ["LOG_LINES", "RunLog", "banner", "log_mode"]

LOG_LINES = 20  # lines per run when --log-interval is not set


def log_mode(progress: bool, quiet: bool, is_main: bool, stream: TextIO | None = None) -> str:
    """``"bar"``, ``"lines"`` or ``"off"`` (see the module docstring)."""
    if quiet or not is_main:
        return "off"
    stream = stream or sys.stderr
    return "bar" if progress and stream.isatty() else "lines"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def banner(config: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, vocab_size: int, world_size: int = 1) -> str:
    """The start-up lines of a run: model, optimizer, projected weights, data, budget, output."""
    params = sum(p.numel() for p in model.parameters())
    tokens_per_step = config.total_batch * config.seq_len
    hparams = f"lr {config.peak_lr:g}, warmup {config.warmup}, cosine to {config.min_lr_ratio:g}x"
    if "_" in config.optimizer:
        hparams += f", scale {config.scale:g}, update_proj_gap {config.update_proj_gap}"
    lines = [
        f"model     {config.model_config or config.model}: {_count(params)} parameters, vocabulary {vocab_size}",
        f"optimizer {config.optimizer} ({hparams}), weight decay {config.weight_decay:g}, grad clip {config.grad_clip:g}",
        f"projected {describe(optimizer.param_groups).removeprefix('projected ')}",
        f"data      {config.data} ({config.tokenizer_spec} tokens), {config.total_batch} x {config.seq_len} tokens per step"
        + (f" over {world_size} processes" if world_size > 1 else ""),
        f"budget    {config.total_steps} steps = {_count(config.total_steps * tokens_per_step)} tokens; "
        f"validation every {config.eval_interval} steps on {config.eval_batches} batches",
        f"output    {config.out_dir}",
    ]
    return "\n".join(lines)


class RunLog:
    """Progress of one run in the chosen mode, and an optional TensorBoard writer.

    ``step(record)`` takes each ``metrics.jsonl`` record; ``close()`` ends the bar or
    writes nothing more, and returns.
    """

    def __init__(self, mode: str, total_steps: int, first_step: int, desc: str, log_interval: int = 0,
                 tensorboard_dir: Path | None = None) -> None:
        self.mode = mode
        self.total_steps = total_steps
        self.interval = log_interval or max(1, total_steps // LOG_LINES)
        self.bar = tqdm(total=total_steps, initial=first_step, desc=desc, file=sys.stderr) if mode == "bar" else None
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.writer = SummaryWriter(str(tensorboard_dir))

    def print(self, text: str) -> None:
        """Print ``text`` (banner, final lines) unless the mode is ``"off"``; above the bar if there is one."""
        if self.mode == "bar":
            tqdm.write(text, file=sys.stdout)
        elif self.mode == "lines":
            print(text, flush=True)

    def step(self, record: dict[str, Any]) -> None:
        """Show one step's record: update the bar, or print a line when due."""
        step = record["step"]
        if self.writer is not None:
            for key in ("train_loss", "val_loss", "val_ppl", "lr", "tokens_per_s"):
                if key in record:
                    self.writer.add_scalar(key, record[key], step)
        if self.bar is not None:
            val = {"val_ppl": f"{record['val_ppl']:.2f}"} if "val_ppl" in record else {}
            self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", **val)
            self.bar.update()
        elif self.mode == "lines" and (step % self.interval == 0 or "val_ppl" in record or step == self.total_steps):
            line = (f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}  loss {record['train_loss']:.4f}  "
                    f"lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s")
            if "val_ppl" in record:
                line += f"  val loss {record['val_loss']:.4f}  val ppl {record['val_ppl']:.2f}"
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
