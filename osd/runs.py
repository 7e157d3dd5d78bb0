"""What keeps an ``osd train`` run honest: nothing lost, nothing run that was not asked for.

* :func:`check_out_dir`: a new run never reuses a non-empty directory silently
  (``--overwrite`` / ``--resume``), ``--resume`` needs a checkpoint, the directory must be writable;
* :func:`check_resume`: a checkpoint resumes only a run with its settings (each difference
  named) and steps left (:class:`osd.checkpoint.RunCheckpoint` checks that it fits the model);
* :func:`start_run_files`: the run's files change only after every check has passed;
* :class:`StopRequests`: SIGINT / SIGTERM finish the step and save (:class:`Interrupted`);
* :class:`DivergenceCheck`: the divergence policy (:class:`RunError`);
* :func:`save`, :func:`write_metrics`: a failed write stops the run, the last checkpoint kept.

The policy, every case and what the user sees: ``docs/troubleshooting.md``.
"""

from __future__ import annotations

import json
import math
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, TextIO


from osd import distributed
from osd.checkpoint import CheckpointError, RunCheckpoint
from osd.config import MAY_CHANGE, ConfigError, TrainConfig

__all__ = ["RunError", "Interrupted", "StopRequests", "DivergenceCheck", "check_out_dir", "check_resume", "start_run_files", "save", "write_metrics"]


class RunError(RuntimeError):
    """A run that failed after it started (divergence, a failed save, a full disk), named in one line."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run finished its step and saved a checkpoint."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} after step {step}; checkpoint saved to {path}; "
            "to continue, run the same command with --resume"
        )
        self.signum = signum


class StopRequests:
    """Within the block, SIGINT and SIGTERM only set :attr:`signum`, so that the loop can
    finish its step and save; the first one also restores the previous handlers, so a
    second Ctrl-C interrupts at once (the atomic save keeps the last checkpoint whole)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def requested(self, parallel: distributed.Parallel) -> int | None:
        """The signal that asked to stop, on any rank (every rank stops at the same step)."""
        if parallel.world_size == 1:
            return self.signum
        anywhere = distributed.all_sum([float(self.signum is not None)], parallel)[0] > 0
        return (self.signum or signal.SIGTERM) if anywhere else None


class DivergenceCheck:
    """The divergence policy of ``osd train``: a run has diverged when its train loss is

    * non-finite (NaN / Inf), or
    * above ``2 ln(vocab)``: twice the loss of predicting every token uniformly (a fresh
      model starts near ``ln(vocab)``), or
    * within ``1e-4`` of ``ln(vocab)`` on ``patience`` steps in a row: the model has
      collapsed to the uniform prediction (what ``--lr 1e4`` does), and learns nothing more.

    ``patience=math.inf`` turns the check off (``--no-divergence-check``).

    A diverged run stops without saving, so the last checkpoint is from before; it exits 1.
    While the loss sits at ``ln(vocab)`` but not yet for ``patience`` steps, :attr:`suspect`
    is true and periodic saves wait, so that no collapsed model replaces a good checkpoint.
    """

    def __init__(self, vocab_size: int, patience: float = 3) -> None:
        self.uniform, self.patience, self._at_uniform = math.log(vocab_size), patience, 0

    @property
    def suspect(self) -> bool:
        return self._at_uniform > 0

    @staticmethod
    def error(step: int, cause: str, saved_step: int | None, lr: float) -> RunError:
        """The :class:`RunError` that stops a run diverged at ``step`` for ``cause``."""
        return RunError(f"training diverged at step {step}: {cause}; stopped without saving ({kept(saved_step)}); lower --lr (now {lr}) or lengthen the warmup")

    def __call__(self, loss: float) -> str | None:
        """Why the run has diverged with this step's ``loss``, or None."""
        if self.patience == math.inf:  # the check is off
            return None
        if not math.isfinite(loss):
            return f"the train loss is {loss}"
        if loss > 2 * self.uniform:
            return f"the train loss {loss:.4g} exceeds 2 ln(vocab) = {2 * self.uniform:.4g}"
        self._at_uniform = self._at_uniform + 1 if abs(loss - self.uniform) < 1e-4 else 0
        if self._at_uniform >= self.patience:
            return f"the train loss has been ln(vocab) = {self.uniform:.4f} for {self.patience} steps: the model predicts the uniform distribution"
        return None


