"""``osd bench quality`` and ``osd eval``: the protocol's parts, and its quick variant on real C4 text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from osd.bench import quality
from osd.bpe import EOS, train_bpe
from osd.cli import main as osd_main
from osd.data import DocumentSource, load_tokenizer
from osd.perplexity import score_stream, token_stream

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")


def test_unigram_entropy_is_the_entropy_of_the_predicted_tokens() -> None:
    # Predicted tokens (labels[:, 1:]): 0, 0, 1, 2 and 1, 1, 1 (the first column and -100 are not predicted).
    batches = [{"labels": torch.tensor([[5, 0, 0, 1, 2]])}, {"labels": torch.tensor([[7, 1, 1, 1, -100]])}]
    p = torch.tensor([2, 4, 1], dtype=torch.float64) / 7
    assert quality.unigram_entropy(batches, vocab_size=8) == pytest.approx(-(p * p.log()).sum().item(), rel=1e-12)


def test_tune_grows_the_grid_past_an_edge_and_stops_at_the_limit() -> None:
    calls: list[float] = []

    def score(lr: float) -> float:  # a valley at lr = 3e-4, below the grid
        calls.append(lr)
        return (math.log(lr) - math.log(3e-4)) ** 2

    best, scores = quality.tune([1e-2, 1e-3, 3e-3], score, extend=2)
    assert best == pytest.approx(1e-3 / 3)  # 1e-3 / 9 was tried too and is worse
    assert len(scores) == 5 and len(calls) == 5  # every value scored once
    best, scores = quality.tune([1e-3, 3e-3, 1e-2], score, extend=0)
    assert best == 1e-3 and len(scores) == 3
    best, scores = quality.tune([1e-4, 3e-4, 1e-3], score, extend=2)  # inside: no extension
    assert best == 3e-4 and len(scores) == 3


def test_bpe_has_the_asked_size_an_eos_and_round_trips(tmp_path: Path) -> None:
    texts = ["The cat sat on the mat.", "Ünïcödé and ascii, the same bytes.", "the the the cat cat mat"] * 20
    path = train_bpe(texts, 300, tmp_path / "bpe.json")
    tokenizer = load_tokenizer(str(path))
    assert 257 < tokenizer.vocab_size <= 300 and tokenizer.eos_id == tokenizer.pad_id  # a tiny corpus runs out of merges
    import tokenizers

    backend = tokenizers.Tokenizer.from_file(str(path))
    assert backend.id_to_token(tokenizer.eos_id) == EOS
    for text in texts[:2]:
        assert backend.decode(tokenizer.encode([text])[0]) == text
    assert len(tokenizer.encode(["the cat"])[0]) < len("the cat".encode())  # merges were learned
    with pytest.raises(ValueError, match="at least 258"):
        train_bpe(texts, 100, tmp_path / "small.json")


def test_score_stream_sums_every_row_in_float64_with_the_short_last_row() -> None:
    config = transformers.LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=8)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    stream = torch.randint(0, 11, (10,))
    score = score_stream(model, stream, seq_len=4, batch_size=2, tokens_per_byte=0.5, progress=False)
    expected, count = 0.0, 0
    for row in (stream[0:4], stream[4:8], stream[8:10]):  # the last row has 2 tokens: 1 prediction
        with torch.no_grad():
            logits = model(input_ids=row[None]).logits[0, :-1]
        expected += torch.nn.functional.cross_entropy(logits.double(), row[1:], reduction="sum").item()
        count += len(row) - 1
    assert score.tokens == count == 7
    assert score.loss_sum == pytest.approx(expected, rel=1e-6)
    assert score.bits_per_byte == pytest.approx(expected / 7 * 0.5 / math.log(2), rel=1e-6)


def test_token_stream_counts_one_byte_per_document_break() -> None:
    tokenizer = load_tokenizer("bytes")
    stream, num_bytes = token_stream(DocumentSource.from_texts(["ab", "é"]), tokenizer)
    assert stream.tolist() == [97, 98, 256, 0xC3, 0xA9, 256] and num_bytes == 6


def test_eval_reports_a_missing_checkpoint_in_one_line(tmp_path: Path, capsys) -> None:
    assert osd_main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("osd eval: error: no checkpoint at") and err.count("\n") == 1


def _eval(argv: list[str], capsys) -> dict:
    assert osd_main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_quick_protocol_learns_more_than_unigrams_and_osd_eval_reproduces_it(tmp_path: Path, shared_dir: Path, capsys) -> None:
    out = tmp_path / "quality"
    argv = ["--quick", "--methods", "adamw", "galore", "--shared", str(shared_dir), "--out", str(out)]
    assert osd_main(["bench", "quality", *argv, "--max-minutes", "0"]) == quality.UNFINISHED  # prepares, then pauses
    assert (out / "tokenizer.json").is_file() and not list(out.glob("runs/*/*/seed0/result.json"))
    assert osd_main(["bench", "quality", *argv]) == 0
    payload = json.loads((out / "quality.json").read_text())
    derived, results = payload["config"]["derived"], payload["results"]
    entropy, untrained = derived["unigram_entropy"], derived["untrained_loss"]
    assert derived["projected_parameters"] > derived["parameters"] / 2  # the regime where the optimizers differ
    assert load_tokenizer(derived["tokenizer"]).vocab_size == 512
    assert derived["tokens"] >= 0.1 * derived["train_tokens"] and 4.0 < entropy < untrained
    adamw, galore = results["methods"]["adamw"], results["methods"]["galore"]
    assert len(adamw["lr_grid"]) == 3 and len(galore["lr_grid"]) == 3
    assert [r["seed"] for r in adamw["runs"]] == [0, 1] and adamw["runs"][0]["val_loss"] != adamw["runs"][1]["val_loss"]
    # Substance: the trained models beat the unigram entropy; tuned AdamW is far below the untrained model.
    assert min(adamw["val_loss_max"], galore["val_loss_max"]) < entropy
    assert adamw["val_loss_max"] < untrained - 0.75
    assert galore["optimizer_state_bytes"] < adamw["optimizer_state_bytes"]
    markdown = (out / "quality.md").read_text()
    assert f"Unigram entropy of the validation tokens: {entropy:.4f}" in markdown
    assert "adamw < galore" in markdown or "galore < adamw" in markdown
    assert (out / "quality.png").stat().st_size > 0

    # Relaunching trains nothing: every run is read back.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/seed*/result.json")}
    assert osd_main(["bench", "quality", *argv]) == 0
    # The method list is not a shared setting (a benchmark can take more methods later); the rest is.
    assert osd_main(["bench", "quality", "--quick", "--methods", "adamw", *argv[4:]]) == 0
    assert osd_main(["bench", "quality", *argv, "--seeds", "0"]) == 2
    assert "holds a benchmark with other settings" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/seed*/result.json")} == stamps

    # osd eval: on the run's own validation set it reproduces the run's final loss; it also scores unseen text.
    run = adamw["runs"][0]
    own = _eval([run["run_dir"]], capsys)
    assert own["tokens"] == derived["val_tokens"] and own["loss"] == pytest.approx(run["val_loss"], rel=1e-5)
    assert own["perplexity"] == pytest.approx(run["val_ppl"], rel=1e-5)
    wiki = _eval([run["run_dir"], "--data", str(shared_dir / "data" / "wikitext2_valid.txt"), "--max-tokens", "20000"], capsys)
    assert wiki["tokens"] > 19_000 and wiki["loss"] < math.log(512)  # better than uniform on text it never saw
    assert 0.5 < wiki["bits_per_byte"] < 8
