"""``osd train`` end to end on real C4 text with the real t5 tokenizer (from ../shared)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from osd.config import TrainConfig
from osd.data import PackedBatches, load_documents, load_tokenizer
from osd.models import build_model, llama_config
from osd.train import evaluate, main, train

pytest.importorskip("transformers")


@pytest.fixture()
def c4_config(shared_dir: Path, tmp_path: Path):
    def make(**overrides) -> TrainConfig:
        settings = dict(
            model="nano", optimizer="osd_adamw", rank=8, update_proj_gap=5, lr=1e-2, steps=12, batch_size=4,
            seq_len=32, data=str(shared_dir / "data" / "c4_train_sample.jsonl"), val_docs=20,
            tokenizer=str(shared_dir / "tokenizers" / "t5_tokenizer.json"), eval_interval=6, eval_batches=2,
            out_dir=str(tmp_path / "run"), progress=False,
        )
        return TrainConfig(**{**settings, **overrides})

    return make


def metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("optimizer", ["adamw", "galore_adamw", "osd_adamw"])
def test_tiny_llama_trains_on_c4_and_the_loss_falls(c4_config, optimizer: str) -> None:
    config = c4_config(optimizer=optimizer, steps=24, eval_interval=24, total_batch_size=8)
    final = train(config)
    records = metrics(config.out_dir)
    assert [r["step"] for r in records] == list(range(1, 25))
    assert records[-1]["tokens"] == 24 * 8 * 32
    first, last = records[0]["train_loss"], sum(r["train_loss"] for r in records[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert final["val_ppl"] == pytest.approx(math.exp(final["val_loss"])) and final["val_ppl"] < math.exp(first)
    assert json.loads((Path(config.out_dir) / "config.json").read_text())["derived"]["accumulation"] == 2


def test_resume_after_step_k_reproduces_the_uninterrupted_run(c4_config, tmp_path: Path) -> None:
    full = c4_config(out_dir=str(tmp_path / "full"), total_batch_size=8)
    train(full)
    split = c4_config(out_dir=str(tmp_path / "split"), total_batch_size=8, stop_at_step=7)
    train(split)
    assert len(metrics(split.out_dir)) == 7
    train(c4_config(out_dir=str(tmp_path / "split"), total_batch_size=8, resume=True))
    timing = ("tokens_per_s", "peak_memory_bytes")
    untimed = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records]  # noqa: E731
    assert untimed(metrics(split.out_dir)) == untimed(metrics(full.out_dir))  # losses equal to the last bit
    full_model = torch.load(Path(full.out_dir) / "checkpoint.pt", weights_only=True)["model"]
    split_model = torch.load(Path(split.out_dir) / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(full_model[k], split_model[k]) for k in full_model)


def test_perplexity_is_per_token_not_per_batch(shared_dir: Path) -> None:
    """Padded (unpacked) batches of C4 documents hold different numbers of tokens, so the
    per-token mean (the right one) and the mean of per-batch means differ."""
    tokenizer = load_tokenizer(str(shared_dir / "tokenizers" / "t5_tokenizer.json"))
    docs = load_documents(str(shared_dir / "data" / "c4_train_sample.jsonl"), "validation", val_docs=12)
    stream = PackedBatches(docs, tokenizer, 2, 512, pack=False)
    batches = [next(stream) for _ in range(4)]
    torch.manual_seed(0)
    model = build_model(llama_config("nano", tokenizer.vocab_size, 512))
    total, count, per_batch = 0.0, 0, []
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            targets = batch["labels"][:, 1:]
            real = targets != -100
            token_losses = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[real]
            total, count = total + token_losses.sum().item(), count + int(real.sum())
            per_batch.append(token_losses.mean().item())
    loss, ppl = evaluate(model, batches, torch.device("cpu"))
    assert loss == pytest.approx(total / count, rel=1e-6) and ppl == pytest.approx(math.exp(total / count), rel=1e-6)
    assert abs(sum(per_batch) / len(per_batch) - total / count) > 1e-4  # the two means really differ here


def test_packing_yields_no_padding(shared_dir: Path) -> None:
    tokenizer = load_tokenizer(str(shared_dir / "tokenizers" / "t5_tokenizer.json"))
    batches = PackedBatches(load_documents(str(shared_dir / "data" / "c4_train_sample.jsonl"), "train"), tokenizer, 4, 64)
    for _ in range(5):
        batch = next(batches)
        assert "attention_mask" not in batch and (batch["labels"] != -100).all()
        assert (batch["input_ids"] == tokenizer.pad_id).sum() <= (batch["input_ids"] == tokenizer.eos_id).sum()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "/nonexistent/c4.jsonl", "--tokenizer", "bytes"], "/nonexistent/c4.jsonl"),
        (["--model", "13b"], "unknown model preset '13b'"),
        (["--optimizer", "galore_adam"], "unknown optimizer 'galore_adam'"),
        (["--tokenizer", "/nonexistent/tok.json"], "/nonexistent/tok.json"),
        (["--data", "C4", "--tokenizer", "bytes", "--val-docs", "1", "--batch-size", "64"], "fewer than one batch"),
    ],
)
def test_bad_input_is_one_line_without_a_traceback(args, message, shared_dir: Path, tmp_path: Path, capsys) -> None:
    args = [str(shared_dir / "data" / "c4_train_sample.jsonl") if a == "C4" else a for a in args]
    assert main(["--steps", "1", "--out-dir", str(tmp_path), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_shard_without_text_field_and_empty_corpus(tmp_path: Path, capsys) -> None:
    shard = tmp_path / "shard.jsonl"
    shard.write_text('{"content": "a"}\n{"content": "b"}\n')
    assert main(["--data", str(shard), "--tokenizer", "bytes", "--out-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "text" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    assert main(["--data", str(empty), "--tokenizer", "bytes", "--out-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "empty" in capsys.readouterr().err.lower()
