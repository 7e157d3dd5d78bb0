"""A run never loses data, never lies about what it ran, and every bad input gets one line.

Each case runs ``osd train`` (in-process through :func:`osd.train.main`, or in a subprocess
where a signal is sent) and checks the exit status, that stderr is exactly one line naming
the problem without a traceback, and that nothing was lost: the previous run's files are
byte for byte as they were, and its checkpoint still resumes to the very metrics of an
uninterrupted run. ``docs/troubleshooting.md`` lists every case with what the user sees.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import osd
from osd import checkpoint
from osd.train import main
from osd.state_layout import PROJ, PROJ_PREFIX, is_projected

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
# A nano LLaMA on the embedded corpus (byte tokenizer): a step takes milliseconds.
TINY = ["--model", "nano", "--batch-size", "2", "--seq-len", "16", "--eval-interval", "2", "--eval-batches", "1", "--no-progress"]
STEPS = ["--steps", "4", "--save-interval", "1"]
TIMING = ("tokens_per_s", "peak_memory_bytes")
RUN_FILES = ("checkpoint.pt", "config.json", "metrics.jsonl")


def osd_train(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """Run ``osd train TINY args``; return the exit status and stderr (checked to be one line, no traceback, when non-zero)."""
    capsys.readouterr()
    status = main([*TINY, *args])
    err = capsys.readouterr().err.strip()
    if status != 0:
        assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("osd train: "), err
    return status, err


def metrics(run_dir: Path) -> list[dict]:
    """The metrics of a run without its timings (those differ between runs)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in RUN_FILES if (run_dir / name).is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``full``: 4 uninterrupted steps; ``half``: the same run stopped (with a checkpoint) after step 2."""
    base = tmp_path_factory.mktemp("runs")
    assert main([*TINY, *STEPS, "--out-dir", str(base / "full")]) == 0
    assert main([*TINY, *STEPS, "--save-interval", "0", "--stop-at-step", "2", "--out-dir", str(base / "half")]) == 0
    return {"full": base / "full", "half": base / "half"}


@pytest.fixture()
def previous(runs: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the half-finished run, which a test may damage."""
    return Path(shutil.copytree(runs["half"], tmp_path / "previous"))


def assert_resumes_exactly(run_dir: Path, runs: dict[str, Path], capsys: pytest.CaptureFixture, *extra: str) -> None:
    """``run_dir`` (a copy of ``half``) resumes to the metrics and weights of the uninterrupted run."""
    assert osd_train(capsys, *STEPS, "--save-interval", "0", "--out-dir", str(run_dir), "--resume", *extra)[0] == 0
    assert metrics(run_dir) == metrics(runs["full"])
    resumed, full = (checkpoint.load(d / "checkpoint.pt")["model"] for d in (run_dir, runs["full"]))
    assert all(torch.equal(resumed[k], full[k]) for k in full)


# --------------------------------------------------------------------------- bad input, one line each


def write(path: Path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def docs(n: int) -> str:
    return "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(n))


LLAMA = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4}

