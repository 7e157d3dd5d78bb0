"""``osd export``: an ``osd train`` run as a Hugging Face model directory, and back.

``export(run_dir, out_dir)`` writes ``model.safetensors`` and ``config.json``
(``save_pretrained``), ``generation_config.json`` and the tokenizer the run trained with, so

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)

give the trained model (the same logits as in training) and its tokenizer. Tokenizers: a
``tokenizers`` ``.json`` file becomes a ``PreTrainedTokenizerFast``; a hub name or directory
is saved as ``AutoTokenizer`` loads it; the byte-level one (``bytes``: ids 0-255 are the UTF-8
bytes, 256 is EOS) is written as an equivalent ``tokenizers`` byte-level BPE with no merges.
A SentencePiece ``.model`` is not converted (the model is still exported; say so).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from osd import checkpoint
from osd.models import build_model, llama_config

__all__ = ["load_run", "hf_tokenizer", "export", "build_parser", "run"]


def load_run(run_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained ``LlamaForCausalLM`` of ``run_dir`` (``config.json`` + ``checkpoint.pt``) in eval mode, and its config."""
    run_dir = Path(run_dir)
    for name in ("config.json", "checkpoint.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found: is {run_dir} an osd train output directory?")
    config = json.loads((run_dir / "config.json").read_text())
    saved = checkpoint.load(run_dir / "checkpoint.pt")["model"]
    vocab_size = saved["model.embed_tokens.weight"].shape[0]
    model = build_model(llama_config(config["model"], vocab_size, config["seq_len"], config.get("model_config")))
    model.load_state_dict(saved)
    return model.eval(), config


def _byte_tokenizer() -> Any:
    """osd's byte-level tokenizer (ids 0-255 = UTF-8 bytes, 256 = ``</s>``) as a ``tokenizers`` BPE without merges."""
    import tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab["</s>"] = 256
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.add_special_tokens(["</s>"])
    return backend


def hf_tokenizer(spec: str) -> Any | None:
    """A ``transformers`` tokenizer equal to ``osd.data.load_tokenizer(spec)``, or None for a SentencePiece ``.model``."""
    import transformers

    if spec.endswith(".model"):
        return None
    if spec == "bytes":
        return transformers.PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer(), eos_token="</s>", pad_token="</s>")
    if spec.endswith(".json"):
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=spec)
        eos = next(t for t in ("</s>", "<|endoftext|>", "<eos>") if tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id)
        pad = "<pad>" if "<pad>" in tokenizer.get_vocab() else eos
        tokenizer.add_special_tokens({"eos_token": eos, "pad_token": pad})
        return tokenizer
    return transformers.AutoTokenizer.from_pretrained(spec)


def export(run_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Write ``run_dir``'s model and tokenizer to ``out_dir`` in Hugging Face format; the files written."""
    model, config = load_run(run_dir)
    tokenizer = hf_tokenizer(config["derived"]["tokenizer_spec"])
    if tokenizer is not None:
        model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.config.bos_token_id = model.generation_config.bos_token_id = None
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return sorted(path.name for path in out_dir.iterdir())


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="osd export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="osd train output directory (config.json, checkpoint.pt)")
    parser.add_argument("out_dir", help="directory to write (model.safetensors, config.json, tokenizer)")
    return parser


def run(args: argparse.Namespace) -> int:
    """``osd export`` from parsed arguments; a missing run is one line on stderr, status 2."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars: the command prints what it did
    try:
        files = export(args.run_dir, args.out_dir)
    except FileNotFoundError as error:
        print(f"osd export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}: {', '.join(files)}")
    if "tokenizer.json" not in files and "tokenizer_config.json" not in files:
        print("no tokenizer exported: a SentencePiece .model is not converted; save it with transformers yourself")
    return 0
