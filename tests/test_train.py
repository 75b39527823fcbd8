"""Training (single process and torchrun/DDP with gloo), losses, evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moce_fast.data import bundled_photos
from moce_fast.train import TrainConfig, evaluate, fft_loss, psnr_ssim, train


def test_psnr_ssim_values_and_bad_images():
    import numpy as np
    from skimage.metrics import peak_signal_noise_ratio

    rng = np.random.default_rng(0)
    clean = rng.random((24, 24, 3)).astype(np.float32)
    noisy = np.clip(clean + rng.normal(0, 0.05, clean.shape), 0, 1).astype(np.float32)
    p, s = psnr_ssim(noisy, clean)
    assert abs(p - peak_signal_noise_ratio(clean, noisy, data_range=1.0)) < 1e-9 and 20 < p < 30 and 0 < s < 1
    with np.errstate(divide="ignore"):  # identical images: infinite PSNR (skimage's division by zero)
        assert psnr_ssim(clean, clean) == (float("inf"), pytest.approx(1.0))
    # an 8-bit image gave -43 dB against a float one without a word; tensors and shapes named
    with pytest.raises(ValueError, match=r"clean: expected a float image with values in \[0, 1\], got uint8 "
                                         r"\(moce_fast.data.to_rgb_float or skimage.util.img_as_float"):
        psnr_ssim(noisy, (clean * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"clean: expected finite values in \[0, 1\], got \[[\d.e-]+, 1\.9\d*\]"):
        psnr_ssim(noisy, clean * 2)
    with pytest.raises(TypeError, match="restored: expected a numpy image .* got Tensor$"):
        psnr_ssim(torch.rand(24, 24, 3), clean)
    with pytest.raises(ValueError, match=r"restored: expected an RGB image \(H, W, 3\), got shape \(24, 24\)"):
        psnr_ssim(noisy[..., 0], clean)
    assert psnr_ssim(noisy * 1.5, clean)[0] < p  # the restored image is clipped to [0, 1], not refused
    with pytest.raises(ValueError, match=r"restored, clean: expected one shape, got \(12, 24, 3\) and \(24, 24, 3\)"):
        psnr_ssim(noisy[:12], clean)


def test_fft_loss_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 8, 10, generator=g), torch.rand(2, 3, 8, 10, generator=g)
    fa, fb = torch.fft.rfft2(a), torch.fft.rfft2(b)
    expected = torch.cat([(fa.real - fb.real).abs().flatten(), (fa.imag - fb.imag).abs().flatten()]).mean()
    assert fft_loss(a, b).item() == pytest.approx(expected.item(), rel=1e-6)


def test_two_steps_then_resume(tmp_path):
    cfg = TrainConfig(config="tiny", tasks=("noise25", "haze"), crop=32, batch_size=2, steps=2, out=str(tmp_path),
                      progress=False)
    model, summary = train(cfg)
    assert summary["steps"] == 2 and summary["images"] == 4
    assert all(torch.isfinite(torch.tensor(summary[k])) for k in ("loss", "l1", "fft", "aux"))
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "train_state.pt").is_file()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    cfg.steps, cfg.resume = 4, True
    model2, summary2 = train(cfg)
    assert summary2["steps"] == 4 and summary2["images"] == 4  # two more steps, not four
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["step"] == 4 and state["optimizer"]["state"]
    assert any(not torch.equal(first[k], v) for k, v in model2.state_dict().items())


def test_resume_from_a_damaged_state_is_a_clear_error(tmp_path):
    # a damaged train_state.pt raised torch.load's pickle error (suggesting weights_only=False) from
    # the CLI as a traceback; now a CheckpointError naming the file, before anything is loaded
    from moce_fast.models import CheckpointError

    cfg = TrainConfig(config="tiny", tasks=("noise25",), crop=32, batch_size=2, steps=1, out=str(tmp_path),
                      progress=False)
    train(cfg)
    state = tmp_path / "train_state.pt"
    cfg.steps, cfg.resume = 2, True
    state.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"resume: '.*train_state.pt' is not a readable training state "
                                              r"\(UnpicklingError: .*\); delete it"):
        train(cfg)
    torch.save({"step": 1}, state)
    with pytest.raises(CheckpointError, match=r"holds no training state: expected the keys \['optimizer', 'step', "
                                              r"'elapsed'\], got \['step'\]"):
        train(cfg)


def test_bad_train_config():
    with pytest.raises(ValueError, match="steps or minutes"):
        train(TrainConfig())
    with pytest.raises(ValueError, match="minutes"):
        train(TrainConfig(minutes=0))


def test_torchrun_two_gloo_processes_keep_replicas_equal(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(Path(__file__).parent / "_ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(s["world_size"] == 2 and s["steps"] == 3 and s["replicas_in_sync"] for s in summaries)
    w0, w1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(2))
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    import moce_fast

    torch.manual_seed(0)  # the trainer's initialisation: the weights must have moved from it
    init = moce_fast.MoCEIR.from_config("tiny").state_dict()
    assert any(not torch.equal(init[k], w0[k]) for k in init)


def test_evaluate_counts_usage_per_task():
    import moce_fast

    torch.manual_seed(0)
    model = moce_fast.MoCEIR.from_config("tiny")
    photos = bundled_photos(("astronaut",))
    result = evaluate(model, photos, ["noise25", "rain", "haze"], crop=32, crops_per_task=3, batch_size=4)
    assert set(result.metrics) == {"noise25", "rain", "haze"}
    assert all(m["n"] == 3 for m in result.metrics.values())
    assert len(result.usage) == 2  # the tiny config has two decoder blocks
    for counts in result.usage.values():
        assert counts.shape == (3, 4) and counts.sum(axis=1).tolist() == [3, 3, 3]
    assert "PSNR in" in result.table() and "noise25" in result.usage_table()
    y = evaluate(model, photos, ["noise25"], crop=32, crops_per_task=1, y_channel=True)
    assert y.metrics["noise25"]["psnr_in"] != result.metrics["noise25"]["psnr_in"]