# (id, arguments, files to create {name: content}, message). "@name" in the arguments is the created file.
BAD_INPUT = [
    ("warmup-negative", ["--warmup-steps", "-5"], {}, "--warmup-steps must be >= 0, got -5"),
    ("warmup-past-the-end", ["--warmup-steps", "100"], {}, "--warmup-steps (100) exceeds the run's 4 steps"),
    ("stop-at-step-0", ["--stop-at-step", "0"], {}, "--stop-at-step must be in [1, 4]"),
    ("stop-at-step-negative", ["--stop-at-step", "-1"], {}, "--stop-at-step must be in [1, 4]"),
    ("stop-at-step-past-the-end", ["--stop-at-step", "9"], {}, "--stop-at-step must be in [1, 4]"),
    ("lr-inf", ["--lr", "inf"], {}, "--lr must be a finite number, got inf"),
    ("lr-nan", ["--lr", "nan"], {}, "--lr must be a finite number, got nan"),
    ("lr-zero", ["--lr", "0"], {}, "--lr must be > 0"),
    ("scale-inf", ["--scale", "inf"], {}, "--scale must be a finite number"),
    ("alpha-inf", ["--alpha", "inf"], {}, "--alpha must be a finite number"),
    ("ortho-reg-inf", ["--ortho-reg", "inf"], {}, "--ortho-reg must be a finite number"),
    ("weight-decay-nan", ["--weight-decay", "nan"], {}, "--weight-decay must be a finite number"),
    ("grad-clip-negative", ["--grad-clip", "-1"], {}, "--grad-clip must be >= 0"),
    ("min-lr-ratio", ["--min-lr-ratio", "2"], {}, "--min-lr-ratio must be in [0, 1]"),
    ("val-docs-0", ["--val-docs", "0"], {}, "--val-docs must be >= 1"),
    ("rank-0", ["--rank", "0"], {}, "--rank must be > 0"),
    ("total-batch", ["--total-batch-size", "3"], {}, "--total-batch-size (3) must be a positive multiple of --batch-size (2)"),
    ("tokens-below-a-step", ["--tokens", "1"], {}, "--tokens (1) is less than one step"),
    ("optim-bits", ["--optim-bits", "4"], {}, "--optim-bits must be 8 or 32"),
    ("device", ["--device", "tpu"], {}, "--device must be auto, cpu or cuda"),
    ("unknown-preset", ["--model", "13b"], {}, "unknown model preset '13b'"),
    ("unknown-optimizer", ["--optimizer", "galore_adam"], {}, "unknown optimizer 'galore_adam'"),
    ("allow-change-lr", ["--allow-change", "lr", "--resume"], {}, "--allow-change: lr cannot change on resume"),
    ("allow-change-without-resume", ["--allow-change", "steps"], {}, "--allow-change only applies with --resume"),
    ("resume-and-overwrite", ["--resume", "--overwrite"], {}, "--resume and --overwrite contradict each other"),
    ("model-config-typo", ["--model-config", "@m.json"], {"m.json": json.dumps({**LLAMA, "hiden_size": 96})}, "unknown LlamaConfig field(s) 'hiden_size'"),
    ("model-config-heads", ["--model-config", "@m.json"], {"m.json": json.dumps({**LLAMA, "hidden_size": 66})}, "hidden size (66) is not a multiple of the number of attention heads (4)"),
    ("model-config-no-width", ["--model-config", "@m.json"], {"m.json": json.dumps({k: v for k, v in LLAMA.items() if k != "hidden_size"})}, "does not set hidden_size"),
    ("model-config-list", ["--model-config", "@m.json"], {"m.json": "[64, 4]"}, "holds a JSON list, not an object"),
    ("model-config-not-json", ["--model-config", "@m.json"], {"m.json": "hidden_size: 64"}, "cannot read model config"),
    ("model-config-missing", ["--model-config", "/nonexistent/m.json"], {}, "cannot read model config /nonexistent/m.json"),
    ("data-missing", ["--data", "/nonexistent/c4.jsonl", "--tokenizer", "bytes"], {}, "no such file: /nonexistent/c4.jsonl"),
    ("data-directory", ["--data", "@shards/", "--tokenizer", "bytes"], {"shards/a.jsonl": docs(8)}, "is a directory; name its files, e.g. "),
    ("data-glob-matches-nothing", ["--data", "/nonexistent/*.jsonl", "--tokenizer", "bytes"], {}, "no file matches /nonexistent/*.jsonl"),
    ("data-empty-jsonl", ["--data", "@e.jsonl", "--tokenizer", "bytes"], {"e.jsonl": ""}, "e.jsonl is empty (0 bytes)"),
    ("data-empty-txt", ["--data", "@e.txt", "--tokenizer", "bytes"], {"e.txt": ""}, "e.txt is empty (0 bytes)"),
    ("data-half-without-text", ["--data", "@h.jsonl", "--tokenizer", "bytes"], {"h.jsonl": docs(4) + '{"body": "x"}\n' * 4}, "4 of 8 records of "),
    ("data-no-text-field", ["--data", "@c.jsonl", "--tokenizer", "bytes"], {"c.jsonl": '{"content": "a"}\n{"content": "b"}\n'}, "has no field 'text'; its records have: content"),
    ("data-text-not-a-string", ["--data", "@n.jsonl", "--tokenizer", "bytes"], {"n.jsonl": '{"text": 1}\n{"text": 2}\n'}, "field 'text' of "),
    ("data-blank-texts", ["--data", "@b.jsonl", "--tokenizer", "bytes"], {"b.jsonl": '{"text": ""}\n{"text": "  "}\n'}, "empty corpus: no non-empty 'text'"),
    ("data-one-document", ["--data", "@one.jsonl", "--tokenizer", "bytes"], {"one.jsonl": docs(1)}, "has 1 non-empty document; at least 2 are needed"),
    ("data-broken-json", ["--data", "@x.jsonl", "--tokenizer", "bytes"], {"x.jsonl": '{"text": "a"\n'}, "cannot read "),
    ("data-broken-gzip", ["--data", "@x.json.gz", "--tokenizer", "bytes"], {"x.json.gz": b"not gzip at all"}, "cannot read "),
    ("data-not-parquet", ["--data", "@x.parquet", "--tokenizer", "bytes"], {"x.parquet": b"not parquet"}, "cannot read "),
    ("data-unsupported-type", ["--data", "@x.csv", "--tokenizer", "bytes"], {"x.csv": "text\na\n"}, "unsupported file type"),
    ("validation-below-a-batch", ["--data", "@d.jsonl", "--tokenizer", "bytes", "--val-docs", "1", "--batch-size", "64"], {"d.jsonl": docs(8)}, "fewer than one batch"),
    ("tokenizer-missing", ["--tokenizer", "/nonexistent/tok.json"], {}, "tokenizer file not found: /nonexistent/tok.json"),
    ("tokenizer-json-not-tokenizers", ["--tokenizer", "@vocab.json"], {"vocab.json": '{"a": 0}'}, "is JSON but not a Hugging Face tokenizers file"),
    ("tokenizer-broken-json", ["--tokenizer", "@t.json"], {"t.json": "{not json"}, "cannot read tokenizers JSON"),
    ("tokenizer-broken-model", ["--tokenizer", "@t.model"], {"t.model": "not a protobuf"}, "cannot read SentencePiece model"),
]


