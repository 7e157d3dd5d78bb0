"""``osd bench``: every benchmark at a tiny size writes valid JSON + Markdown, and the
counterexample shows what it is meant to show."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from osd.bench import convergence, counterexample, projection, step
from osd.cli import main as osd_main
from osd.config import ConfigError

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


def read(out: Path, name: str) -> tuple[dict, str]:
    payload = json.loads((out / f"{name}.json").read_text())
    markdown = (out / f"{name}.md").read_text()
    assert payload["benchmark"] == name and payload["command"].startswith(f"osd bench {name}")
    assert {"cpu", "cores", "torch", "threads", "load_average_1min"} <= set(payload["machine"])
    assert payload["command"] in markdown and markdown.count("\n|") >= 3
    return payload, markdown


def test_projection_times_every_rule_with_ratios(tmp_path: Path) -> None:
    assert osd_main(["bench", "projection", "--shapes", "48x32:4", "64x96:8", "--repeats", "2", "--warmup", "0", "--out", str(tmp_path)]) == 0
    payload, markdown = read(tmp_path, "projection")
    shapes = [(r["m"], r["n"], r["rank"]) for r in payload["results"]]
    assert shapes == [(32, 48, 4), (64, 96, 8)]  # canonical orientation, m <= n
    for result in payload["results"]:
        assert set(result["rules"]) == set(projection.RULES)
        for timing in result["rules"].values():
            assert len(timing["times_ms"]) == 2 and timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
        assert result["quality"]["eigh"]["energy"] == pytest.approx(1.0, abs=1e-4)
        assert 0.0 < result["quality"]["randomized"]["energy"] <= 1.0 + 1e-6
        assert result["svd_over_online_pca"] == pytest.approx(result["rules"]["svd"]["median_ms"] / result["rules"]["online_pca"]["median_ms"])
    assert "| 64 x 96 | 8 |" in markdown


def test_projection_rejects_a_rank_not_below_the_small_side(capsys) -> None:
    with pytest.raises(SystemExit):
        osd_main(["bench", "projection", "--shapes", "32x48:32"])
    assert "rank must be in (0, 32)" in capsys.readouterr().err


def test_step_times_every_optimizer_and_throughput(tmp_path: Path) -> None:
    argv = ["--presets", "nano", "--throughput-presets", "nano", "--random-tokens", "--batch-size", "2", "--seq-len", "16",
            "--repeats", "2", "--warmup", "1", "--refresh-repeats", "1", "--train-repeats", "1", "--train-warmup", "1",
            "--gap", "10", "--profile", "osd_adamw", "--throughput-optimizers", "adamw", "osd_adamw", "osd_adamw_8bit", "--out", str(tmp_path)]
    assert osd_main(["bench", "step", *argv]) == 0
    payload, markdown = read(tmp_path, "step")
    (result,) = payload["results"]
    assert result["preset"] == "nano" and result["rank"] == 16 and result["tokens_per_step"] == 32
    optimizers = result["optimizers"]
    assert list(optimizers) == list(step.OPTIMIZERS)
    for name, entry in optimizers.items():
        assert ("refresh_step" in entry) == (name in step.REFRESHED)
        assert entry["amortised_step_ms"] == pytest.approx(entry["step"]["median_ms"] + entry.get("refresh_overhead_ms", 0.0))
        rounds = list(zip(entry["step"]["times_ms"], entry["floors_ms"]))
        assert len(rounds) == 2 and entry["floor_ms"] > 0 and entry["floor_ms"] == pytest.approx(statistics.median(f for _, f in rounds))
        assert entry["vs_floor"] == pytest.approx(statistics.median(t / f for t, f in rounds))
        assert len(entry["machine_rates"]["bandwidth_gbs"]) == 2
        if name.endswith("_8bit"):
            pairs = zip(entry["step"]["times_ms"], optimizers[name.removesuffix("_8bit")]["step"]["times_ms"])
            assert entry["vs_32bit"] == pytest.approx(statistics.median(a / b for a, b in pairs))
        assert ("train" in entry) == (name in ("adamw", "osd_adamw", "osd_adamw_8bit"))
        if "train" in entry:
            assert entry["tokens_per_s"] > 0 and set(entry["train"]) == {"train_step", "forward_backward", "step"}
    assert optimizers["adamw"]["throughput_vs_adamw"] == 1.0
    # Products: GaLore's two m x n x r ones per weight (nano: 2 layers of 4 64x64 and 3 64x172 weights,
    # rank 16); OSD adds one more and four m x r x r.
    galore_flops = 2 * 4 * 64 * 16 * (4 * 64 + 3 * 172)
    assert optimizers["adamw"]["gflop"] == 0.0 and optimizers["galore_adamw"]["gflop"] == pytest.approx(galore_flops / 1e9)
    assert optimizers["osd_adamw"]["gflop"] == pytest.approx(1.5 * galore_flops / 1e9 + 2 * 7 * 8 * 64 * 16 * 16 / 1e9)
    assert optimizers["osd_adamw_8bit"]["mbytes"] <= optimizers["osd_adamw"]["mbytes"]  # nano: every state under min_8bit_size
    assert optimizers["osd_adamw"]["aten_ops_per_projected_weight"] > optimizers["galore_adamw"]["aten_ops_per_projected_weight"] > 0
    group = result["full_rank_group"]
    for name in ("osd", "osd_unchecked"):
        pairs = zip(group[name]["times_ms"], group["torch_fused"]["times_ms"])
        assert group[f"{name}_vs_torch_fused"] == pytest.approx(statistics.median(a / b for a, b in pairs))
    osd_steps, adamw_steps = (optimizers[name]["train"]["train_step"]["times_ms"] for name in ("osd_adamw", "adamw"))
    assert optimizers["osd_adamw"]["throughput_vs_adamw"] == pytest.approx(statistics.median(a / b for a, b in zip(adamw_steps, osd_steps)))
    assert "aten::mm" in (tmp_path / "profile_nano_osd_adamw.txt").read_text()
    assert "Training throughput" in markdown


def test_step_rejects_throughput_of_a_preset_not_benchmarked(tmp_path: Path, capsys) -> None:
    assert osd_main(["bench", "step", "--presets", "nano", "--throughput-presets", "micro", "--random-tokens", "--out", str(tmp_path)]) == 2
    assert "not among --presets" in capsys.readouterr().err


def test_counterexample_full_rank_converges_and_galore_stalls(tmp_path: Path) -> None:
    out = tmp_path / "new" / "folder"  # created by the benchmark
    argv = ["--m", "16", "--n", "32", "--rank", "4", "--steps", "300", "--rules", "sgd", "--seeds", "0", "1", "--out", str(out)]
    assert osd_main(["bench", "counterexample", *argv]) == 0
    payload, markdown = read(out, "counterexample")
    results = payload["results"]
    assert set(results) == {f"sgd/{name}" for name in counterexample.PROJECTORS}
    full, galore = results["sgd/full_rank"], results["sgd/galore"]
    assert full["verdict"] == "converged" and full["final_loss_gap_max"] < 1e-6 and full["final_distance_mean"] < 1e-3
    # GaLore's P spans the noise rows, which f ignores: no progress on f at all.
    assert galore["verdict"] == "stalled" and min(r["final_loss_gap"] for r in galore["runs"]) > 0.5
    assert len(full["runs"][0]["steps"]) == len(full["runs"][0]["loss_gap"]) == 31
    assert (out / "counterexample_sgd.png").stat().st_size > 0
    assert "| `sgd` | galore |" in markdown


def test_noisy_quadratic_noise_is_orthogonal_to_the_true_gradient() -> None:
    import torch

    problem = counterexample.NoisyQuadratic(8, 12, noise_rank=2, sigma=100.0, seed=0)
    X = torch.randn(8, 12, dtype=torch.float64)
    g = problem.gradient(X, torch.Generator().manual_seed(0))
    true = problem.a**2 * X[:6] + problem.B_top
    assert torch.allclose(g[:6], true) and g[6:].abs().mean() > 10 * true.abs().mean()
    X[:6] = problem.X_top_star
    assert problem.value(X) == pytest.approx(problem.f_star) and problem.distance(X) == pytest.approx(0.0, abs=1e-12)


def test_convergence_parses_config_specs() -> None:
    assert convergence.parse_spec("osd_adamw:alpha=1,lr=3e-3,proj_optimizer=lion") == ("osd_adamw", {"alpha": 1, "lr": 0.003, "proj_optimizer": "lion"})
    assert convergence.parse_spec("adamw") == ("adamw", {})
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        convergence.parse_spec("osd_adamw:alpha")
    with pytest.raises(ConfigError, match="'seed' is not a setting"):
        convergence.parse_spec("osd_adamw:seed=3")


def test_convergence_trains_every_config_and_seed_with_osd_train(tmp_path: Path, shared_dir: Path) -> None:
    out = tmp_path / "conv"
    argv = ["--configs", "adamw", "osd_adamw:alpha=1", "--seeds", "0", "1", "--shared", str(shared_dir), "--model", "nano",
            "--rank", "8", "--seq-len", "32", "--batch-size", "4", "--tokens", "1024", "--eval-interval", "4",
            "--eval-batches", "2", "--out", str(out)]
    assert osd_main(["bench", "convergence", *argv]) == 0
    payload, markdown = read(out, "convergence")
    results = payload["results"]
    assert sorted(results["ordering"]) == ["adamw", "osd_adamw:alpha=1"]
    for summary in results["configs"].values():
        assert [r["seed"] for r in summary["runs"]] == [0, 1]
        ppl = [r["val_ppl"] for r in summary["runs"]]
        assert summary["val_ppl_min"] == min(ppl) and summary["val_ppl_mean"] == pytest.approx(sum(ppl) / 2)
        assert all(r["tokens"] == 1024 and len(r["curve"]["val_ppl"]) == 2 for r in summary["runs"])
        assert (Path(summary["runs"][0]["run_dir"]) / "metrics.jsonl").is_file()  # an ordinary osd train run
    configs = results["configs"]
    assert configs["osd_adamw:alpha=1"]["optimizer_state_bytes"] < configs["adamw"]["optimizer_state_bytes"]
    assert configs["adamw"]["runs"][0]["val_ppl"] != configs["adamw"]["runs"][1]["val_ppl"]  # the seeds differ
    assert (out / "convergence.png").stat().st_size > 0 and "Ordering by mean perplexity" in markdown


def test_convergence_reports_a_bad_config_in_one_line(tmp_path: Path, capsys) -> None:
    assert osd_main(["bench", "convergence", "--configs", "osd_adamw:alphaa=1", "--out", str(tmp_path)]) == 2
    assert "'alphaa' is not a setting" in capsys.readouterr().err
