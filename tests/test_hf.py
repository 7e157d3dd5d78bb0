"""The Hugging Face Trainer with our optimizers (a tiny LlamaForCausalLM on real C4 text), and
which weights get projected in transformers' models beyond LLaMA (GPT-2's ``Conv1D``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate (pip install accelerate)")

import osd
from osd.hf import create_trainer_optimizer, optimizer_cls_and_kwargs, parse_optim_args
from osd.param_groups import describe, projected_modules
from osd.state_layout import is_projected

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
                "optim_target_modules": "blocks", "optim_args": "rank=8, scale=0.25", "disable_tqdm": True}
    return transformers.TrainingArguments(str(out_dir), **{**settings, **overrides})


def fit(out_dir: Path, data: Rows, resume: str | None = None, **overrides) -> transformers.Trainer:
    """The README's recipe: the Trainer builds the optimizer from ``optimizer_cls_and_kwargs``."""
    args = arguments(out_dir, **overrides)
    trainer = transformers.Trainer(model=tiny_llama(), args=args, train_dataset=data,
                                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, "osd_adamw"))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def losses(trainer: transformers.Trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


@pytest.fixture(scope="module")
def data(c4_tokens: torch.Tensor) -> Rows:
    return Rows(c4_tokens[:512])


@pytest.mark.parametrize(("name", "options"), [("osd_adamw", {"optim_bits": 8}), ("galore_muon", {})], ids=["8-bit", "muon"])
def test_the_trainer_route_groups_weights_as_create_optimizer_does(name: str, options: dict, tmp_path: Path) -> None:
    """One group builder: under 8-bit states the embeddings keep float32 states, and Muon's
    vectors and embeddings step with AdamW, whichever factory builds the optimizer."""
    model = tiny_llama()
    policy = lambda groups: {n: (g["rank"], g["optim_bits"], g["rule"]) for g in groups for n in g["param_names"]}  # noqa: E731
    trainer_route = create_trainer_optimizer(model, arguments(tmp_path, optim_args="rank=8"), name, **options)
    assert policy(trainer_route.param_groups) == policy(osd.create_optimizer(model, name, rank=8, **options).param_groups)
    assert policy(trainer_route.param_groups)["model.embed_tokens.weight"] == (None, 32, "adamw")


def test_the_optimizer_follows_the_training_arguments(tmp_path: Path) -> None:
    model = tiny_llama()
    args = arguments(tmp_path, optim_target_modules=r"model\.layers\.\d+\.mlp\.(up|down)_proj", adam_beta2=0.95,
                     optim_args="rank=4, update_proj_gap=50, proj_type=std")
    optimizer = create_trainer_optimizer(model, args, "galore_adamw", scale=0.5)
    projected, decayed, vectors = optimizer.param_groups
    assert [n.split(".", 3)[-1] for n in projected["param_names"]] == ["mlp.up_proj.weight", "mlp.down_proj.weight"] * 2
    assert projected["rank"] == 4 and projected["lr"] == args.learning_rate and projected["betas"] == (0.9, 0.95)
    assert projected["update_proj_gap"] == 50 and projected["scale"] == 0.5
    assert "model.embed_tokens.weight" in decayed["param_names"] and decayed["weight_decay"] == 0.01
    assert all("norm" in n for n in vectors["param_names"]) and vectors["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="selects no linear module"):
        projected_modules(model, ["no_such_module"])
    with pytest.raises(ValueError, match="not a subspace optimizer"):
        optimizer_cls_and_kwargs(args, "adamw")
    assert parse_optim_args("rank=8, scale=0.25, proj_type=std, max_lr=None") == {"rank": 8, "scale": 0.25, "proj_type": "std", "max_lr": None}
    with pytest.raises(ValueError, match="expected key=value"):
        parse_optim_args("rank")


def test_trainer_trains_saves_and_resumes_exactly(tmp_path: Path, data: Rows) -> None:
    whole = fit(tmp_path / "whole", data)
    curve = losses(whole)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert sum(curve[s] for s in range(STEPS - 3, STEPS + 1)) / 4 < curve[1] - 1.0, curve

    checkpoint = tmp_path / "whole" / f"checkpoint-{SAVE_AT}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # what the Trainer itself does
    assert any(is_projected(state) for state in saved["state"].values())

    resumed = fit(tmp_path / "resumed", data, resume=str(checkpoint))
    assert {s: v for s, v in losses(resumed).items() if s > SAVE_AT} == {s: v for s, v in curve.items() if s > SAVE_AT}
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_ready_made_optimizer_route_still_works(tmp_path: Path, data: Rows) -> None:
    model = tiny_llama()
    args = arguments(tmp_path, max_steps=2, save_strategy="no")
    optimizer = create_trainer_optimizer(model, args, "galore_adamw")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train()
    assert trainer.optimizer.optimizer is optimizer and all(optimizer.state[p]["step"] == 2 for p in model.parameters())


def tiny_gpt2() -> torch.nn.Module:
    """A GPT-2 built from a config (no hub): Conv1D weights, modules named ``attn`` and ``mlp``, tied head."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_blocks_are_projected_conv1d_included() -> None:
    model = tiny_gpt2()
    groups = osd.param_groups(model)  # "blocks", rank a quarter of each weight's smaller side
    projected = {name: group["rank"] for group in groups if "rank" in group for name, _ in group["params"]}
    expected = [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert sorted(projected) == sorted(expected)
    assert set(projected.values()) == {8}  # 32 // 4: every weight's smaller side is n_embd = 32
    full = [name for name, _ in groups[-1]["params"]]
    assert "transformer.wte.weight" in full and "transformer.wpe.weight" in full and "transformer.h.0.attn.c_attn.bias" in full
    assert describe(groups).startswith("projected 8 weight matrices (8 at rank 8;")
    # the same names, as HF's optim_target_modules spells them: a list of substrings, or one regex
    assert osd.param_groups(model, 4, ["attn", "mlp"])[0]["params"] == osd.param_groups(model, 4)[0]["params"]
    assert list(projected_modules(model, r"transformer\.h\.\d+\.attn\.c_attn")) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]

    # Conv1D (y = x W, W is in x out) trains like an nn.Linear holding W^T: the same update
    conv = model.transformer.h[0].mlp.c_fc  # weight 32 x 128
    twin = torch.nn.Linear(32, 128)
    with torch.no_grad():
        twin.weight.copy_(conv.weight.T)
        twin.bias.copy_(conv.bias)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    # (GaLore with one SVD: P D is invariant to the signs of P's columns. A second SVD may flip signs
    # with the memory layout, and then the moments, not rotated, differ; OSD's P takes an Adam step on
    # the round-off gradient of its first step, which differs between layouts, until issue 10's fix.)
    opts = [osd.GaLoreAdamW([{"params": [m.weight], "rank": 8}]) for m in (conv, twin)]
    w0 = [conv.weight.detach().clone(), twin.weight.detach().clone()]
    for _ in range(3):
        for module, opt in zip((conv, twin), opts):
            opt.zero_grad()
            module(x).square().mean().backward()
            opt.step()
    torch.testing.assert_close(conv.weight - w0[0], (twin.weight - w0[1]).T, rtol=1e-4, atol=1e-6)
    assert (conv.weight - w0[0]).abs().max() > 1e-3
