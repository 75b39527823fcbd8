"""Evaluation on held-out crops: PSNR/SSIM per task (scikit-image's metrics) and expert usage per
task and MoCE layer, as tables and a heatmap."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import DegradedCrops
from ..data.degrade import check_image
from ..nn import MoCELayer


def psnr_ssim(restored: np.ndarray, clean: np.ndarray, y_channel: bool = False) -> tuple[float, float]:
    """PSNR (dB) and SSIM of float (H, W, 3) images in [0, 1]; on RGB, or on the Y (luma) channel of
    YCbCr as restoration papers often report."""
    from skimage.color import rgb2ycbcr
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    check_image(restored, "restored", values=False)  # (clipped below: a model's output may overshoot)
    check_image(clean, "clean")
    if restored.shape != clean.shape:
        raise ValueError(f"restored, clean: expected one shape, got {restored.shape} and {clean.shape}")
    restored = np.clip(restored, 0.0, 1.0)
    if y_channel:
        a, b = rgb2ycbcr(restored)[..., 0], rgb2ycbcr(clean)[..., 0]
        return (float(peak_signal_noise_ratio(b, a, data_range=255.0)),
                float(structural_similarity(b, a, data_range=255.0)))
    return (float(peak_signal_noise_ratio(clean, restored, data_range=1.0)),
            float(structural_similarity(clean, restored, data_range=1.0, channel_axis=-1)))


@dataclass
class EvalResult:
    tasks: list[str]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    usage: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> (tasks, experts) counts
    samples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    y_channel: bool = False

    def table(self) -> str:
        space = "Y" if self.y_channel else "RGB"
        lines = [f"{'task':<14} {'n':>3}  {'PSNR in':>8} {'PSNR out':>8} {'gain':>6}  {'SSIM in':>7} {'SSIM out':>8}"
                 f"   ({space}, dB)"]
        for t in self.tasks:
            m = self.metrics[t]
            lines.append(f"{t:<14} {m['n']:>3}  {m['psnr_in']:8.2f} {m['psnr_out']:8.2f} "
                         f"{m['psnr_out'] - m['psnr_in']:+6.2f}  {m['ssim_in']:7.4f} {m['ssim_out']:8.4f}")
        return "\n".join(lines)

    def usage_table(self) -> str:
        lines = []
        for layer, counts in self.usage.items():
            frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
            lines.append(f"{layer}: fraction of images per expert (cheap -> dear)")
            for t, row in zip(self.tasks, frac):
                lines.append(f"  {t:<14} " + " ".join(f"{v:5.2f}" for v in row))
        return "\n".join(lines)


def _to_hwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().permute(1, 2, 0).numpy()


@torch.no_grad()
def evaluate(model: torch.nn.Module, photos, tasks, crop: int = 128, crops_per_task: int = 8, seed: int = 12345,
             y_channel: bool = False, batch_size: int = 8) -> EvalResult:
    """Degrade ``crops_per_task`` held-out crops per task (deterministic for ``seed``), restore them,
    and measure. Expert usage is read from every MoCE layer's ``last_routing``."""
    tasks = list(tasks)
    data = DegradedCrops(photos, tuple(tasks), crop, length=len(tasks) * crops_per_task, seed=seed)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoCELayer)]
    usage = {n: np.zeros((len(tasks), m.num_experts), np.int64) for n, m in layers}
    sums = defaultdict(lambda: defaultdict(float))
    result = EvalResult(tasks, y_channel=y_channel)
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        degraded = torch.stack([it[0] for it in items]).to(device, dtype)
        clean = torch.stack([it[1] for it in items])
        task_ids = [it[2] for it in items]
        restored = model(degraded).clamp(0, 1)
        for n, m in layers:
            for t, experts in zip(task_ids, m.last_routing[0].cpu().tolist()):
                for e in experts:
                    usage[n][t, e] += 1
        for d, r, c, t in zip(degraded, restored, clean, task_ids):
            d, r, c = _to_hwc(d), _to_hwc(r), _to_hwc(c)
            p_in, s_in = psnr_ssim(d, c, y_channel)
            p_out, s_out = psnr_ssim(r, c, y_channel)
            acc = sums[tasks[t]]
            acc["psnr_in"] += p_in
            acc["psnr_out"] += p_out
            acc["ssim_in"] += s_in
            acc["ssim_out"] += s_out
            acc["n"] += 1
            result.samples.setdefault(tasks[t], (d, r, c))
    for t in tasks:
        n = sums[t]["n"]
        result.metrics[t] = {k: (v / n if k != "n" else int(v)) for k, v in sums[t].items()}
    result.usage = usage
    model.train(was_training)
    return result


def expert_usage_heatmap(result: EvalResult, path, title: str = "Expert usage per task") -> None:
    """PNG heatmap: one panel per MoCE layer, tasks x experts, fraction of each task's images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(result.usage)
    cols = min(len(layers), 5)
    rows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 1.5, 0.35 * len(result.tasks) * rows + 1.5 * rows),
                             squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers):
        counts = result.usage[layer]
        frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(frac, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(layer.replace(".layers.", ".").replace(".adapter", ""), fontsize=8)
        ax.set_xticks(range(frac.shape[1]))
        ax.set_xticklabels([f"e{e}" for e in range(frac.shape[1])], fontsize=7)
        ax.set_yticks(range(len(result.tasks)))
        ax.set_yticklabels(result.tasks if ax in axes[:, 0] else [], fontsize=7)
    fig.suptitle(f"{title} (experts e0 cheap -> e{counts.shape[1] - 1} dear)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
