"""``osd eval``: perplexity and bits per byte of a trained model on any text.

    osd eval runs/bench/quality/runs/osd/lr0.01/seed0 --data ../shared/data/wikitext2_valid.txt
    osd eval RUN_DIR          # no --data: the run's own validation set, exactly as the run evaluated it

The text's documents are tokenized with the run's tokenizer (or ``--tokenizer``), joined
into one stream with EOS after each, as ``osd train`` packs them, and cut into rows of the
run's ``seq_len`` (the last row may be shorter); position ``i`` of a row predicts token
``i + 1``. Per-token losses are summed in float64:

    loss = sum of token losses / predicted tokens         (nats per token)
    perplexity = exp(loss)
    bits per byte = loss * (tokens / bytes) / ln 2

where ``tokens / bytes`` is the text's whole stream against its UTF-8 bytes, each EOS
counting one byte (the document break it stands for). Unlike perplexity, bits per byte
compares models with different tokenizers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from osd import checkpoint
from osd.data import DataError, DocumentSource, Tokenizer, load_documents, load_tokenizer
from osd.models import build_model, llama_config

__all__ = ["TextScore", "build_parser", "load_trained", "run", "score_stream", "token_stream"]


@dataclass(frozen=True)
class TextScore:
    """The result of :func:`score_stream`: ``loss_sum`` (float64 nats) over ``tokens`` predictions."""

    loss_sum: float
    tokens: int
    tokens_per_byte: float

    @property
    def loss(self) -> float:
        """Mean loss per predicted token (nats)."""
        return self.loss_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.loss * self.tokens_per_byte / math.log(2)


def load_trained(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of an ``osd train`` run (its folder, or a ``checkpoint.pt``) in eval mode,
    and the run's resolved config (``config.json`` as a dict).

    Raises :class:`DataError` when there is no checkpoint to load.
    """
    path = Path(path)
    file = path / "checkpoint.pt" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"no checkpoint at {file}: pass an osd train output folder or its checkpoint.pt")
    saved = checkpoint.load(file)
    config = saved["config"]
    vocab_size = saved["model"]["model.embed_tokens.weight"].shape[0]
    model = build_model(llama_config(config["model"], vocab_size, config["seq_len"], config["model_config"]))
    model.load_state_dict(saved["model"])
    return model.eval(), config


def token_stream(source: DocumentSource, tokenizer: Tokenizer) -> tuple[torch.Tensor, int]:
    """Every document's ids followed by EOS, as one LongTensor, and the text's bytes
    (UTF-8 bytes of the documents plus one per EOS)."""
    texts = list(source.iterate())
    ids = [token for encoded in tokenizer.encode(texts) for token in (*encoded, tokenizer.eos_id)]
    return torch.tensor(ids, dtype=torch.long), sum(len(text.encode("utf-8")) + 1 for text in texts)


@torch.no_grad()
def score_stream(
    model: torch.nn.Module,
    stream: torch.Tensor,
    seq_len: int,
    batch_size: int = 16,
    tokens_per_byte: float = math.nan,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> TextScore:
    """Summed next-token loss of ``model`` over ``stream`` cut into rows of ``seq_len``
    (a last row of at least 2 tokens included), ``batch_size`` rows at a time, in float64."""
    rows = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    rows = [row for row in rows if len(row) > 1]
    model = model.to(device)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for start in tqdm(range(0, len(rows), batch_size), desc="eval", unit="batch", disable=not progress, file=sys.stderr):
        group = rows[start : start + batch_size]
        for width in sorted({len(row) for row in group}):  # the short last row goes alone
            input_ids = torch.stack([row for row in group if len(row) == width]).to(device)
            logits = model(input_ids=input_ids).logits[:, :-1]
            losses = F.cross_entropy(logits.flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
            total += losses.double().sum().cpu()
            count += losses.numel()
    if count == 0:
        raise DataError(f"the text has {len(stream)} tokens: nothing to predict")
    return TextScore(total.item(), count, tokens_per_byte)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="osd eval")
    parser.description = __doc__.split("\n\n")[0].replace("``", "")  # plain text, like every --help
    parser.add_argument("run", metavar="CHECKPOINT_OR_RUN_DIR", help="an osd train output folder or its checkpoint.pt")
    parser.add_argument("--data", help="text to score: a .txt (one document per line), .json/.jsonl/.json.gz, .parquet, or a glob; "
                        "default: the run's own validation set, as the run evaluated it")
    parser.add_argument("--split", choices=("all", "train", "validation"), default="all",
                        help="part of --data to score: all of it (default), or the train/validation split of --val-docs")
    parser.add_argument("--val-docs", type=int, default=100, help="documents held out as validation by --split (default: 100)")
    parser.add_argument("--tokenizer", help="tokenizer spec (default: the run's)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default: 16)")
    parser.add_argument("--max-tokens", type=int, help="score only the first N tokens of the stream")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    """``osd eval``: print loss, perplexity and bits per byte; bad input is one line on stderr, status 2."""
    try:
        model, config = load_trained(args.run)
        tokenizer = load_tokenizer(args.tokenizer or config["derived"]["tokenizer_spec"])
        seq_len, max_tokens = args.seq_len or config["seq_len"], args.max_tokens
        if args.data is None and not config["pack"]:
            raise DataError("the run used --no-pack (padded rows); osd eval packs documents: pass --data to score a text")
        if args.data is None:  # the run's validation batches: the first eval_batches x batch_size rows of its split
            source = load_documents(config["val_data"] or config["data"], "validation", val_docs=config["val_docs"])
            max_tokens = max_tokens or config["eval_batches"] * config["batch_size"] * seq_len
        else:
            source = load_documents(args.data, args.split, val_docs=args.val_docs)
        stream, num_bytes = token_stream(source, tokenizer)
        tokens_per_byte = len(stream) / num_bytes
        if args.data is None:  # the run drops an incomplete last batch
            full = len(stream) // (config["batch_size"] * seq_len) * config["batch_size"] * seq_len
            max_tokens = min(max_tokens, full)
        score = score_stream(model, stream[:max_tokens], seq_len, args.batch_size, tokens_per_byte, args.device)
    except (DataError, ValueError) as error:
        print(f"osd eval: error: {error}", file=sys.stderr)
        return 2
    result = {"data": args.data or f"{source.name}", "tokens": score.tokens, "loss": score.loss, "perplexity": score.perplexity,
              "bits_per_byte": score.bits_per_byte, "tokenizer": tokenizer.name}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['data']}: {score.tokens} tokens, loss {score.loss:.4f} nats/token, perplexity {score.perplexity:.3f}, "
              f"{score.bits_per_byte:.4f} bits per byte")
    return 0