@pytest.mark.parametrize("args,files,message", [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_one_line_and_the_run_dir_is_untouched(args, files, message, previous: Path, tmp_path: Path, capsys) -> None:
    """Refused before anything is written: the previous run's files stay byte for byte (the
    command names the previous run's directory and, where it can, asks to resume it)."""
    for name, content in files.items():
        write(tmp_path / "inputs" / name, content)
    args = [str(tmp_path / "inputs" / a[1:]) + ("/" if a.endswith("/") else "") if a.startswith("@") else a for a in args]
    before = snapshot(previous)
    resume = [] if {"--resume", "--allow-change"} & set(args) else ["--resume"]
    status, err = osd_train(capsys, *STEPS, "--out-dir", str(previous), *resume, *args)
    assert status == 2 and message in err, err
    assert snapshot(previous) == before


# --------------------------------------------------------------------------- the run directory


def test_a_new_run_refuses_a_non_empty_out_dir(previous: Path, capsys) -> None:
    before = snapshot(previous)
    status, err = osd_train(capsys, *STEPS, "--out-dir", str(previous))
    assert status == 2 and "is not empty (checkpoint.pt, config.json, metrics.jsonl): pass --resume" in err
    assert snapshot(previous) == before


def test_a_new_run_refuses_a_directory_with_other_files(tmp_path: Path, capsys) -> None:
    write(tmp_path / "mine" / "notes.txt", "keep me")
    status, err = osd_train(capsys, *STEPS, "--out-dir", str(tmp_path / "mine"))
    assert status == 2 and "is not empty (notes.txt)" in err and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_overwrite_starts_afresh(previous: Path, runs: dict[str, Path], capsys) -> None:
    assert osd_train(capsys, *STEPS, "--out-dir", str(previous), "--overwrite")[0] == 0
    assert metrics(previous) == metrics(runs["full"])


@pytest.mark.parametrize("present", [[], ["metrics.jsonl", "config.json"]], ids=["empty-dir", "metrics-without-checkpoint"])
def test_resume_without_a_checkpoint_fails_loudly(present: list[str], previous: Path, capsys) -> None:
    for name in set(RUN_FILES) - set(present):
        (previous / name).unlink()
    before = snapshot(previous)
    status, err = osd_train(capsys, *STEPS, "--out-dir", str(previous), "--resume")
    assert status == 2 and f"--resume: no checkpoint at {previous / 'checkpoint.pt'}, so nothing to resume" in err
    assert snapshot(previous) == before


def test_resume_in_a_missing_directory_fails_loudly(tmp_path: Path, capsys) -> None:
    status, err = osd_train(capsys, *STEPS, "--out-dir", str(tmp_path / "never"), "--resume")
    assert status == 2 and "no checkpoint at" in err


def test_out_dir_that_is_a_file(tmp_path: Path, capsys) -> None:
    write(tmp_path / "f", "data")
    assert osd_train(capsys, "--out-dir", str(tmp_path / "f"))[1].endswith(f"--out-dir {tmp_path / 'f'} is a file, not a directory")
    status, err = osd_train(capsys, "--out-dir", str(tmp_path / "f" / "run"))
    assert status == 2 and "is not writable: Not a directory" in err and (tmp_path / "f").read_text() == "data"


def test_out_dir_that_is_read_only(tmp_path: Path, capsys, monkeypatch) -> None:
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("osd.runs.tempfile.TemporaryFile", read_only)  # root ignores chmod, so the OS error is simulated
    status, err = osd_train(capsys, "--out-dir", str(tmp_path / "ro"))
    assert status == 2 and err.endswith(f"--out-dir {tmp_path / 'ro'} is not writable: Read-only file system")


@pytest.mark.skipif(not Path("/sys").is_dir() or os.access("/sys", os.W_OK) is False, reason="needs /sys")
def test_out_dir_the_os_refuses(capsys) -> None:
    if Path("/sys/osd-reliability").exists():
        pytest.skip("/sys/osd-reliability exists")
    status, err = osd_train(capsys, "--out-dir", "/sys/osd-reliability")
    assert status == 2 and "--out-dir /sys/osd-reliability is not writable" in err


# --------------------------------------------------------------------------- resume with other settings


@pytest.mark.parametrize(
    "args,message",
    [
        (["--optimizer", "galore_adamw"], "--optimizer osd_adamw -> galore_adamw"),
        (["--rank", "4"], "--rank 16 -> 4"),  # the run's default: a quarter of nano's 64
        (["--lr", "0.001"], "--lr 0.01 -> 0.001"),  # the run's default: AdamW's 1e-2
        (["--warmup-steps", "2"], "--warmup-steps 1 -> 2"),  # the run's default: 10% of 4 steps, at least 1
        (["--optim-bits", "8"], "--optim-bits 32 -> 8"),
        (["--seq-len", "32"], "--seq-len 16 -> 32"),
        (["--seed", "1"], "--seed 0 -> 1"),
        (["--lr", "0.001", "--scale", "0.5"], "--lr 0.01 -> 0.001; --scale 0.25 -> 0.5"),
        (["--steps", "6"], "--steps 4 -> 6; add --allow-change steps to continue with the new budget"),
    ],
    ids=["optimizer", "rank", "lr", "warmup", "optim-bits", "seq-len", "seed", "two-settings", "steps"],
)
def test_resume_with_other_settings_names_each_difference(args: list[str], message: str, previous: Path, capsys) -> None:
    before = snapshot(previous)
    status, err = osd_train(capsys, *STEPS, "--out-dir", str(previous), "--resume", *args)
    assert status == 2 and "was trained with other settings: " + message in err, err
    assert snapshot(previous) == before


def test_resume_with_allowed_budget_change_continues(previous: Path, runs: dict[str, Path], capsys) -> None:
    status, _ = osd_train(capsys, *STEPS, "--out-dir", str(previous), "--resume", "--steps", "6", "--allow-change", "steps")
    assert status == 0 and [r["step"] for r in metrics(previous)] == list(range(1, 7))
    assert metrics(previous)[:2] == metrics(runs["full"])[:2]
    assert json.loads((previous / "config.json").read_text())["steps"] == 6


def test_resume_with_settings_that_change_nothing_is_exact(previous: Path, runs: dict[str, Path], capsys) -> None:
    assert_resumes_exactly(previous, runs, capsys, "--eval-interval", "2", "--save-interval", "3", "--divergence-check")


@pytest.mark.parametrize(
    "args", [["--quiet"], ["--log-interval", "1"], ["--tensorboard"], ["--progress"]], ids=["quiet", "log-interval", "tensorboard", "progress"]
)
def test_resume_with_other_output_settings_is_exact(args: list[str], previous: Path, runs: dict[str, Path], capsys) -> None:
    """Output-only settings (what is printed or logged, not what is computed) may differ on resume."""
    if "--tensorboard" in args:
        pytest.importorskip("tensorboard", reason="--tensorboard needs the tensorboard package")
    assert_resumes_exactly(previous, runs, capsys, *args)


@pytest.mark.parametrize(
    "args",
    [["--lr", "0.01"], ["--rank", "16"], ["--warmup-steps", "1"], ["--total-batch-size", "2"], ["--tokenizer", "bytes"]],
    ids=["lr", "rank", "warmup", "total-batch-size", "tokenizer"],
)
def test_resume_with_the_value_a_default_stood_for_is_exact(args: list[str], previous: Path, runs: dict[str, Path], capsys) -> None:
    """A setting left at its default (``None``) on the first run and given on resume as the very
    value the run used (AdamW's lr 1e-2, rank 16 = a quarter of nano's 64, ...) is no difference."""
    assert_resumes_exactly(previous, runs, capsys, *args)


def test_resume_differences_compare_the_values_the_runs_used() -> None:
    """:meth:`TrainConfig.resume_differences` both ways round: an explicit value the other run's
    default stood for is the same setting, another value is named with both values as used."""
    from osd.config import TrainConfig

    def saved(**settings) -> dict:
        return json.loads(TrainConfig(model="nano", **settings).to_json())

    default = TrainConfig(model="nano", resume=True)
    assert default.resume_differences(saved(lr=0.01, rank=16, warmup_steps=20, tokenizer="bytes", total_batch_size=8), default_rank=16) == []
    assert default.resume_differences(saved(lr=0.001, rank=4), default_rank=16) == ["--lr 0.001 -> 0.01", "--rank 4 -> 16"]
    assert TrainConfig(model="nano", lr=0.01, rank=16, resume=True).resume_differences(saved(), default_rank=16) == []
    assert TrainConfig(model="nano", lr=0.1, rank=8, resume=True).resume_differences(saved(), default_rank=16) == ["--lr 0.01 -> 0.1", "--rank 16 -> 8"]
    # A checkpoint whose default lr was another (an older release's): the lr it trained with counts.
    old = {**saved(), "derived": {**saved()["derived"], "peak_lr": 0.001}}
    assert default.resume_differences(old, default_rank=16) == ["--lr 0.001 -> 0.01"]
    assert TrainConfig(model="nano", lr=0.001, resume=True).resume_differences(old, default_rank=16) == []
    # The default warmup (10% of the run) follows a budget that --allow-change lets change.
    longer = TrainConfig(model="nano", steps=400, resume=True, allow_change="steps")
    assert longer.resume_differences(saved(), default_rank=16) == []
    assert longer.resume_differences(saved(warmup_steps=20), default_rank=16) == ["--warmup-steps 20 -> 40"]
    assert TrainConfig(model="nano", steps=400, warmup_steps=20, resume=True, allow_change="steps").resume_differences(saved(), default_rank=16) == []


@pytest.mark.parametrize(
    "args,message", [([], "the checkpoint is at step 4, and this run stops at step 4"), (["--stop-at-step", "1"], "")], ids=["finished", "past-the-stop"]
)
def test_resume_of_a_finished_run_or_past_the_stop_is_refused(args: list[str], message: str, runs: dict[str, Path], previous: Path, capsys) -> None:
    source = runs["full"] if not args else previous
    before = snapshot(source)
    status, err = osd_train(capsys, *STEPS, "--out-dir", str(source), "--resume", *args)
    assert status == 2 and "this run stops at step" in err and message in err
    assert snapshot(source) == before


# --------------------------------------------------------------------------- checkpoint problems


def damage(path: Path, how: str, runs: dict[str, Path]) -> None:
    """Replace the checkpoint at ``path`` by a damaged one."""
    good = path.read_bytes()
    saved = checkpoint.load(path)
    if how == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif how == "zero-bytes":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("step: 2\n")
    elif how == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif how == "python-objects":
        torch.save({**saved, "config": argparse.Namespace(lr=1e-3)}, path)
    elif how == "bare-model-state-dict":
        torch.save(saved["model"], path)
    elif how == "missing-scheduler":
        torch.save({k: v for k, v in saved.items() if k != "scheduler"}, path)
    elif how == "a-list":
        torch.save([1, 2], path)
    elif how == "unreadable":
        path.unlink()
        path.mkdir()
    elif how == "other-model-shapes":
        model = dict(saved["model"])
        model["model.embed_tokens.weight"] = torch.zeros(257, 32)
        torch.save({**saved, "model": model}, path)
    elif how == "other-model-keys":
        torch.save({**saved, "model": {f"other.{k}": v for k, v in saved["model"].items()}}, path)
    elif how == "other-optimizer-layout":  # torch's AdamW over one group, in an OSD run's checkpoint
        torch.save({**saved, "optimizer": checkpoint.load(runs["adamw"] / "checkpoint.pt")["optimizer"]}, path)
    elif how == "eight-bit-optimizer-state":
        torch.save({**saved, "optimizer": checkpoint.load(runs["osd8"] / "checkpoint.pt")["optimizer"]}, path)
    elif how == "nan-in-p":
        optimizer = saved["optimizer"]
        state = next(s for s in optimizer["state"].values() if is_projected(s))
        state[PROJ][0, 0] = float("nan")
        torch.save(saved, path)
    elif how == "config-not-a-dict":
        torch.save({**saved, "config": "osd_adamw"}, path)
    else:
        raise ValueError(how)


CHECKPOINT_PROBLEMS = [
    ("truncated", "is truncated or corrupt: it does not read as a torch zip archive"),
    ("zero-bytes", "is empty (0 bytes)"),
    ("text", "is not a torch checkpoint (not a zip archive of tensors)"),
    ("random-bytes", "is not a torch checkpoint (not a zip archive of tensors)"),
    ("python-objects", "holds Python objects other than tensors and plain values"),
    ("bare-model-state-dict", "is a bare model state dict"),
    ("missing-scheduler", "lacks 'scheduler'"),
    ("a-list", "holds a list, not a dict"),
    ("unreadable", "cannot read checkpoint"),
    ("other-model-shapes", "holds another model: model.embed_tokens.weight is (257, 32) there, (257, 64) here"),
    ("other-model-keys", "holds another model: "),
    ("other-optimizer-layout", "does not fit this run's optimizer: "),
    ("eight-bit-optimizer-state", "does not fit this run's optimizer: "),
    ("nan-in-p", "does not fit this run's optimizer: the saved state of parameter "),
    ("config-not-a-dict", "has no run configuration to compare with"),
]


@pytest.fixture(scope="module")
def other_runs(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("other")
    for name, args in {"adamw": ["--optimizer", "adamw"], "osd8": ["--optim-bits", "8"]}.items():
        assert main([*TINY, *STEPS, "--stop-at-step", "2", "--out-dir", str(base / name), *args]) == 0
    return {**runs, "adamw": base / "adamw", "osd8": base / "osd8"}


@pytest.mark.parametrize("how,message", CHECKPOINT_PROBLEMS, ids=[c[0] for c in CHECKPOINT_PROBLEMS])
def test_every_checkpoint_problem_is_one_line(how: str, message: str, previous: Path, other_runs: dict[str, Path], capsys) -> None:
    damage(previous / "checkpoint.pt", how, other_runs)
    before = snapshot(previous)
    status, err = osd_train(capsys, *STEPS, "--out-dir", str(previous), "--resume")
    assert status == 2 and message in err, err
    assert "weights_only" not in err and snapshot(previous) == before


# --------------------------------------------------------------------------- faults during a run


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO], ids=["ENOSPC", "EDQUOT", "EIO"])
def test_a_failed_save_fails_the_run_and_keeps_the_previous_checkpoint(code: int, previous: Path, runs: dict[str, Path], capsys, monkeypatch) -> None:
    """The disk fills during the save after step 3: exit 1, the cause named, the partial file
    removed, the checkpoint of step 2 intact, and it resumes exactly."""
    real_save, saves = torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        saves.append(obj["step"])
        if obj["step"] == 3:
            f.write(b"PK\x03\x04 partial")
            raise OSError(code, os.strerror(code))
        real_save(obj, f, *args, **kwargs)

    good = (previous / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(torch, "save", failing_save)
    status, err = osd_train(capsys, *STEPS, "--out-dir", str(previous), "--resume")
    monkeypatch.undo()
    assert status == 1 and f"cannot save checkpoint {previous / 'checkpoint.pt'}: {os.strerror(code)} (errno {code})" in err
    assert "the previous checkpoint is kept; the run stops at step 3" in err and saves == [3]
    assert (previous / "checkpoint.pt").read_bytes() == good and not (previous / "checkpoint.pt.tmp").exists()
    assert_resumes_exactly(previous, runs, capsys)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lr", "1e4", "--optimizer", "adamw"], "the model predicts the uniform distribution"),
        (["--lr", "10", "--optimizer", "adamw"], "exceeds 2 ln(vocab) = 11.1"),
        (["--lr", "10", "--optimizer", "osd_adamw"], "exceeds 2 ln(vocab) = 11.1"),
    ],
    ids=["collapse-adamw", "explode-adamw", "explode-osd"],
)
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "diverged"
    status, err = osd_train(capsys, "--steps", "20", "--save-interval", "1", "--warmup-steps", "1", "--out-dir", str(run_dir), *args)
    assert status == 1 and "training diverged at step " in err and message in err, err
    step = int(err.split("training diverged at step ")[1].split(":")[0])
    saved = checkpoint.load(run_dir / "checkpoint.pt")
    assert saved["step"] < step and f"the checkpoint of step {saved['step']} is kept" in err
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, step + 1))  # what happened, logged


