"""Degradation synthesis and photo loading."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import io

from moce_fast.data import (TASKS, DegradedCrops, bundled_photos, degrade, folder_photos, gaussian_noise, haze,
                            line_kernel, rain_streaks, read_image, split_photos, synthetic_depth, transmission)


def grey(h=128, w=128, level=0.5):
    return np.full((h, w, 3), level, np.float32)


@pytest.mark.parametrize("sigma", [15, 25, 50])
def test_noise_std_matches_sigma(sigma):
    clean = grey(256, 256)
    noisy = gaussian_noise(clean, np.random.default_rng(0), sigma)
    std = ((noisy - clean) * 255.0).std()
    assert abs(std - sigma) / sigma < 0.05
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0
    assert np.allclose(noisy * 255.0, np.round(noisy * 255.0), atol=1e-3)  # quantised to 8 bits


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_image(task):
    rng_img = np.random.default_rng(5)
    clean = rng_img.random((48, 40, 3), dtype=np.float32)
    a = degrade(clean, task, np.random.default_rng(123))
    b = degrade(clean, task, np.random.default_rng(123))
    c = degrade(clean, task, np.random.default_rng(124))
    assert a.dtype == np.float32 and a.shape == clean.shape
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert not np.allclose(a, clean)


@pytest.mark.parametrize("task", TASKS)
def test_bad_images_are_named(task):
    # what the degradations do not take is an error naming it (an 8-bit image came out almost all
    # ones, a grayscale one failed in scipy or broadcast, values out of range were clipped silently)
    rng = np.random.default_rng(0)
    clean = rng.random((16, 16, 3), dtype=np.float32)
    cases = [((clean * 255).astype(np.uint8), ValueError, r"img: expected a float image with values in \[0, 1\], "
              r"got uint8 \(moce_fast.data.to_rgb_float"),
             (clean[..., 0], ValueError, r"img: expected an RGB image \(H, W, 3\), got shape \(16, 16\)"),
             (np.concatenate([clean, clean[..., :1]], -1), ValueError, r"got shape \(16, 16, 4\)"),
             (clean * 2, ValueError, r"img: expected finite values in \[0, 1\], got \[0(\.\d+)?, 1\.9"),
             (np.where(clean > 0.5, np.nan, clean), ValueError, "expected finite values"),
             (clean[:0], ValueError, r"got shape \(0, 16, 3\)"),
             (clean.tolist(), TypeError, "img: expected a numpy image")]
    for img, error, match in cases:
        with pytest.raises(error, match=match):
            degrade(img, task, rng)
    assert degrade(clean.astype(np.float64), task, rng).dtype == np.float32  # any float dtype


def test_haze_transmission_decreases_with_depth():
    depth = np.linspace(0.0, 1.0, 50, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    t = transmission(depth, beta=1.5)
    assert np.all(np.diff(t[:, 0]) < 0)
    assert t[0, 0] == pytest.approx(1.0) and t[-1, 0] == pytest.approx(np.exp(-1.5), rel=1e-6)
    clean = grey(50, 4, 0.2)
    hazy = haze(clean, np.random.default_rng(0), depth=depth, beta=1.5, airlight=0.9)
    dist_to_airlight = np.abs(hazy[:, 0, 0] - 0.9)
    assert np.all(np.diff(dist_to_airlight) < 0)  # farther: closer to the airlight


def test_synthetic_depth_is_smooth_and_normalised():
    d = synthetic_depth(64, 80, np.random.default_rng(0))
    assert d.shape == (64, 80) and d.min() == 0.0 and d.max() == pytest.approx(1.0)
    assert np.abs(np.diff(d, axis=0)).max() < 0.1  # smooth
    assert d[:8].mean() > d[-8:].mean()  # far at the top


def test_motorcycle_depth_comes_from_its_disparity():
    from skimage import data

    photo = [p for p in bundled_photos(("stereo_motorcycle",))][0]
    _, _, disparity = data.stereo_motorcycle()
    assert photo.depth.shape == disparity.shape and photo.depth.min() >= 0 and photo.depth.max() <= 1
    valid = disparity > 0
    # depth ~ 1/disparity: larger disparity (nearer) gives smaller depth
    near = photo.depth[valid & (disparity > np.percentile(disparity[valid], 90))].mean()
    far = photo.depth[valid & (disparity < np.percentile(disparity[valid], 10))].mean()
    assert near < far


def test_rain_adds_bright_streaks_along_the_angle():
    clean = grey(96, 96, 0.3)
    rainy = rain_streaks(clean, np.random.default_rng(1), angle=0.0, length=15, density=0.005)
    diff = rainy[..., 0] - clean[..., 0]
    assert diff.min() >= 0 and diff.max() > 0.3
    # vertical streaks: brightening correlates along columns more than along rows
    col = np.corrcoef(diff[:-1].ravel(), diff[1:].ravel())[0, 1]
    row = np.corrcoef(diff[:, :-1].ravel(), diff[:, 1:].ravel())[0, 1]
    assert col > row + 0.3


def test_line_kernel():
    k = line_kernel(9, 90.0)
    assert k.sum() == pytest.approx(1.0) and np.count_nonzero(k) == 9
    assert np.count_nonzero(k[k.shape[0] // 2]) == 9  # 90 degrees from vertical: horizontal


def test_crops_are_deterministic_and_cycle_tasks():
    photos = bundled_photos(("chelsea", "stereo_motorcycle"))
    ds = DegradedCrops(photos, ("noise25", "haze"), 32, length=10, seed=3)
    d0, c0, t0 = ds[0]
    d0b, c0b, _ = DegradedCrops(photos, ("noise25", "haze"), 32, length=10, seed=3)[0]
    assert d0.shape == (3, 32, 32) and t0 == 0 and ds[1][2] == 1
    assert d0.equal(d0b) and c0.equal(c0b)
    big = DegradedCrops(photos, ("noise25",), 600, length=1, seed=0)[0]  # larger than the photos: reflected
    assert big[0].shape == (3, 600, 600)
    side = max(max(p.image.shape[:2]) for p in photos)
    assert DegradedCrops(photos, ("noise25",), 4 * side, length=1)[0][0].shape == (3, 4 * side, 4 * side)
    with pytest.raises(ValueError, match=rf"crop: expected at most 4 x the largest photo's side \({side} px"):
        DegradedCrops(photos, ("noise25",), 4 * side + 1, length=1)  # (100000 asked numpy for 112 GiB)
    # the other arguments checked where the dataset is made (an unknown task failed at the first
    # item of that task; a zero crop made empty crops)
    for kwargs, error, match in [({"tasks": ("snow",)}, ValueError, r"task: expected one of .* got 'snow'"),
                                 ({"tasks": "rain"}, ValueError, "tasks: expected a sequence of at least one"),
                                 ({"tasks": ()}, ValueError, "tasks: expected a sequence of at least one"),
                                 ({"crop": 0}, ValueError, "crop: expected a positive int, got 0"),
                                 ({"crop": 32.0}, TypeError, r"crop: expected a positive int, got 32.0 \(float\)"),
                                 ({"length": -1}, ValueError, "length: expected at least 0, got -1")]:
        args = dict(tasks=("noise25",), crop=32, length=2) | kwargs
        with pytest.raises(error, match=match):
            DegradedCrops(photos, **args)
    assert len(DegradedCrops(photos, ("noise7",), 32, length=0)) == 0  # noise<sigma>, an empty dataset


def test_split_holds_out_photos():
    photos = bundled_photos()
    train, held = split_photos(photos)
    assert {p.name for p in held} == {"astronaut", "chelsea"}
    assert not {p.name for p in train} & {p.name for p in held}


def test_folder_photos_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="holds no images"):
        folder_photos(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        folder_photos(tmp_path / "missing")
    io.imsave(tmp_path / "gray.png", (np.random.default_rng(0).random((20, 30)) * 255).astype(np.uint8))
    io.imsave(tmp_path / "rgba.png", np.zeros((10, 12, 4), np.uint8) + 200)
    photos = folder_photos(tmp_path)
    assert [p.name for p in photos] == ["gray", "rgba"]
    assert all(p.image.shape[-1] == 3 and p.image.dtype == np.float32 for p in photos)
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg: cannot be read as an image"):
        read_image(tmp_path / "broken.jpg")
