"""``osd memory``: the estimate is the bytes the real model and optimizer allocate.

A small LLaMA (the ``nano`` preset, vocabulary 1000) takes one real training step with
each configuration; its weights, its optimizer state by kind (8-bit codes included) and
its gradients must equal what :func:`osd.memory_report.estimate` counted on the meta
device. Layer-wise updates must never hold more full gradients than the largest weight's.
"""

from __future__ import annotations

import json

import pytest
import torch

from osd.config import TrainConfig
from osd.memory import state_bytes
from osd.state_layout import is_8bit
from osd.memory_report import estimate, main
from osd.train import build_optimizer, build_training_model, train_step

pytest.importorskip("transformers", reason="the LLaMA model needs `transformers`")

VOCAB = 1000


def config(optimizer: str, layerwise: bool = False, optim_bits: int = 32) -> TrainConfig:
    return TrainConfig(model="nano", optimizer=optimizer, rank=32, layerwise=layerwise, optim_bits=optim_bits, batch_size=2, seq_len=32, grad_clip=0.0, device="cpu")


@pytest.mark.parametrize(
    "optimizer, layerwise, bits",
    [("adamw", False, 32), ("adamw", False, 8), ("galore_adamw", False, 32), ("osd_adamw", False, 8), ("osd_adamw", True, 32), ("golore_lion", True, 8)],
)
def test_estimate_equals_the_allocated_bytes(optimizer: str, layerwise: bool, bits: int) -> None:
    cfg = config(optimizer, layerwise, bits)
    expected = estimate(cfg, VOCAB)

    torch.manual_seed(0)
    model = build_training_model(cfg, VOCAB, torch.device("cpu"))
    params = list(model.parameters())
    alive: list[int] = []
    # Registered before the layer-wise hooks, so each sees the gradients alive as one arrives.
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad.numel() * 4 for q in params if q.grad is not None)))
    opt = build_optimizer(cfg, model)
    ids = torch.randint(VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    if not layerwise:
        model(input_ids=ids, labels=ids).loss.backward()
        assert sum(p.grad.numel() * p.grad.element_size() for p in params) == expected["gradients"]
        opt.step()
    else:
        train_step(model, opt, [{"input_ids": ids, "labels": ids}], 0.0)
        assert max(alive) == expected["gradients"] == max(p.numel() * 4 for p in params)

    assert sum(p.numel() * p.element_size() for p in params) == expected["weights"]
    actual = state_bytes(opt)
    for part in ("moments", "projection", "proj_optimizer"):
        assert actual[part] == expected[part], f"{part}: allocated {actual[part]}, estimated {expected[part]}"
    if bits == 8:
        assert any(is_8bit(k) for s in opt.state.values() for k in s)


def test_subspace_states_are_smaller_and_checkpointing_keeps_fewer_activations() -> None:
    full, osd_8bit = estimate(config("adamw"), VOCAB), estimate(config("osd_adamw", True, 8), VOCAB)
    assert osd_8bit["moments"] < full["moments"] and osd_8bit["gradients"] < full["gradients"]
    checkpointed = estimate(TrainConfig(model="nano", activation_checkpointing=True, batch_size=2, seq_len=32), VOCAB)
    assert checkpointed["activations"] < estimate(TrainConfig(model="nano", batch_size=2, seq_len=32), VOCAB)["activations"]


def test_osd_memory_command_measures_and_draws(tmp_path, capsys) -> None:
    status = main(["--model", "nano", "--rank", "8", "--seq-len", "32", "--optimizers", "adamw,osd_adamw+layerwise+8bit",
                   "--measure", "--steps", "2", "--out", str(tmp_path), "--plot", str(tmp_path / "memory.png")])
    assert status == 0
    report = json.loads((tmp_path / "memory.json").read_text())
    assert [row["label"] for row in report["rows"]] == ["adamw", "osd_adamw + layer-wise + 8-bit"]
    for row in report["rows"]:
        assert row["measured"]["peak"] > row["estimate"]["weights"], row
    assert (tmp_path / "memory.png").stat().st_size > 10_000
    assert "| osd_adamw + layer-wise + 8-bit |" in capsys.readouterr().out


def test_osd_memory_names_a_bad_option(capsys) -> None:
    assert main(["--optimizers", "osd_adamw+fast"]) == 2
    assert "+fast" in capsys.readouterr().err


def test_activation_checkpointing_trains_the_same() -> None:
    """Recomputing activations in backward changes memory, not the maths."""
    ids = torch.randint(VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for checkpointing in (False, True):
        cfg = TrainConfig(model="nano", optimizer="osd_adamw", rank=32, activation_checkpointing=checkpointing, batch_size=2, seq_len=32, device="cpu")
        torch.manual_seed(0)
        model = build_training_model(cfg, VOCAB, torch.device("cpu"))
        assert model.is_activation_checkpointing == checkpointing
        opt = build_optimizer(cfg, model)
        losses.append([train_step(model, opt, [{"input_ids": ids, "labels": ids}], 1.0) for _ in range(3)])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