@pytest.mark.parametrize(
    "optimizer,message", [("adamw", "the train loss is nan"), ("osd_adamw", "non-finite gradient (NaN or Inf) in parameter")], ids=["adamw", "osd_adamw"]
)
def test_a_nan_loss_stops_the_run(optimizer: str, message: str, tmp_path: Path, capsys, monkeypatch) -> None:
    import osd.train as train_module

    real, calls = train_module.token_loss_sum, []

    def poisoned(model, batch):
        calls.append(1)
        loss, tokens = real(model, batch)
        return (loss * float("nan") if len(calls) == 3 else loss), tokens

    monkeypatch.setattr(train_module, "token_loss_sum", poisoned)
    status, err = osd_train(capsys, *STEPS, "--eval-interval", "100", "--optimizer", optimizer, "--out-dir", str(tmp_path / "nan"))
    assert status == 1 and "training diverged at step 3: " + message in err, err
    assert checkpoint.load(tmp_path / "nan" / "checkpoint.pt")["step"] == 2


def test_divergence_check_can_be_turned_off(tmp_path: Path, capsys) -> None:
    status, _ = osd_train(capsys, "--steps", "6", "--lr", "1e4", "--optimizer", "adamw", "--no-divergence-check", "--out-dir", str(tmp_path / "off"))
    assert status == 0 and len(metrics(tmp_path / "off")) == 6


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_step_saves_and_says_how_to_resume(signum: int, tmp_path: Path, capsys) -> None:
    run_dir, steps = tmp_path / "signalled", ["--steps", "400", "--save-interval", "0", "--eval-interval", "100"]
    command = [sys.executable, "-m", "osd.train", *TINY, *steps, "--out-dir", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("osd train")]
    assert process.returncode == 128 + signum and len(lines) == 1 and "Traceback" not in err, err
    step = len(metrics(run_dir))
    assert 3 <= step < 400 and checkpoint.load(run_dir / "checkpoint.pt")["step"] == step
    name = signal.Signals(signum).name
    assert lines[0] == f"osd train: interrupted by {name} after step {step}; checkpoint saved to {run_dir / 'checkpoint.pt'}; to continue, run the same command with --resume"
    # Continued for two steps, it equals an uninterrupted run (both in-process, to save time).
    stop = ["--stop-at-step", str(step + 2)]
    assert osd_train(capsys, *steps, *stop, "--out-dir", str(run_dir), "--resume")[0] == 0
    assert osd_train(capsys, *steps, *stop, "--out-dir", str(tmp_path / "whole"))[0] == 0
    assert metrics(run_dir) == metrics(tmp_path / "whole")


