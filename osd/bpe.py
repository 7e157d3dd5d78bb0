"""A small byte-level BPE vocabulary, trained with Hugging Face ``tokenizers`` on a training split.

The papers' t5-base vocabulary (32000 entries) makes the embeddings of a CPU-sized LLaMA
hold nearly all its parameters, so the projected matrices, where the optimizers differ,
barely matter. A vocabulary of a few thousand entries fixes that. It is trained on the
training documents only: the held-out split must not leak into the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["EOS", "train_bpe"]

EOS = "</s>"  # ends every document (osd.data.load_tokenizer looks for it)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> Path:
    """Train a byte-level BPE of ``vocab_size`` entries (256 bytes, ``EOS`` and merges) on
    ``texts`` and save it as a ``tokenizers`` JSON at ``path`` (folder created); return ``path``.

    Deterministic for the same texts and size. Raises ``ValueError`` for a size under 258.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes, EOS and one merge), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path
