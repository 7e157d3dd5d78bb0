"""Checkpoints of ``osd train``: atomic saves, and loads that name every problem in one line.

:class:`RunCheckpoint` owns what a run saves and restores (in the manner of torchtitan's
``CheckpointManager``): the model, the optimizer (``P`` and its state included), the LR
scheduler, the data position, the RNG states and the counters (step, tokens), with the run's
settings beside them. Whether a checkpoint may resume a run (same settings, steps left) is
the run's policy, :func:`osd.runs.check_resume`.

A kill at any moment leaves the previous checkpoint loadable; a failed save (a full disk)
keeps it too and removes its partial file. A file that is not a complete checkpoint of this
kind (empty, truncated, text, random bytes, a pickle of Python objects, a bare model state
dict, a key missing) raises :class:`CheckpointError`, whose message is one line.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from osd import distributed
from osd.data import DataError

__all__ = ["CheckpointError", "KEYS", "RunCheckpoint", "atomic_save", "load", "rng_state", "set_rng_state"]

KEYS = ("model", "optimizer", "scheduler", "data", "rng", "step", "tokens", "config")  # what osd train writes


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read, named in one line."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically.

    Writes ``path.tmp`` in the same directory, flushes and fsyncs it, renames it over
    ``path`` (atomic on POSIX) and fsyncs the directory, so ``path`` is always either the
    old complete file or the new complete one. If writing fails (``ENOSPC``, ``EIO``, ...)
    the partial ``path.tmp`` is removed, ``path`` is untouched and :class:`CheckpointError`
    names the cause.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        kept = "the previous checkpoint is kept" if path.exists() else "no checkpoint was written"
        raise CheckpointError(f"cannot save checkpoint {path}: {_cause(error)}; {kept}") from error
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _cause(error: BaseException) -> str:
    """The OS error behind ``error`` (``[Errno 28] No space left on device``), else its first line."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} (errno {error.errno})"
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


ZIP_MAGIC = b"PK\x03\x04"
"""The first bytes of every file ``torch.save`` writes (a zip archive's local file header)."""


def _unreadable(path: Path, size: int, error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, decided by what the file is (its
    first bytes) rather than by which exception the unpickler happened to raise: a file that
    does not start as a zip archive is not a torch checkpoint; a zip archive that refuses
    unpickling holds Python objects; any other failure of a zip archive is damage."""
    with open(path, "rb") as file:
        head = file.read(len(ZIP_MAGIC))
    if head != ZIP_MAGIC:
        return f"{path} is not a torch checkpoint (not a zip archive of tensors): corrupt or another kind of file"
    if isinstance(error, pickle.UnpicklingError) and zipfile.is_zipfile(path):
        return (
            f"checkpoint {path} holds Python objects other than tensors and plain values; "
            "osd train never writes those, so it is not loaded (it is not this run's checkpoint)"
        )
    return f"checkpoint {path} ({size} bytes) is truncated or corrupt: it does not read as a torch zip archive"


def load(path: str | os.PathLike, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain values only) and check
    that it is a dict holding ``keys`` (``osd train``: :data:`KEYS`); raise
    :class:`CheckpointError` otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, KeyError, EOFError ... for a bad file
        raise CheckpointError(_unreadable(path, size, error)) from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(saved).__name__}, not a dict of tensors and values")
    missing = [key for key in keys if key not in saved]
    if missing and all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise CheckpointError(f"{path} is a bare model state dict ({len(saved)} tensors), not an osd train checkpoint: it has no {', '.join(missing)}")
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(repr(k) for k in missing)}: it was not written by osd train, or is damaged")
    return saved


def rng_state() -> dict[str, Any]:
    """The RNG states a training run draws from: Python's, torch's CPU and CUDA ones."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunCheckpoint:
    """The checkpoint of one run at ``path``: what it saves and how it restores it.

    ``model`` may be wrapped (DDP, FSDP2): the file holds whole, unsharded tensors keyed as
    in the bare model, so it resumes under any world size. ``data`` is the batch iterator
    (``state_dict`` / ``load_state_dict``, e.g. :class:`osd.data.PackedBatches`); ``config``
    the run's settings, saved with it. :attr:`saved_step` is the step of the last checkpoint
    written or restored (None: none yet).
    """

    def __init__(
        self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, data: Any,
        config: dict[str, Any], parallel: distributed.Parallel,
    ) -> None:
        self.path, self.model, self.optimizer, self.scheduler, self.data = path, model, optimizer, scheduler, data
        self.config, self.parallel = config, parallel
        self.saved_step: int | None = None

    def save_run(self, step: int, tokens: int) -> None:
        """Save the run after ``step`` (``tokens`` read so far), atomically (:func:`atomic_save`).
        Collective: every rank calls it (sharded tensors are gathered), rank 0 writes. Raises
        :class:`CheckpointError` if the write fails (the previous file kept)."""
        state = {"model": distributed.model_state_dict(self.model), "optimizer": distributed.optimizer_state_dict(self.optimizer)}
        if self.parallel.is_main:
            parts = {"scheduler": self.scheduler.state_dict(), "data": self.data.state_dict(), "rng": rng_state()}
            atomic_save({**state, **parts, "step": step, "tokens": tokens, "config": self.config}, self.path)
        self.saved_step = step

    def restore_run(self, check: Callable[[dict[str, Any]], None] = lambda saved: None) -> tuple[int, int]:
        """Load the checkpoint into the run and return its ``(step, tokens)``.

        ``check(saved)`` runs after the file is read and before anything is loaded (the run's
        policy: same settings, steps left; it raises to refuse). Raises :class:`CheckpointError`
        (one line) for a file that is not a checkpoint, a model of other keys or shapes, and a
        part that does not fit this run's (the part named).
        """
        saved = load(self.path, KEYS)
        check(saved)
        _check_model_state(self.path, distributed.unwrap(self.model).state_dict(), saved["model"])
        for part, restore in [
            ("model", lambda: distributed.load_model_state_dict(self.model, saved["model"])),
            ("optimizer", lambda: distributed.load_optimizer_state_dict(self.optimizer, saved["optimizer"])),
            ("lr scheduler", lambda: self.scheduler.load_state_dict(saved["scheduler"])),
            ("data position", lambda: self.data.load_state_dict(saved["data"])),
            ("RNG states", lambda: set_rng_state(saved["rng"])),
        ]:
            try:
                restore()
            except DataError:  # the data source's own one-line message
                raise
            except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as error:
                reason = " ".join(str(error).split()) or type(error).__name__
                raise CheckpointError(f"checkpoint {self.path} does not fit this run's {part}: {reason}") from None
        self.saved_step = saved["step"]
        return saved["step"], saved["tokens"]


def _check_model_state(path: Path, expected: dict[str, torch.Tensor], saved: Any) -> None:
    """Refuse a saved model state with other keys or shapes than the model's, naming the first."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path}: 'model' is a {type(saved).__name__}, not a state dict")
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} holds another model: {len(missing)} of this model's tensors missing "
            f"({', '.join(missing[:2])}), {len(unexpected)} unknown ({', '.join(unexpected[:2])})"
        )
    for name, tensor in expected.items():
        if not isinstance(saved[name], torch.Tensor) or saved[name].shape != tensor.shape:
            shape = tuple(saved[name].shape) if isinstance(saved[name], torch.Tensor) else type(saved[name]).__name__
            raise CheckpointError(f"checkpoint {path} holds another model: {name} is {shape} there, {tuple(tensor.shape)} here")