def test_an_immediate_interrupt_is_one_line_too(previous: Path, capsys, monkeypatch) -> None:
    """A second Ctrl-C (or one before the first step) interrupts at once: one line, status
    130, and the last complete checkpoint stays."""
    import osd.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    before = snapshot(previous)
    monkeypatch.setattr(train_module, "train_step", interrupted)
    status, err = osd_train(capsys, *STEPS, "--out-dir", str(previous), "--resume")
    assert status == 130 and "interrupted at once" in err and snapshot(previous)["checkpoint.pt"] == before["checkpoint.pt"]


# --------------------------------------------------------------------------- the optimizer API


def matrix(shape=(8, 12), seed: int = 0) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": float("inf")}, "lr must be finite"),
        ({"lr": float("nan")}, "lr must be finite"),
        ({"scale": float("inf")}, "scale must be finite"),
        ({"alpha": float("inf")}, "alpha must be finite"),
        ({"ortho_reg": float("inf")}, "ortho_reg must be finite"),
        ({"eps": float("inf")}, "eps must be finite"),
        ({"weight_decay": float("inf")}, "weight_decay must be finite"),
        ({"betas": (0.9, float("nan"))}, "betas must be finite"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm must be finite"),
        ({"proj_optimizer_args": {"eps": float("inf")}}, "proj_optimizer_args['eps'] must be finite"),
        ({"lr": torch.tensor(float("inf"))}, "lr must be finite"),
    ],
    ids=["lr-inf", "lr-nan", "scale", "alpha", "ortho_reg", "eps", "weight_decay", "betas", "max_grad_norm", "proj_optimizer_args", "lr-tensor"],
)
def test_non_finite_hyperparameters_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        osd.OSDAdamW([{"params": [matrix()], "rank": 4}], **kwargs)


