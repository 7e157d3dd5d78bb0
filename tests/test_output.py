"""What a user reads: quiet imports, the banner, plain log lines without a terminal, help texts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from osd.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--model", "nano", "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--eval-interval", "3", "--eval-batches", "1"]


def test_an_osd_command_prints_nothing_on_stderr(tmp_path: Path) -> None:
    """A fresh ``osd train`` (transformers imports torchao here) whose output goes to a pipe:
    stderr stays empty (no torchao / pytree / bitsandbytes notices), stdout starts with the banner."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "osd.cli", "train", *TINY_RUN, "--out-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("model     nano:")
    # galore_torch imports bitsandbytes, which logs about a missing optional package
    done = subprocess.run([sys.executable, "-c", "import osd, galore_torch, torchao"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_real_warnings_still_show() -> None:
    """The filters drop only the known messages: another warning of the same logger gets through."""
    import logging

    import osd  # noqa: F401 (installs the filters)

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("torchao")
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load /x/_C_mxfp8.so: cannot open")
        logger.warning("a real problem")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["a real problem"]


def test_without_a_terminal_the_log_is_plain_lines(tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "run"
    assert main(["train", *TINY_RUN, "--out-dir", str(out_dir), "--log-interval", "2"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err and captured.err == ""
    lines = captured.out.splitlines()
    assert [line.split()[0] for line in lines[:6]] == ["model", "optimizer", "projected", "data", "budget", "output"]
    assert "projected 14 weight matrices (14 at rank 16;" in lines[2]  # nano: 2 layers x 7 matrices, rank 64 // 4
    steps = [line for line in lines if line.startswith("step ") and "/6" in line]
    assert [line.split()[1] for line in steps] == ["2/6", "3/6", "4/6", "6/6"]  # every 2 steps and at evaluations
    assert "val ppl" in steps[1] and "val ppl" in steps[-1]
    assert lines[-2] == f"wrote {out_dir / 'config.json'}, {out_dir / 'metrics.jsonl'}, {out_dir / 'checkpoint.pt'}"
    assert lines[-1].startswith("step 6: validation loss")


def test_quiet_prints_only_the_result(tmp_path: Path, capsys) -> None:
    assert main(["train", *TINY_RUN, "--out-dir", str(tmp_path / "run"), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("step 6: validation loss")


def test_tensorboard_scalars(tmp_path: Path, capsys) -> None:
    pytest.importorskip("tensorboard", reason="--tensorboard needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", *TINY_RUN, "--out-dir", str(tmp_path / "run"), "--tensorboard"]) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == list(range(1, 7))
    assert [e.step for e in events.Scalars("val_ppl")] == [3, 6]


@pytest.mark.parametrize("command", [["train"], ["eval"], ["memory"], ["bench", "convergence"], ["bench", "step"], ["generate"], ["export"]])
def test_help_texts_say_each_default_once_and_plainly(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "``" not in text and "%%" not in text
    assert text.count("(default:") <= text.count("--")


@pytest.mark.parametrize("benchmark", ["step", "convergence"])
def test_real_text_benchmarks_name_shared_and_an_alternative(benchmark: str, tmp_path: Path, capsys) -> None:
    assert main(["bench", benchmark, "--shared", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--shared DIR" in err and ("--random-tokens" in err if benchmark == "step" else "osd train --data" in err)


def test_smoothing_is_a_debiased_moving_average() -> None:
    from osd.plot import smooth

    assert smooth([3.0] * 5, 0.9) == pytest.approx([3.0] * 5)  # no pull toward 0 at the start
    assert smooth([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75])
    assert smooth([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