def kept(saved_step: int | None) -> str:
    """What a run that stops now leaves behind."""
    return f"the checkpoint of step {saved_step} is kept" if saved_step is not None else "no checkpoint was written"


def save(checkpoints: RunCheckpoint, step: int, tokens: int) -> None:
    """:meth:`RunCheckpoint.save_run`; a failed write stops the run (:class:`RunError`, exit 1)."""
    try:
        checkpoints.save_run(step, tokens)
    except CheckpointError as error:
        raise RunError(f"{error}; the run stops at step {step}") from None


def write_metrics(metrics: TextIO | None, record: dict[str, Any], saved_step: int | None) -> None:
    """Append ``record`` to ``metrics.jsonl`` (None: not this rank's to write); a failed write stops the run."""
    if metrics is None:
        return
    try:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
    except OSError as error:
        raise RunError(f"cannot write {metrics.name}: {error.strerror or error}; the run stops at step {record['step']} ({kept(saved_step)})") from None


# --------------------------------------------------------------------------- the run directory


def check_out_dir(config: TrainConfig) -> Path:
    """``--out-dir``, created if missing and checked writable: refuses a file, an unwritable
    directory, ``--resume`` without a checkpoint there and, without ``--resume`` or
    ``--overwrite``, a non-empty directory (a previous run's files are never replaced silently)."""
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} is a file, not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as error:
        raise ConfigError(f"--out-dir {out_dir} is not writable: {error.strerror or error}") from None
    checkpoint_path = out_dir / "checkpoint.pt"
    if config.resume and not checkpoint_path.exists():
        raise ConfigError(f"--resume: no checkpoint at {checkpoint_path}, so nothing to resume (drop --resume to start a new run)")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not config.resume and entries and not config.overwrite:
        raise ConfigError(
            f"--out-dir {out_dir} is not empty ({', '.join(entries[:4])}{' ...' if len(entries) > 4 else ''}): "
            "pass --resume to continue its run, --overwrite to start afresh there, or another --out-dir"
        )
    return out_dir


def check_resume(saved: dict[str, Any], config: TrainConfig, path: Path, default_rank: Any = None) -> None:
    """May checkpoint ``saved`` (read from ``path``) resume the run of ``config``?

    Refuses (:class:`ConfigError` / :class:`CheckpointError`, one line) a checkpoint trained
    with other settings (each difference named, defaults compared as the runs used them,
    ``default_rank`` standing for no ``--rank``: see :meth:`TrainConfig.resume_differences`;
    ``--allow-change`` lets the step budget change) and one at or past where this run stops.
    (Whether its model and optimizer fit is :meth:`osd.checkpoint.RunCheckpoint.restore_run`'s check.)
    """
    if not isinstance(saved["config"], dict):
        raise CheckpointError(f"checkpoint {path} has no run configuration to compare with")
    differences = config.resume_differences(saved["config"], default_rank)
    if differences:
        budget = [d for d in differences if d.split()[0][2:].replace("-", "_") in MAY_CHANGE]
        hint = f"; add --allow-change {','.join(d.split()[0][2:] for d in budget)} to continue with the new budget" if budget else ""
        raise ConfigError(f"--resume: {path} was trained with other settings: {'; '.join(differences)}{hint}")
    step = saved["step"]
    stop = min(config.total_steps, config.stop_at_step or config.total_steps)
    if step >= stop:
        raise ConfigError(f"--resume: the checkpoint is at step {step}, and this run stops at step {stop}; raise --steps (with --allow-change steps) to train on")


def start_run_files(out_dir: Path, config: TrainConfig, resumed_step: int) -> None:
    """Once every check has passed: drop the metrics logged after the checkpoint a run resumes
    from, or a replaced run's files (``--overwrite``); then write ``config.json``."""
    metrics_path = out_dir / "metrics.jsonl"
    try:
        if config.resume:
            if metrics_path.exists():
                lines = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_step]
                metrics_path.write_text("".join(line + "\n" for line in lines))
        else:
            for name in ("metrics.jsonl", "checkpoint.pt", "checkpoint.pt.tmp"):
                (out_dir / name).unlink(missing_ok=True)
        (out_dir / "config.json").write_text(config.to_json())
    except OSError as error:
        raise RunError(f"cannot write to --out-dir {out_dir}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise RunError(f"{metrics_path} is not JSON lines ({error}); move it away to resume") from None