def test_float16_parameters_are_refused_up_front() -> None:
    model = torch.nn.Linear(12, 8).half()
    with pytest.raises(ValueError, match="parameter 'weight' is float16, which is not supported"):
        osd.create_optimizer(model, "osd_adamw", lr=1e-3, rank=4, target_modules="all-linear")


def stepped(optimizer_class: type, params: list[torch.nn.Parameter], steps: int = 2, **kwargs) -> torch.optim.Optimizer:
    optimizer = optimizer_class([{"params": params, "rank": kwargs.pop("rank", 4)}], lr=1e-2, **kwargs)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
        optimizer.step()
    return optimizer


def nan_in_p(state: dict) -> dict:
    state["state"][0][PROJ][0, 0] = float("nan")
    return state


@pytest.mark.parametrize(
    "saved,current,message",
    [
        (lambda: stepped(osd.OSDAdamW, [matrix()]), lambda: stepped(osd.GaLoreAdamW, [matrix()], 0), "projector='online_pca' .* this optimizer has projector='svd'"),
        (lambda: stepped(osd.OSDLion, [matrix()]), lambda: stepped(osd.OSDAdamW, [matrix()], 0), "rule='lion' .* this optimizer has rule='adamw'"),
        (lambda: stepped(osd.OSDAdamW, [matrix()], rank=2), lambda: stepped(osd.OSDAdamW, [matrix()], 0), "rank=2 .* this optimizer has rank=4"),
        (lambda: stepped(osd.OSDAdamW, [matrix()], proj_type="reverse_std"), lambda: stepped(osd.OSDAdamW, [matrix()], 0), "proj_type='reverse_std'"),
        (lambda: stepped(osd.OSDAdamW, [matrix()], optim_bits=8, min_8bit_size=0), lambda: stepped(osd.OSDAdamW, [matrix()], 0), "optim_bits=8"),
        (lambda: stepped(osd.OSDAdamW, [matrix()], proj_optimizer="lion"), lambda: stepped(osd.OSDAdamW, [matrix()], 0), "proj_optimizer='lion'"),
        (lambda: stepped(osd.OSDAdamW, [matrix((16, 12))]), lambda: stepped(osd.OSDAdamW, [matrix()], 0), r"parameter #0 of its group has 'proj' of shape \(12, 4\); this optimizer's is \(8, 4\)"),
        (lambda: stepped(osd.OSDAdamW, [matrix((8, 20))]), lambda: stepped(osd.OSDAdamW, [matrix()], 0), r"'exp_avg' of shape \(4, 20\); this optimizer's is \(4, 12\)"),
        (lambda: torch_adamw([matrix()]), lambda: stepped(osd.OSDAdamW, [matrix()], 0), "not saved by a SubspaceOptimizer"),
    ],
    ids=["projector", "rule", "rank", "proj_type", "optim_bits", "proj_optimizer", "shape-of-P", "shape-of-moments", "torch-adamw"],
)
def test_load_state_dict_refuses_another_optimizers_state(saved, current, message: str) -> None:
    state = saved().state_dict()
    optimizer = current()
    before = optimizer.state_dict()
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(state)
    assert repr(optimizer.state_dict()) == repr(before)  # nothing was loaded


