"""A trained run in Hugging Face format: ``from_pretrained`` gives the same model and tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from osd.cli import main  # noqa: E402
from osd.data import load_tokenizer  # noqa: E402
from osd.export import hf_tokenizer, load_run  # noqa: E402
from osd.generate import generate, load_for_generation  # noqa: E402

TINY_RUN = ["--model", "nano", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--quiet"]


def test_export_round_trip_gives_the_same_logits_and_tokens(tmp_path: Path, capsys) -> None:
    run_dir, out_dir = tmp_path / "run", tmp_path / "hf"
    assert main(["train", *TINY_RUN, "--out-dir", str(run_dir)]) == 0
    assert main(["export", str(run_dir), str(out_dir)]) == 0
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in out_dir.iterdir()}

    trained, _ = load_run(run_dir)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in saved.items())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    text = "Return the lowest index in S where substring sub is found.\n  é ✓"
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == load_tokenizer("bytes").encode([text])[0]
    assert tokenizer.decode(ids[0]) == text and tokenizer.eos_token_id == 256
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits, rtol=0, atol=0)

    capsys.readouterr()
    assert main(["generate", str(out_dir), "--prompt", "def", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    from_export = capsys.readouterr().out
    model, tok = load_for_generation(run_dir)
    assert from_export.rstrip("\n") == generate(model, tok, "def", 8, temperature=0.0)
    assert from_export.startswith("def") and len(from_export.rstrip("\n")) > len("def")


def test_a_tokenizers_json_exports_to_the_same_ids(shared_dir: Path) -> None:
    spec = str(shared_dir / "tokenizers" / "t5_tokenizer.json")
    ours, exported = load_tokenizer(spec), hf_tokenizer(spec)
    texts = ["The quick brown fox, 1998.", "Ünïcödé and\nnew lines"]
    assert [exported(t, add_special_tokens=False)["input_ids"] for t in texts] == ours.encode(texts)
    assert (exported.eos_token_id, exported.pad_token_id) == (ours.eos_id, ours.pad_id)


def test_export_names_a_missing_run(tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "hf")]) == 2
    assert "osd train output directory" in capsys.readouterr().err
