"""``TrainConfig``: every setting of ``osd train``, typed, checked, and its command line."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from osd.models import PRESETS
from osd.optimizer import DEFAULT_LR, SUBSPACE_DEFAULTS, optimizer_keys
from osd.presets import METHODS, optimizer_names
from osd.projectors import get_projector

__all__ = ["ConfigError", "TrainConfig", "build_parser", "config_from_args", "parse_key_values"]


class ConfigError(ValueError):
    """A bad setting, named in one line."""


# Settings that do not change what a resumed run computes: free to differ from the checkpoint's.
# progress, log_interval, quiet and tensorboard only change what is printed or logged besides
# metrics.jsonl; compact_heap only how the C heap hands memory back.
FREE_ON_RESUME = frozenset(
    {"out_dir", "resume", "overwrite", "allow_change", "stop_at_step", "save_interval", "eval_interval",
     "eval_batches", "device", "fsdp", "spread_svd", "check_sync", "divergence_check",
     "progress", "log_interval", "quiet", "tensorboard", "compact_heap"}
)
# Settings that change the run but may continue from a checkpoint, when --allow-change names them.
MAY_CHANGE = ("steps", "tokens")
# Settings whose default (None) stands for a value the run works out: resume compares that
# value, read for a checkpoint from its config's "derived" values (what that run used).
RESOLVED_ON_RESUME = ("lr", "rank", "warmup_steps", "total_batch_size", "tokenizer")
# The optimizer's own defaults, so that a flag's default is the optimizer's (one place each).
_OSD_DEFAULTS = get_projector("online_pca").defaults


def _help(text: str, optimizer: str | None = None, **kwargs: Any) -> Any:
    """A field with its ``--help`` text; ``optimizer`` marks an optimizer key of the same name
    (see :meth:`TrainConfig.optimizer_kwargs`): ``"any"`` for every optimizer, ``"subspace"``
    for a subspace optimizer whose rule, projector or optimizer takes it."""
    return field(metadata={"help": text, "optimizer": optimizer}, **kwargs)


@dataclass
class TrainConfig:
    """Settings of a pretraining run, in the GaLore / OSD papers' vocabulary.

    The defaults run offline in about a minute on a 2-core CPU (a tiny LLaMA on the
    embedded corpus); real runs name a preset, C4 and the t5-base tokenizer.
    """

    # model
    model: str = _help(f"model preset: {', '.join(PRESETS)}", default="micro")
    model_config: str | None = _help("JSON file of LlamaConfig fields (overrides --model)", default=None)
    # optimizer
    optimizer: str = _help("adamw, osd_adamw, galore_adamw, golore_adamw, osd_lion, ... (osd.optimizer_names())", default="osd_adamw")
    lr: float | None = _help(
        "peak learning rate (default: by inner rule, " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + "; README: Defaults)", default=None)
    rank: int | None = _help("rank of the projected weights (default: a quarter of each weight's smaller side, the papers' ratio: 60m -> 128)", default=None, optimizer="subspace")
    update_proj_gap: int = _help("steps between SVD / random refreshes (T)", default=SUBSPACE_DEFAULTS["update_proj_gap"], optimizer="subspace")
    scale: float = _help("factor on the projected-back update (GaLore / OSD papers)", default=SUBSPACE_DEFAULTS["scale"], optimizer="subspace")
    alpha: float = _help("OSD: lr of P as a multiple of lr", default=_OSD_DEFAULTS["alpha"], optimizer="subspace")
    ortho_reg: float = _help("OSD: lambda of the orthonormality term", default=_OSD_DEFAULTS["ortho_reg"], optimizer="subspace")
    proj_optimizer: str = _help("OSD: optimizer of P (adam, adamw, lion, sgd, adafactor)", default=_OSD_DEFAULTS["proj_optimizer"], optimizer="subspace")
    proj_lr_rule: str = _help("OSD: 'alpha' (paper) or 'released' (lr / (max_lr * T))", default=_OSD_DEFAULTS["proj_lr_rule"], optimizer="subspace")
    weight_decay: float = _help("decoupled weight decay", default=0.0, optimizer="any")
    grad_clip: float = _help("clip the global gradient norm to this (0: off); per parameter with --layerwise", default=1.0)
    optim_bits: int = _help("32, or 8 for block-wise 8-bit optimizer states (moments and P's optimizer)", default=32, optimizer="any")
    optimizer_args: str = _help(
        "more optimizer keys, checked against what the rule, projector and optimizer take: "
        "'betas=(0.9,0.95),eps=1e-6,proj_type=left,svd_until=0.8,compat=osd_release,proj_optimizer_args.weight_decay=0.1,"
        "target_modules=(\"attn\",)'",
        default="",
    )
    # memory
    layerwise: bool = _help("step each weight inside backward and free its gradient at once (osd.layerwise)", default=False)
    activation_checkpointing: bool = _help("recompute each decoder layer's activations in backward instead of keeping them", default=False)
    compact_heap: bool | None = _help(
        "glibc: give every freed allocation of 64 KiB or more back to the system at once, so the resident peak "
        "stays flat from step to step, at some speed (osd.allocator); on by default with --layerwise", default=None)
    # schedule and budget
    steps: int = _help("optimizer steps (ignored when --tokens is set)", default=200)
    tokens: int | None = _help("token budget; sets steps = tokens / (total batch * seq len)", default=None)
    warmup_steps: int | None = _help("linear warmup steps (default: 10%% of steps)", default=None)
    min_lr_ratio: float = _help("cosine decays to this fraction of the peak lr", default=0.1)
    # batches
    batch_size: int = _help("sequences per forward/backward (micro-batch)", default=8)
    total_batch_size: int | None = _help("sequences per optimizer step; accumulation = total / batch (default: batch)", default=None)
    seq_len: int = _help("tokens per sequence", default=128)
    pack: bool = _help("pack documents into full sequences (EOS between); --no-pack pads and truncates", default=True)
    # data
    data: str = _help("'embedded', 'c4' (allenai/c4 en from the hub), or local files: path, glob or comma list", default="embedded")
    val_data: str | None = _help("validation files (default: C4's validation split, or the last --val-docs documents)", default=None)
    val_docs: int = _help("documents held out for validation from local data", default=100)
    tokenizer: str | None = _help("'bytes', 't5-base' (hub), a .model or tokenizer .json (default: bytes for embedded, else t5-base)", default=None)
    eval_interval: int = _help("evaluate every N steps (and at the end)", default=100)
    eval_batches: int = _help("validation batches (a fixed set)", default=8)
    # run
    seed: int = _help("seed of the model, the data order and random projections", default=0, optimizer="subspace")
    out_dir: str = _help("directory for metrics.jsonl, config.json and checkpoint.pt", default="runs/latest")
    save_interval: int = _help("checkpoint every N steps (0: only at the end and on SIGINT/SIGTERM)", default=100)
    resume: bool = _help("continue from out_dir/checkpoint.pt (refused if it is missing or was trained with other settings)", default=False)
    overwrite: bool = _help("start afresh in a non-empty out_dir, replacing its metrics.jsonl, config.json and checkpoint.pt", default=False)
    allow_change: str | None = _help(f"with --resume, settings that may differ from the checkpoint's (comma list of: {', '.join(MAY_CHANGE)})", default=None)
    stop_at_step: int | None = _help("stop (with a checkpoint) after this step, as if interrupted", default=None)
    divergence_check: bool = _help("stop (exit 1, keeping the last checkpoint) when the train loss is non-finite, above 2 ln(vocab) or stuck at ln(vocab)", default=True)
    device: str = _help("'auto', 'cpu' or 'cuda'", default="auto")
    progress: bool = _help("a progress bar when stderr is a terminal; else (or --no-progress) plain log lines", default=True)
    log_interval: int = _help("print a log line every N steps when there is no progress bar (0: about 20 lines per run)", default=0)
    quiet: bool = _help("print nothing but errors and the final result (metrics.jsonl is still written)", default=False)
    tensorboard: bool = _help("also write TensorBoard scalars to out_dir/tensorboard (needs: pip install tensorboard)", default=False)
    # distributed (under torchrun)
    fsdp: bool = _help("under torchrun: shard weights, gradients and full-rank optimizer states with FSDP2 (default: DDP)", default=False)
    spread_svd: bool = _help("under torchrun: compute each due SVD refresh of P (GaLore, GoLore) on one rank and broadcast it", default=True)
    check_sync: bool = _help("debug: after every step check that all ranks hold the same P and replicated state (raises on mismatch)", default=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad setting."""
        if self.model_config is None and self.model not in PRESETS:
            raise ConfigError(f"unknown model preset {self.model!r}; known presets: {', '.join(PRESETS)}")
        if self.optimizer not in optimizer_names():
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(optimizer_names())}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        positive = ["update_proj_gap", "scale", "alpha", "steps", "batch_size", "seq_len", "eval_interval", "eval_batches"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ["lr", "rank"]:
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ["weight_decay", "grad_clip", "ortho_reg", "save_interval", "warmup_steps", "log_interval"]:
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.val_docs < 1:
            raise ConfigError(f"--val-docs must be >= 1 (documents held out for validation), got {self.val_docs}")
        if self.stop_at_step is not None and not 1 <= self.stop_at_step <= self.total_steps:
            raise ConfigError(f"--stop-at-step must be in [1, {self.total_steps}] (the run's steps), got {self.stop_at_step}")
        if self.warmup_steps is not None and self.warmup_steps > self.total_steps:
            raise ConfigError(f"--warmup-steps ({self.warmup_steps}) exceeds the run's {self.total_steps} steps: the lr would never reach its peak")
        unknown = sorted(set(self.allowed_changes) - set(MAY_CHANGE))
        if unknown:
            raise ConfigError(f"--allow-change: {', '.join(unknown)} cannot change on resume; only {', '.join(MAY_CHANGE)} can")
        if self.allow_change and not self.resume:
            raise ConfigError("--allow-change only applies with --resume")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: continue the run, or start it afresh")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.total_batch_size is not None and (self.total_batch_size <= 0 or self.total_batch_size % self.batch_size):
            raise ConfigError(f"--total-batch-size ({self.total_batch_size}) must be a positive multiple of --batch-size ({self.batch_size})")
        if self.tokens is not None and self.tokens < self.total_batch * self.seq_len:
            raise ConfigError(f"--tokens ({self.tokens}) is less than one step ({self.total_batch * self.seq_len} tokens)")
        if self.optim_bits not in (8, 32):
            raise ConfigError(f"--optim-bits must be 8 or 32, got {self.optim_bits}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        self.extra_optimizer_kwargs()

    def optimizer_kwargs(self) -> dict[str, Any]:
        """This run's keyword arguments of :func:`osd.create_optimizer` (the one map from
        settings to optimizer): the peak lr; the fields marked as optimizer keys (``"any"``:
        always; ``"subspace"``: for a subspace optimizer that takes the key, so GaLore gets no
        ``alpha``); per-parameter clipping ``max_grad_norm`` with ``--layerwise``; GoLore's run
        length when it switches from SVD to random bases; then ``--optimizer-args``."""
        method, _, rule = self.optimizer.rpartition("_")
        taken = optimizer_keys(rule, METHODS.get(method, "identity"))
        kwargs: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata["optimizer"] == "any" or (method and f.metadata["optimizer"] == "subspace" and f.name in taken)
        }
        if self.optim_bits == 32:
            del kwargs["optim_bits"]  # every optimizer's default; left out, ``adamw`` stays torch's
        if self.layerwise and self.grad_clip > 0:
            kwargs["max_grad_norm"] = self.grad_clip
        extra = self.extra_optimizer_kwargs()
        if method == "golore" and extra.get("svd_until"):
            kwargs["total_steps"] = self.total_steps  # GoLore's switch is a fraction of the run
        return {"lr": self.peak_lr, "torch_adamw": not self.layerwise, **kwargs, **extra}

    def extra_optimizer_kwargs(self) -> dict[str, Any]:
        """``--optimizer-args`` as keyword arguments of :func:`osd.create_optimizer`, checked
        against the keys the chosen optimizer takes (:class:`ConfigError` naming the rest)."""
        try:
            kwargs = parse_key_values(self.optimizer_args)
        except ValueError as error:
            raise ConfigError(f"--optimizer-args: {error}") from None
        method, _, rule = self.optimizer.rpartition("_")
        projector = METHODS.get(method, "identity")
        taken = optimizer_keys(rule, projector) | {"target_modules"} if method else optimizer_keys(rule, projector)
        for key in kwargs:
            if key in _OWN_FLAGS:
                raise ConfigError(f"--optimizer-args: {key!r} has its own flag, --{key.replace('_', '-')}")
            if key not in taken:
                raise ConfigError(
                    f"--optimizer-args: {self.optimizer} (rule {rule!r}, projector {projector!r}) takes no key {key!r}; "
                    f"it takes {', '.join(sorted(taken - _OWN_FLAGS))}"
                )
        return kwargs

    @property
    def allowed_changes(self) -> list[str]:
        """The settings ``--allow-change`` names."""
        return [name.strip().replace("-", "_") for name in (self.allow_change or "").split(",") if name.strip()]

    def resume_differences(self, saved: dict[str, Any], default_rank: Any = None) -> list[str]:
        """The settings of this config that differ from ``saved`` (a checkpoint's config), as
        ``--flag OLD -> NEW``, leaving out :data:`FREE_ON_RESUME`, the ``allowed_changes`` and
        keys either side lacks (settings added since, derived values).

        A setting of :data:`RESOLVED_ON_RESUME` compares as each run uses it, its default
        filled in (``--lr 0.01`` is the same as no ``--lr`` for AdamW), and is named with that value;
        ``default_rank`` is what no ``--rank`` gives this model (the projected weights' rank,
        see :func:`osd.param_groups.default_rank`; None: unknown). The default warmup (10% of
        the run) follows a step budget that ``--allow-change`` lets change."""
        mine = {**dataclasses.asdict(self), **self._resolved(default_rank)}
        theirs = {**saved, **_resolved_saved(saved, default_rank)}
        follows_budget = bool(set(MAY_CHANGE) & set(self.allowed_changes)) and self.warmup_steps is None and saved.get("warmup_steps", 0) is None
        free = {*FREE_ON_RESUME, *self.allowed_changes, *(["warmup_steps"] if follows_budget else [])}
        names = [n for n in mine if n in saved and n not in free]
        return [f"--{n.replace('_', '-')} {theirs[n]} -> {mine[n]}" for n in names if theirs[n] != mine[n]]

    def _resolved(self, default_rank: Any = None) -> dict[str, Any]:
        """The :data:`RESOLVED_ON_RESUME` settings as this run uses them."""
        rank = self.rank if self.rank is not None else default_rank
        return {"lr": self.peak_lr, "rank": rank, "warmup_steps": self.warmup, "total_batch_size": self.total_batch, "tokenizer": self.tokenizer_spec}

    @property
    def peak_lr(self) -> float:
        """The peak learning rate: as set, or the inner rule's default (:data:`osd.optimizer.DEFAULT_LR`)."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer.rpartition("_")[2]]

    @property
    def global_grad_clip(self) -> float:
        """The training loop's clip of the global gradient norm: ``grad_clip``, or 0 (off) with
        ``--layerwise``, which clips per parameter (``max_grad_norm``, :meth:`optimizer_kwargs`)."""
        return 0.0 if self.layerwise else self.grad_clip

    @property
    def total_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.total_batch_size or self.batch_size

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step (one process)."""
        return self.total_batch // self.batch_size

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run: ``steps``, or the token budget divided by tokens per step."""
        if self.tokens is None:
            return self.steps
        return math.ceil(self.tokens / (self.total_batch * self.seq_len))

    @property
    def warmup(self) -> int:
        """Warmup steps: as set, or 10% of the run."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.total_steps // 10)

    @property
    def tokenizer_spec(self) -> str:
        """The tokenizer to load: as set, or bytes for the embedded corpus and t5-base otherwise."""
        if self.tokenizer is not None:
            return self.tokenizer
        return "bytes" if self.data == "embedded" else "t5-base"

    def to_json(self) -> str:
        """The resolved config (derived values included) as JSON."""
        derived = {"peak_lr": self.peak_lr, "total_steps": self.total_steps, "warmup": self.warmup, "accumulation": self.accumulation, "tokenizer_spec": self.tokenizer_spec}
        return json.dumps({**dataclasses.asdict(self), "derived": derived}, indent=2)


def _resolved_saved(saved: dict[str, Any], default_rank: Any = None) -> dict[str, Any]:
    """The :data:`RESOLVED_ON_RESUME` settings of a checkpoint's config ``saved`` as its run
    used them: as set, else its ``derived`` value (``default_rank`` for ``rank``); a default
    without a recorded value stays None."""
    derived = saved.get("derived") if isinstance(saved.get("derived"), dict) else {}
    accumulation, batch_size = derived.get("accumulation"), saved.get("batch_size")
    used = {
        "lr": derived.get("peak_lr"),
        "rank": default_rank,
        "warmup_steps": derived.get("warmup"),
        "total_batch_size": accumulation * batch_size if isinstance(accumulation, int) and isinstance(batch_size, int) else None,
        "tokenizer": derived.get("tokenizer_spec"),
    }
    return {name: used[name] if saved[name] is None else saved[name] for name in RESOLVED_ON_RESUME if name in saved}


# Optimizer keys that have a flag of their own (set them there, not in --optimizer-args).
_OWN_FLAGS = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["optimizer"]} | {"lr", "max_grad_norm"}


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas that are not inside brackets or quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [part for part in parts + [text[start:]] if part.strip()]


