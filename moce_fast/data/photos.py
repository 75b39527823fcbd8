"""Clean photos: the ones scikit-image ships (no network needed), or a folder of the user's."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("moce_fast")

# scikit-image's bundled colour photos (all ship inside the package: no download).
BUNDLED = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry", "hubble_deep_field",
           "stereo_motorcycle")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class Photo:
    """A clean RGB photo, float32 (H, W, 3) in [0, 1], with a depth map (H, W) in [0, 1] (0 near,
    1 far) where a real one ships, else None."""

    def __init__(self, name: str, image: np.ndarray, depth: np.ndarray | None = None):
        self.name = name
        self.image = image
        self.depth = depth

    def __repr__(self):
        return f"Photo({self.name!r}, {self.image.shape}, depth={'real' if self.depth is not None else 'none'})"


def to_rgb_float(img: np.ndarray, source: str) -> np.ndarray:
    """Any 2-D/3-D image array -> float32 (H, W, 3) in [0, 1]; grayscale is replicated, alpha dropped."""
    from skimage import color, util

    if img.ndim == 2:
        log.info("%s: grayscale, converted to RGB", source)
        img = color.gray2rgb(img)
    elif img.ndim == 3 and img.shape[-1] == 4:
        img = color.rgba2rgb(img)
    elif img.ndim == 3 and img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"{source}: expected an RGB, RGBA or grayscale image, got an array of shape {img.shape}")
    return util.img_as_float32(img).clip(0.0, 1.0)


def _depth_from_disparity(disparity: np.ndarray) -> np.ndarray:
    """Depth is inversely proportional to disparity; holes (disparity <= 0) are filled from neighbours."""
    from scipy import ndimage

    d = disparity.astype(np.float64)
    valid = np.isfinite(d) & (d > 0)
    if not valid.all():
        # nearest valid pixel fills each hole
        idx = ndimage.distance_transform_edt(~valid, return_distances=False, return_indices=True)
        d = d[tuple(idx)]
    depth = 1.0 / d
    depth = (depth - depth.min()) / max(depth.max() - depth.min(), 1e-12)
    return depth.astype(np.float32)


def bundled_photos(names=BUNDLED) -> list[Photo]:
    """scikit-image's bundled photos; stereo_motorcycle comes with depth from its disparity map."""
    from skimage import data

    photos = []
    for name in names:
        if name == "stereo_motorcycle":
            left, _, disparity = data.stereo_motorcycle()
            photos.append(Photo(name, to_rgb_float(left, name), _depth_from_disparity(disparity)))
        else:
            photos.append(Photo(name, to_rgb_float(getattr(data, name)(), name)))
    return photos


def folder_photos(folder) -> list[Photo]:
    """Every image file in ``folder`` (not recursive). Raises a clear error for a missing or empty
    folder and for a file that cannot be read as an image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data: {str(folder)!r} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--data: {str(folder)!r} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return [Photo(p.stem, read_image(p)) for p in files]


def read_image(path) -> np.ndarray:
    """Read one image file as float32 (H, W, 3) in [0, 1]; a clear error if it is not an image."""
    from skimage import io

    try:
        img = io.imread(str(path))
    except Exception as err:  # imageio/PIL raise many types for a non-image
        raise ValueError(f"{path}: cannot be read as an image ({type(err).__name__}: {err})") from err
    return to_rgb_float(np.asarray(img), str(path))
