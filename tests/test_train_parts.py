"""The trainer's parts that know nothing of data: schedule, checkpoints, config, presets."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from osd import checkpoint
from osd.config import ConfigError, TrainConfig, build_parser, config_from_args
from osd.models import PRESETS, llama_config
from osd.schedule import warmup_cosine, warmup_cosine_factor


def test_warmup_then_cosine_to_the_floor() -> None:
    factors = [warmup_cosine_factor(s, 10, 100, 0.1) for s in range(120)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.1 + 0.9 * 0.5)
    assert factors[100] == pytest.approx(0.1) and factors[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = warmup_cosine(opt, 10, 100, 0.1)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * f for f in factors[:12]])


def test_atomic_save_survives_a_kill_during_the_write(tmp_path, monkeypatch) -> None:
    path = tmp_path / "checkpoint.pt"
    checkpoint.atomic_save({"step": 1, "w": torch.ones(3)}, path)

    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(10)  # half a file on disk, then the process "dies"
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    saved = checkpoint.load(path)
    assert saved["step"] == 1 and torch.equal(saved["w"], torch.ones(3))
    with pytest.raises(Exception):
        torch.load(str(path) + ".tmp", weights_only=True)  # the torn write stayed aside
    checkpoint.atomic_save({"step": 3}, path)
    assert checkpoint.load(path)["step"] == 3 and not os.path.exists(str(path) + ".tmp")


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    state = checkpoint.rng_state()
    checkpoint.atomic_save(state, tmp_path / "rng.pt")
    expected = torch.rand(3), random.random()
    torch.manual_seed(123)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt"))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"model": "13b"}, "unknown model preset '13b'"),
        ({"optimizer": "osd_adam"}, "unknown optimizer 'osd_adam'"),
        ({"rank": 0}, "--rank must be > 0"),
        ({"lr": -1.0}, "--lr must be > 0"),
        ({"total_batch_size": 12, "batch_size": 8}, "must be a positive multiple of --batch-size"),
        ({"min_lr_ratio": 1.5}, r"--min-lr-ratio must be in \[0, 1\]"),
        ({"tokens": 10}, "less than one step"),
    ],
)
def test_bad_settings_are_named(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**overrides)


def test_command_line_maps_to_config_and_derived_values() -> None:
    args = build_parser().parse_args(
        ["--model", "60m", "--optimizer", "galore_adamw", "--batch-size", "4", "--total-batch-size", "16",
         "--seq-len", "256", "--tokens", "1000000", "--no-pack", "--data", "c4"]
    )
    config = config_from_args(args)
    assert config.accumulation == 4 and config.pack is False and config.tokenizer_spec == "t5-base"
    assert config.total_steps == math.ceil(1_000_000 / (16 * 256)) and config.warmup == config.total_steps // 10


def test_presets_match_the_papers_shapes() -> None:
    config = llama_config("1b", vocab_size=32000, max_seq_len=256)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads) == (2048, 5461, 24, 32)
    assert PRESETS["60m"] == {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8}
    with pytest.raises(ValueError, match="unknown model preset"):
        llama_config("2b", 32000, 256)


def test_osd_plot_draws_several_runs_into_one_png(tmp_path) -> None:
    import json

    from osd.cli import main

    for name, offset in (("adamw", 0.0), ("osd_adamw", 0.3)):
        run = tmp_path / name
        run.mkdir()
        records = [{"step": s, "tokens": 100 * s, "train_loss": 5.0 - 0.1 * s + offset} for s in range(1, 11)]
        records[4]["val_ppl"], records[9]["val_ppl"] = 90.0 + offset, 60.0 + offset
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    output = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "adamw"), str(tmp_path / "osd_adamw"), "-o", str(output)]) == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output.stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "missing"), "-o", str(output)]) == 2