def parse_key_values(text: str) -> dict[str, Any]:
    """``"a=1,b=(0.9,0.95),c=left,d.e=0.1"`` -> ``{"a": 1, "b": (0.9, 0.95), "c": "left", "d": {"e": 0.1}}``.

    Values are Python literals where they parse as one (numbers, tuples, None, True), plain
    strings otherwise; ``key.sub=value`` fills the dict ``key``."""
    result: dict[str, Any] = {}
    for part in _split_top_level(text):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected key=value, got {part.strip()!r}")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        outer, _, inner = key.partition(".")
        if inner:
            result.setdefault(outer, {})[inner] = value
        elif key in result:
            raise ValueError(f"key {key!r} given twice")
        else:
            result[key] = value
    return result


def _argument_type(annotation: Any) -> type:
    """``int``, ``float``, ``str`` or ``bool`` from a field's annotation (``X | None`` -> ``X``)."""
    annotation = eval(annotation, vars(typing), vars(types)) if isinstance(annotation, str) else annotation
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return options[0]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per :class:`TrainConfig` field."""
    parser = parser or argparse.ArgumentParser(prog="osd train", description="Pretrain LLaMA with a gradient-subspace optimizer.")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _argument_type(f.type)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            text = f.metadata["help"]
            parser.add_argument(flag, type=kind, default=f.default, help=text if "default:" in text or f.default is None else f"{text} (default: {f.default})")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed arguments (checked)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
