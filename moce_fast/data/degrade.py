"""Degradation synthesis on clean photos, deterministic for a seed.

Every function takes a float (H, W, 3) image in [0, 1] (anything else is an error naming it) and a
``numpy.random.Generator`` and returns the degraded image, float32 in [0, 1]. Parameters left as
None are drawn from the generator, so one seed gives one image.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

TASKS = ("noise15", "noise25", "noise50", "rain", "haze", "motion_blur", "gaussian_blur", "lowlight")


def check_image(img, name: str = "img", values: bool = True) -> np.ndarray:
    """``img`` if it is a float (H, W, 3) numpy image and (``values``) its values are finite and in
    [0, 1], else an error naming ``name``: what the degradations and the metrics take (an 8-bit
    image gave a degraded image of almost all ones, and a PSNR against the 0-255 scale)."""
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{name}: expected a numpy image (H, W, 3), got {type(img).__name__}")
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"{name}: expected an RGB image (H, W, 3), got shape {img.shape} "
                         f"(moce_fast.data.to_rgb_float converts grayscale and RGBA)")
    if not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"{name}: expected a float image with values in [0, 1], got {img.dtype} "
                         f"(moce_fast.data.to_rgb_float or skimage.util.img_as_float convert 8-bit images)")
    if values:
        lo, hi = float(img.min()), float(img.max())
        if not (0.0 <= lo and hi <= 1.0):  # (NaN fails both)
            raise ValueError(f"{name}: expected finite values in [0, 1], got [{lo:g}, {hi:g}]")
    return img


def _rgb_convolve(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.convolve(img[..., c], kernel, mode="reflect") for c in range(img.shape[-1])], axis=-1)


def line_kernel(length: int, angle_deg: float) -> np.ndarray:
    """A normalised line of ``length`` pixels through the centre of a square kernel, at
    ``angle_deg`` from the vertical (0 = vertical, positive leans right)."""
    from skimage.draw import line

    length = max(int(length), 1)
    size = length if length % 2 else length + 1
    c = size // 2
    a = math.radians(angle_deg)
    dy, dx = (length - 1) / 2 * math.cos(a), (length - 1) / 2 * math.sin(a)
    k = np.zeros((size, size), np.float32)
    rr, cc = line(int(round(c - dy)), int(round(c - dx)), int(round(c + dy)), int(round(c + dx)))
    k[rr, cc] = 1.0
    return k / k.sum()


def gaussian_noise(img, rng, sigma: float = 25.0) -> np.ndarray:
    """Additive white Gaussian noise of std ``sigma`` on the 0-255 scale, then clipped and quantised
    to 8 bits, as the MoCE-IR/PromptIR evaluation does."""
    img = check_image(img)
    noisy = img.astype(np.float64) * 255.0 + rng.standard_normal(img.shape) * sigma
    return (np.round(np.clip(noisy, 0.0, 255.0)) / 255.0).astype(np.float32)


def rain_streaks(img, rng, angle: float | None = None, length: int | None = None,
                 density: float | None = None) -> np.ndarray:
    """Rain: a sparse layer of drops smeared by a line kernel (the streak), screened over the image."""
    img = check_image(img)
    angle = rng.uniform(-30.0, 30.0) if angle is None else angle
    length = int(rng.integers(9, 25)) if length is None else length
    density = rng.uniform(0.004, 0.012) if density is None else density
    h, w = img.shape[:2]
    drops = (rng.random((h, w)) < density) * rng.uniform(0.6, 1.0, (h, w))
    streaks = ndimage.convolve(drops.astype(np.float32), line_kernel(length, angle), mode="wrap")
    streaks = np.clip(streaks * length * 0.8, 0.0, 1.0)[..., None]
    return (1.0 - (1.0 - img) * (1.0 - streaks)).astype(np.float32)


def synthetic_depth(h: int, w: int, rng) -> np.ndarray:
    """A smooth depth map in [0, 1] (0 near, 1 far): far at the top, near at the bottom, plus a
    low-frequency random field."""
    ramp = np.linspace(1.0, 0.0, h, dtype=np.float64)[:, None] * np.ones((1, w))
    field = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=max(h, w) / 8, mode="reflect")
    field = field / max(np.abs(field).max(), 1e-12)
    depth = 0.75 * ramp + 0.25 * (field + 1) / 2
    return ((depth - depth.min()) / max(depth.max() - depth.min(), 1e-12)).astype(np.float32)


def transmission(depth: np.ndarray, beta: float) -> np.ndarray:
    """t = exp(-beta * d): the fraction of scene light that reaches the camera."""
    return np.exp(-beta * depth).astype(np.float32)


def haze(img, rng, depth: np.ndarray | None = None, beta: float | None = None,
         airlight: float | None = None) -> np.ndarray:
    """Atmospheric scattering model I = J t + A (1 - t), t = exp(-beta d)."""
    img = check_image(img)
    beta = rng.uniform(0.8, 2.0) if beta is None else beta
    airlight = rng.uniform(0.7, 1.0) if airlight is None else airlight
    if depth is None:
        depth = synthetic_depth(*img.shape[:2], rng)
    t = transmission(depth, beta)[..., None]
    return np.clip(img * t + airlight * (1.0 - t), 0.0, 1.0).astype(np.float32)


def motion_blur(img, rng, length: int | None = None, angle: float | None = None) -> np.ndarray:
    """Linear camera motion: convolution with a line kernel."""
    img = check_image(img)
    length = int(rng.integers(5, 16)) if length is None else length
    angle = rng.uniform(0.0, 180.0) if angle is None else angle
    return np.clip(_rgb_convolve(img, line_kernel(length, angle)), 0.0, 1.0).astype(np.float32)


def gaussian_blur(img, rng, sigma: float | None = None) -> np.ndarray:
    """Defocus-like Gaussian blur."""
    img = check_image(img)
    sigma = rng.uniform(1.0, 3.0) if sigma is None else sigma
    return np.stack([ndimage.gaussian_filter(img[..., c], sigma, mode="reflect") for c in range(3)],
                    axis=-1).astype(np.float32)


def low_light(img, rng, gamma: float | None = None, scale: float | None = None,
              noise: float | None = None) -> np.ndarray:
    """Low light: darker (gamma > 1, scale < 1) and noisier."""
    img = check_image(img)
    gamma = rng.uniform(1.5, 2.5) if gamma is None else gamma
    scale = rng.uniform(0.3, 0.6) if scale is None else scale
    noise = rng.uniform(0.005, 0.02) if noise is None else noise
    dark = scale * np.power(img, gamma) + rng.standard_normal(img.shape) * noise
    return np.clip(dark, 0.0, 1.0).astype(np.float32)


def check_task(task) -> str:
    """``task`` if :func:`degrade` knows it (one of :data:`TASKS`, or noise<sigma>), else a ValueError
    naming the choices."""
    if not isinstance(task, str) or not (task in TASKS or (task.startswith("noise") and task[5:].isdigit())):
        raise ValueError(f"task: expected one of {TASKS} (or noise<sigma>), got {task!r}")
    return task


def degrade(img: np.ndarray, task: str, rng, depth: np.ndarray | None = None) -> np.ndarray:
    """Apply the degradation named ``task`` (one of :data:`TASKS`, or noise<sigma>)."""
    check_task(task)  # (so every other name is a noise<sigma>)
    if task == "rain":
        return rain_streaks(img, rng)
    if task == "haze":
        return haze(img, rng, depth)
    if task == "motion_blur":
        return motion_blur(img, rng)
    if task == "gaussian_blur":
        return gaussian_blur(img, rng)
    if task == "lowlight":
        return low_light(img, rng)
    return gaussian_noise(img, rng, float(task[5:]))
