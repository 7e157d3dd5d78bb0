"""The Hugging Face Trainer with our optimizers: a tiny LlamaForCausalLM on real C4 text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate (pip install accelerate)")

from osd.hf import create_trainer_optimizer, target_module_names

STEPS, SAVE_AT = 16, 8


class Rows(torch.utils.data.Dataset):
    """Packed token rows as causal-LM examples (the model shifts the labels itself)."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32100, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def arguments(out_dir: Path, **overrides) -> transformers.TrainingArguments:
    settings = {"max_steps": STEPS, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "weight_decay": 0.01,
                "warmup_steps": 2, "lr_scheduler_type": "cosine", "logging_steps": 1, "save_steps": SAVE_AT,
                "save_strategy": "steps", "report_to": [], "use_cpu": True, "seed": 0, "dataloader_num_workers": 0,
                "optim_target_modules": ["self_attn", "mlp"], "disable_tqdm": True}
    return transformers.TrainingArguments(str(out_dir), **{**settings, **overrides})


def fit(out_dir: Path, data: Rows, resume: str | None = None, **overrides) -> transformers.Trainer:
    model = tiny_llama()
    args = arguments(out_dir, **overrides)
    optimizer = create_trainer_optimizer(model, args, "osd_adamw", rank=8, scale=0.25)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def losses(trainer: transformers.Trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


@pytest.fixture(scope="module")
def data(c4_tokens: torch.Tensor) -> Rows:
    return Rows(c4_tokens[:512])


def test_the_optimizer_follows_the_training_arguments(tmp_path: Path) -> None:
    model = tiny_llama()
    args = arguments(tmp_path, optim_target_modules=r"model\.layers\.\d+\.mlp\.(up|down)_proj", adam_beta2=0.95)
    optimizer = create_trainer_optimizer(model, args, "galore_adamw", rank=4)
    projected, decayed, vectors = optimizer.param_groups
    assert [n.split(".", 3)[-1] for n in projected["param_names"]] == ["mlp.up_proj.weight", "mlp.down_proj.weight"] * 2
    assert projected["rank"] == 4 and projected["lr"] == args.learning_rate and projected["betas"] == (0.9, 0.95)
    assert "model.embed_tokens.weight" in decayed["param_names"] and decayed["weight_decay"] == 0.01
    assert all("norm" in n for n in vectors["param_names"]) and vectors["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        target_module_names(model, ["no_such_module"])
    with pytest.raises(ValueError, match="not a subspace optimizer"):
        create_trainer_optimizer(model, args, "adamw")


def test_trainer_trains_saves_and_resumes_exactly(tmp_path: Path, data: Rows) -> None:
    whole = fit(tmp_path / "whole", data)
    curve = losses(whole)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert sum(curve[s] for s in range(STEPS - 3, STEPS + 1)) / 4 < curve[1] - 1.0, curve

    checkpoint = tmp_path / "whole" / f"checkpoint-{SAVE_AT}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # what the Trainer itself does
    assert any("proj" in state for state in saved["state"].values())

    resumed = fit(tmp_path / "resumed", data, resume=str(checkpoint))
    assert {s: v for s, v in losses(resumed).items() if s > SAVE_AT} == {s: v for s, v in curve.items() if s > SAVE_AT}
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
