"""Quickstart: drop an ``osd`` optimizer into your own training loop.

Trains a small ``transformers.LlamaForCausalLM`` with the optimizer you name (``osd_adamw``
= Online Subspace Descent with AdamW inside the subspace; ``galore_*``, ``golore_*`` and
the full-rank ``adamw``, ``lion``, ... work the same way), then prints the held-out
perplexity and the optimizer's state memory. ``osd train`` is the full harness (C4,
checkpoints, metrics); this is the loop you would write yourself.

Offline by default (the docstrings of Python's standard library, byte-level tokens):

    python examples/quickstart.py                      # ~1 minute on 2 CPU cores
    python examples/quickstart.py --optimizer galore_adamw --rank 16 --steps 500
    python examples/quickstart.py --data ../shared/data/c4_train_sample.jsonl \\
        --tokenizer ../shared/tokenizers/t5_tokenizer.json
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

import osd
from osd.data import PackedBatches, load_documents, load_tokenizer, validation_batches
from osd.models import build_model, llama_config
from osd.schedule import warmup_cosine
from osd.train import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", default="osd_adamw", choices=osd.optimizer_names())
    parser.add_argument("--rank", type=int, default=None, help="rank of the subspace (default: a quarter of each weight's smaller side)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: by inner rule)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--data", default="embedded", help="'embedded' or JSON lines with a 'text' field")
    parser.add_argument("--tokenizer", default="bytes", help="'bytes' or a Hugging Face tokenizer .json")
    args = parser.parse_args()
    torch.manual_seed(0)

    # Data: documents packed into rows of seq_len tokens; the last documents are held out.
    tokenizer = load_tokenizer(args.tokenizer)
    batches = PackedBatches(load_documents(args.data, "train"), tokenizer, args.batch_size, args.seq_len)
    held_out = validation_batches(load_documents(args.data, "validation"), tokenizer, args.batch_size, args.seq_len, 8)

    # Model and optimizer: attention and MLP weights train in a rank-`rank` subspace, the rest full-rank.
    model = build_model(llama_config("micro", tokenizer.vocab_size, args.seq_len))
    method = args.optimizer.rpartition("_")[0]
    optimizer = osd.create_optimizer(model, args.optimizer, lr=args.lr, **({"rank": args.rank, "update_proj_gap": 50} if method else {}))
    lr = optimizer.param_groups[0]["lr"]
    scheduler = warmup_cosine(optimizer, warmup_steps=args.steps // 10, total_steps=args.steps, min_lr_ratio=0.1)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; {args.optimizer}, lr {lr}")

    for step in (progress := tqdm(range(args.steps))):
        batch = next(batches)
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")

    val_loss, val_ppl = evaluate(model, held_out, torch.device("cpu"))
    print(f"held-out loss {val_loss:.4f}, perplexity {val_ppl:.2f}")
    print("optimizer state bytes:", osd.state_bytes(optimizer))


if __name__ == "__main__":
    main()