def torch_adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    params[0].grad = torch.randn(params[0].shape)
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("key", [PROJ, "exp_avg_sq", PROJ_PREFIX + "exp_avg"])
def test_load_state_dict_refuses_non_finite_state(key: str) -> None:
    state = stepped(osd.OSDAdamW, [matrix()]).state_dict()
    state["state"][0][key].view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=f"parameter #0 of its group holds NaN or Inf in '{key}'"):
        stepped(osd.OSDAdamW, [matrix()], 0).load_state_dict(state)


def test_the_same_optimizers_state_still_loads_and_continues_exactly() -> None:
    a = stepped(osd.OSDAdamW, [matrix()], 3)
    b = stepped(osd.OSDAdamW, [matrix()], 0)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.state_dict()["state"][0][k], b.state_dict()["state"][0][k]) for k in (PROJ, "exp_avg"))


@pytest.mark.parametrize("hidden,expected", [(64, "all projected weights"), (192, "3 of the 7 projected weights")], ids=["all", "some"])
def test_rank_above_a_weights_sides_gives_a_notice(hidden: int, expected: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    with pytest.warns(UserWarning, match=f"rank 128 is at least the smaller side of {expected}"):
        osd.create_optimizer(LlamaForCausalLM(config), "osd_adamw", lr=1e-3, rank=128)


def test_random_bytes_are_never_called_a_damaged_checkpoint(tmp_path: Path) -> None:
    """Whatever exception the unpickler happens to raise on random bytes (it depends on the
    first byte: UnpicklingError, EOFError, ValueError ...), the message is decided by what the
    file is: not a zip archive, so not a torch checkpoint (CI once saw the other message)."""
    path = tmp_path / "checkpoint.pt"
    for seed in range(300):
        path.write_bytes(random.Random(seed).randbytes(64 + seed))
        with pytest.raises(checkpoint.CheckpointError, match="is not a torch checkpoint"):
            checkpoint.load(path)
