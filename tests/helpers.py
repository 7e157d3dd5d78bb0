"""Small shared helpers for the tests: seeded gradient streams and relative errors."""

from __future__ import annotations

import torch


def gradient_stream(shape: tuple[int, ...], steps: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """``steps`` seeded gradients of ``shape``: a fixed low-rank signal plus fresh noise."""
    gen = torch.Generator().manual_seed(seed)
    if len(shape) != 2:
        return [torch.randn(*shape, generator=gen, dtype=dtype) for _ in range(steps)]
    m, n = shape
    k = max(1, min(m, n) // 4)
    left = torch.randn(m, k, generator=gen, dtype=dtype)
    right = torch.randn(k, n, generator=gen, dtype=dtype)
    signal = left @ right / k**0.5
    return [signal + 0.5 * torch.randn(m, n, generator=gen, dtype=dtype) for _ in range(steps)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor, origin: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected - origin||``: the error relative to how far the
    reference moved, so that a large weight cannot hide a wrong update."""
    return ((actual - expected).norm() / (expected - origin).norm()).item()


T5_VOCAB = 32100  # t5-base: 32000 sentencepiece pieces + 100 extra ids


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, tie: bool = True) -> torch.nn.Module:
    """A seeded ``LlamaForCausalLM`` for the t5 vocabulary, small enough for CPU tests."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=T5_VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 43 // 16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=tie,  # tied: one 32100 x hidden matrix, the vocabulary dominates the cost
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)
