"""Shared fixtures: the real text in ``../shared`` (beside the checkout), tokenized and packed.

``../shared`` is not part of the repository (see its README): where it is absent, the tests
that need it are skipped with a message saying so, and everything else still runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
C4_SAMPLE = Path("data") / "c4_train_sample.jsonl"
T5_TOKENIZER = Path("tokenizers") / "t5_tokenizer.json"

C4_DOCS = 200  # the first documents of the sample: ~96k tokens, packed in well under a second
SEQ_LEN = 64


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` relative to the repository root; skips the test where it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(
            f"../shared not found: expected the shared real-text folder at {SHARED_DIR} "
            "(beside the checkout, holding data/c4_train_sample.jsonl and tokenizers/t5_tokenizer.json); "
            "tests on real text are skipped without it"
        )
    return SHARED_DIR


@pytest.fixture(scope="session")
def c4_tokens(shared_dir: Path) -> torch.Tensor:
    """The first ``C4_DOCS`` documents of the C4 sample, t5-base tokenized and packed.

    Documents are concatenated with the EOS id (``</s>``) after each, and the stream is cut
    into rows of ``SEQ_LEN`` tokens (the incomplete tail is dropped): a LongTensor of shape
    ``(num_seqs, SEQ_LEN)``, ~1500 rows. Rows come in document order, so the last rows hold
    the last documents, which callers can hold out.
    """
    tokenizers = pytest.importorskip("tokenizers", reason="the `tokenizers` package is needed to tokenize the C4 sample")
    data_path, tokenizer_path = shared_dir / C4_SAMPLE, shared_dir / T5_TOKENIZER
    for path in (data_path, tokenizer_path):
        if not path.is_file():
            pytest.skip(f"../shared is there but {path} is missing; tests on real text are skipped")

    texts = []
    with data_path.open(encoding="utf-8") as f:
        for line in f:
            if len(texts) == C4_DOCS:
                break
            texts.append(json.loads(line)["text"])

    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    eos_id = tokenizer.token_to_id("</s>")
    assert eos_id is not None, f"{tokenizer_path} has no </s> token"
    stream: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(eos_id)

    num_seqs = len(stream) // SEQ_LEN
    return torch.tensor(stream[: num_seqs * SEQ_LEN], dtype=torch.long).view(num_seqs, SEQ_LEN)
