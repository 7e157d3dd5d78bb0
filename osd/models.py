"""LLaMA model presets: the papers' shapes, and smaller ones a 2-core CPU can train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["PRESETS", "llama_config", "build_model"]

# hidden, intermediate, layers, heads. The papers' sizes (GaLore / OSD / GoLore, t5-base
# vocabulary, seq 256) and CPU-sized ones for tests and benchmarks here.
PRESETS: dict[str, dict[str, int]] = {
    "nano": {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4},
    "micro": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4},
    "cpu": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4},
    "60m": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8},
    "130m": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12},
    "350m": {"hidden_size": 1024, "intermediate_size": 2736, "num_hidden_layers": 24, "num_attention_heads": 16},
    "1b": {"hidden_size": 2048, "intermediate_size": 5461, "num_hidden_layers": 24, "num_attention_heads": 32},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
}

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
LEGACY_KEYS = frozenset({"rope_theta", "rope_scaling", "torch_dtype"})  # older config.json names transformers still maps


def llama_config(preset: str | None, vocab_size: int, max_seq_len: int, config_path: str | None = None):
    """A ``transformers.LlamaConfig`` from a preset name or a JSON file of LlamaConfig fields.

    ``vocab_size`` and ``max_position_embeddings`` follow the tokenizer and the sequence
    length. Word embeddings are untied, RMSNorm eps 1e-6, as in the papers' configs.
    Raises ``ValueError`` (one line) naming an unknown preset, an unreadable config file, an
    unknown or missing field, or an invalid shape (a hidden size not divisible by the heads).
    """
    from transformers import LlamaConfig

    if config_path is not None:
        fields = _config_file(config_path)
    elif preset in PRESETS:
        fields = dict(PRESETS[preset])
    else:
        raise ValueError(f"unknown model preset {preset!r}; known presets: {list(PRESETS)}")
    fields.setdefault("rms_norm_eps", 1e-6)
    fields.setdefault("tie_word_embeddings", False)
    fields.update(vocab_size=vocab_size, max_position_embeddings=max(max_seq_len, fields.get("max_position_embeddings", 0)))
    try:
        return LlamaConfig(**fields)
    except Exception as error:  # transformers' strict-dataclass validators raise their own error types
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = lines[-1].split("Error: ", 1)[-1] if lines else type(error).__name__
        raise ValueError(f"invalid model config{f' {config_path}' if config_path else ''}: {reason}") from None


def _config_file(path: str) -> dict[str, Any]:
    """The LlamaConfig fields of a JSON file, refusing a file that is not a JSON object, leaves
    out a shape (LlamaConfig would silently default it to LLaMA-7B's) or has a key LlamaConfig
    does not know (a typo would be ignored)."""
    from transformers import LlamaConfig

    try:
        fields = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read model config {path}: {error}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"model config {path} holds a JSON {type(fields).__name__}, not an object of LlamaConfig fields")
    missing = [key for key in SHAPE_KEYS if key not in fields]
    if missing:
        raise ValueError(f"model config {path} does not set {', '.join(missing)} (LlamaConfig would default to LLaMA-7B's)")
    known = set(LlamaConfig.__dataclass_fields__) | set(LlamaConfig().to_dict()) | LEGACY_KEYS
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"model config {path} has unknown LlamaConfig field(s) {', '.join(map(repr, unknown))} (a typo?)")
    return fields


def build_model(config) -> torch.nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` in float32 (seed the RNG before calling)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(config)
