"""``osd generate``: sample a continuation from a trained model, to judge a run by reading it.

    osd generate runs/latest --prompt "The history of" --max-new-tokens 60

The model is an ``osd train`` output directory or an ``osd export`` one (any Hugging Face
causal LM directory with its tokenizer). Sampling is ``transformers``' ``generate`` with
temperature and top-k, seeded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_for_generation", "generate", "build_parser", "run"]


def load_for_generation(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """Model and ``transformers`` tokenizer from an ``osd train`` run (``checkpoint.pt``) or a Hugging Face directory."""
    path = Path(path)
    if (path / "checkpoint.pt").is_file():
        from osd.export import hf_tokenizer, load_run

        model, config = load_run(path)
        tokenizer = hf_tokenizer(config["derived"]["tokenizer_spec"])
        if tokenizer is None:
            raise ValueError(f"the run's tokenizer {config['derived']['tokenizer_spec']} is a SentencePiece .model, which generate cannot load")
        return model, tokenizer
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is neither an osd train run (checkpoint.pt) nor a Hugging Face model directory (config.json)")
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 60, temperature: float = 0.8,
             top_k: int = 50, seed: int = 0) -> str:
    """The prompt followed by ``max_new_tokens`` sampled tokens (greedy if ``temperature == 0``), decoded."""
    torch.manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k} if temperature > 0 else {"do_sample": False}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="osd generate", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="osd train output directory, or an osd export / Hugging Face model directory")
    parser.add_argument("--prompt", default="The", help="text to continue (default: The)")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="tokens to sample (default: 60)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 for greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    return parser


def run(args: argparse.Namespace) -> int:
    """``osd generate`` from parsed arguments; a bad path is one line on stderr, status 2."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars: the command prints what it did
    try:
        model, tokenizer = load_for_generation(args.model)
    except (FileNotFoundError, ValueError) as error:
        print(f"osd generate: error: {error}", file=sys.stderr)
        return 2
    print(generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed))
    return 0
