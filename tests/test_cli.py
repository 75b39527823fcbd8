"""The command line: selfcheck, demo, train, eval, restore, bench; bad input gives clear errors and
leaves nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage import io

import moce_fast
from moce_fast.cli import main


def _no_partial_dirs(path):
    return not [p for p in path.parent.iterdir() if ".partial-" in p.name]


def test_selfcheck_runs_on_a_real_photo(capsys):
    assert main(["selfcheck", "--config", "MoCE_IR_S", "--size", "40", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "input  (1, 3, 37, 35)" in out and "output (1, 3, 37, 35)" in out
    assert "ran: torch" in out and "selfcheck: OK" in out


def test_selfcheck_reports_only_its_own_calls_backends(capsys):
    # an op run earlier in the process on another backend (the adapter on the cpu kernel) is not
    # reported as one the model ran (last_run() keeps it; it used to read "ran: cpu, torch")
    adapter = moce_fast.AdaptIRAdapter(192, layout="lnc").eval()
    with moce_fast.backend("cpu"), torch.no_grad():
        adapter(torch.randn(16, 1, 192))
    assert moce_fast.ops.last_run()["adaptir_mix_tail"] == "cpu"
    assert main(["selfcheck", "--config", "MoCE_IR_S", "--size", "40", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "backend requested 'auto', ran: torch\n" in out and "selfcheck: OK" in out


def test_selfcheck_rejects_tiny_sizes(capsys):
    assert main(["selfcheck", "--size", "4"]) == 2
    assert "--size: expected at least 16" in capsys.readouterr().err


def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--minutes", "0.04", "--out", str(out), "--crop", "32", "--batch-size", "2",
                 "--eval-crop", "32", "--eval-crops", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "PSNR in" in text and "denoising PSNR gain" in text
    for name in ["noise25.png", "haze.png", "expert_usage.png", "metrics.json", "report.txt",
                 "checkpoint/model.safetensors"]:
        assert (out / name).is_file(), name
    side = io.imread(out / "noise25.png")
    assert side.shape == (32, 3 * 32 + 8, 3)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) >= {"noise15", "noise25", "noise50", "rain", "haze", "motion_blur", "lowlight"}
    assert _no_partial_dirs(out)


def test_demo_rejects_zero_minutes(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--minutes", "0", "--out", str(tmp_path / "d")])
    assert info.value.code == 2
    assert "positive number of minutes" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert main(["train", "--config", "tiny", "--steps", "2", "--crop", "32", "--batch-size", "2", "--out",
                 str(run), "--tasks", "noise25,haze", "--no-progress"]) == 0
    return run / "model.safetensors"


def test_eval_writes_tables_and_heatmap(trained_tiny, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--checkpoint", str(trained_tiny), "--tasks", "noise25,rain", "--crop", "32",
                 "--crops-per-task", "2", "--out", str(out)]) == 0
    assert "PSNR out" in capsys.readouterr().out
    data = json.loads((out / "metrics.json").read_text())
    assert data["metrics"]["noise25"]["n"] == 2 and (out / "expert_usage.png").is_file()


def test_restore_keeps_odd_sizes_and_accepts_lightning_ckpt(trained_tiny, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    io.imsave(inputs / "odd.png", (rng.random((37, 29, 3)) * 255).astype(np.uint8))
    io.imsave(inputs / "gray.png", (rng.random((20, 24)) * 255).astype(np.uint8))
    io.imsave(inputs / "odd2.png", (rng.random((37, 29, 3)) * 255).astype(np.uint8))
    model = moce_fast.load_checkpoint(trained_tiny, config="tiny")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, ckpt)
    out = tmp_path / "out"
    files = [str(inputs / n) for n in ("odd.png", "gray.png", "odd2.png")]
    assert main(["restore", *files, "--checkpoint", str(ckpt), "--config", "tiny", "--out", str(out),
                 "--batch-size", "2"]) == 0
    assert io.imread(out / "odd.png").shape == (37, 29, 3)
    assert io.imread(out / "gray.png").shape == (20, 24, 3)
    assert _no_partial_dirs(out)


def test_restore_errors_leave_nothing_behind(trained_tiny, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    out = tmp_path / "out"
    assert main(["restore", str(bad), "--checkpoint", str(trained_tiny), "--out", str(out)]) == 2
    assert "cannot be read as an image" in capsys.readouterr().err
    good = tmp_path / "good.png"
    io.imsave(good, np.zeros((16, 16, 3), np.uint8))
    assert main(["restore", str(good), "--checkpoint", str(trained_tiny), "--config", "MoCE_IR_S", "--out",
                 str(out)]) == 2
    assert "misshaped keys" in capsys.readouterr().err
    assert not out.exists() and _no_partial_dirs(out)


def test_train_with_an_empty_data_folder_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "photos"
    empty.mkdir()
    assert main(["train", "--steps", "1", "--data", str(empty), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r")]) == 2
    assert "--steps N or --minutes M" in capsys.readouterr().err


def test_bench_prints_table_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "-k", "moce_layer and C48 and 1-mixed and not bwd", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "device: CPU" in text and " torch " in text and "public-eval" in text
    assert (out / "speedups.png").is_file() and (out / "bench.json").is_file()
