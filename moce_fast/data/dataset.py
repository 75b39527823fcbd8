"""Random crops of clean photos with synthesised degradations, as a torch Dataset."""

from __future__ import annotations

import numpy as np
import torch

from ..reference.layers import as_int, positive_int
from .degrade import check_task, degrade
from .photos import Photo


def split_photos(photos: list[Photo], held_out: tuple[str, ...] = ("astronaut", "chelsea")):
    """(train, eval) photos. The named photos are held out when present; otherwise the last quarter
    (at least one) is. A single photo serves both, evaluated on other crops."""
    eval_set = [p for p in photos if p.name in held_out]
    if not eval_set:
        eval_set = photos[-max(1, len(photos) // 4):]
    train_set = [p for p in photos if p not in eval_set] or list(photos)
    return train_set, eval_set


# A crop may be up to this many times the largest photo's side (smaller photos are reflected up).
MAX_CROP_FACTOR = 4


class DegradedCrops(torch.utils.data.Dataset):
    """Item ``i``: (degraded (3, crop, crop), clean (3, crop, crop), task index), both float32 in [0, 1].

    Deterministic: item ``i`` depends only on (seed, i). Tasks cycle with ``i`` so every batch mixes
    them; the photo and the crop position are drawn. A photo smaller than the crop is reflected up.
    """

    def __init__(self, photos: list[Photo], tasks: tuple[str, ...], crop: int, length: int, seed: int = 0):
        if not photos:
            raise ValueError("photos: expected at least one photo")
        if isinstance(tasks, str) or not tasks:
            raise ValueError(f"tasks: expected a sequence of at least one task name, got {tasks!r}")
        for t in tasks:
            check_task(t)
        crop, length, seed = positive_int("crop", crop), as_int("length", length), as_int("seed", seed)
        if length < 0:
            raise ValueError(f"length: expected at least 0, got {length}")
        side, name = max((max(p.image.shape[:2]), p.name) for p in photos)
        if crop > MAX_CROP_FACTOR * side:  # (reflected up that far, a crop is mostly mirror copies)
            raise ValueError(f"crop: expected at most {MAX_CROP_FACTOR} x the largest photo's side "
                             f"({side} px, {name!r}), got {crop}")
        self.photos, self.tasks, self.crop, self.length, self.seed = photos, tuple(tasks), crop, length, seed

    def __len__(self):
        return self.length

    def sample(self, i: int):
        rng = np.random.default_rng([self.seed, i])
        task_id = i % len(self.tasks)
        photo = self.photos[int(rng.integers(len(self.photos)))]
        img, depth = photo.image, photo.depth
        h, w = img.shape[:2]
        c = self.crop
        if h < c or w < c:
            pad = ((0, max(0, c - h)), (0, max(0, c - w)))
            img = np.pad(img, pad + ((0, 0),), mode="reflect")
            depth = None if depth is None else np.pad(depth, pad, mode="reflect")
            h, w = img.shape[:2]
        top, left = int(rng.integers(h - c + 1)), int(rng.integers(w - c + 1))
        clean = np.ascontiguousarray(img[top:top + c, left:left + c])
        d = None if depth is None else depth[top:top + c, left:left + c]
        degraded = degrade(clean, self.tasks[task_id], rng, d)
        return degraded, clean, task_id

    def __getitem__(self, i):
        degraded, clean, task_id = self.sample(i)
        to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))  # noqa: E731
        return to_t(degraded), to_t(clean), task_id
