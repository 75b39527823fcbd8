"""Clean photos, degradation synthesis and training crops."""

from .dataset import DegradedCrops, split_photos
from .degrade import (TASKS, degrade, gaussian_blur, gaussian_noise, haze, line_kernel, low_light, motion_blur,
                      rain_streaks, synthetic_depth, transmission)
from .photos import BUNDLED, Photo, bundled_photos, folder_photos, read_image, to_rgb_float

__all__ = ["BUNDLED", "DegradedCrops", "Photo", "TASKS", "bundled_photos", "degrade", "folder_photos",
           "gaussian_blur", "gaussian_noise", "haze", "line_kernel", "low_light", "motion_blur", "rain_streaks",
           "read_image", "split_photos", "synthetic_depth", "to_rgb_float", "transmission"]
