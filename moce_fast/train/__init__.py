"""Training, evaluation and restoration on real photos."""

from .evaluate import EvalResult, evaluate, expert_usage_heatmap, psnr_ssim
from .losses import fft_loss, restoration_loss
from .trainer import TrainConfig, train

__all__ = ["EvalResult", "TrainConfig", "evaluate", "expert_usage_heatmap", "fft_loss", "psnr_ssim",
           "restoration_loss", "train"]
