"""The AdaptIR adapter as a drop-in module for a host transformer's token layout."""

from __future__ import annotations

import math

from typing import Optional, Sequence

import torch

from .. import ops
from ..ops.adapter import AdapterParams, BatchStats, MixParams
from ..reference.adaptir import AdaptIR

LAYOUTS = ("nchw", "lnc", "nhwc")


class AdaptIRAdapter(AdaptIR):
    """AdaptIR (public parameter names; a new adapter is an exact no-op) on the host's layout:

    - ``"nchw"``: (N, C, H, W) maps;
    - ``"lnc"``: (L, N, C) tokens with L = H * W, H = W (IPT's layout);
    - ``"nhwc"``: (N, H, W, C) (EDT's layout).

    Returns the adapter's output in the input's layout; the host adds it to its MLP branch.
    """

    def __init__(self, dim: int, variant: str = "ipt", layout: str = "nchw"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        super().__init__(dim, variant)
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_layout(x, self.layout, self.d_model)
        return run_adapters([self], x, None)


def check_layout(t: torch.Tensor, layout: str, dim: int) -> None:
    """A clear ValueError unless ``t`` is a floating-point tensor in ``layout`` with ``dim`` channels."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    expected = {"nchw": "(N, C, H, W)", "lnc": "(L, N, C)", "nhwc": "(N, H, W, C)"}[layout]
    if t.dim() != len(expected.split(",")):
        raise ValueError(f"x: layout {layout!r} expects {expected}, got shape {tuple(t.shape)}")
    channels = t.shape[1] if layout == "nchw" else t.shape[-1]
    if channels != dim:
        raise ValueError(f"x: expected {dim} channels for layout {layout!r} {expected}, got shape {tuple(t.shape)}")
    if layout == "lnc" and math.isqrt(t.shape[0]) ** 2 != t.shape[0]:
        raise ValueError(f"x: layout 'lnc' needs a square token grid, L = H * W with H = W; got L = {t.shape[0]}")


def stack_params(adapters: Sequence[AdaptIR]) -> AdapterParams:
    """The parameters of several adapters (one per task) stacked along a leading task axis."""
    def st(get):
        # one task: views, no copies (the common single-adapter call stays cheap)
        return get(adapters[0]).unsqueeze(0) if len(adapters) == 1 else torch.stack([get(a) for a in adapters])

    mix = MixParams(
        st(lambda a: a.conv_weight_A), st(lambda a: a.conv_weight_B), st(lambda a: a.conv_bias),
        st(lambda a: a.amp_fuse.weight.view(-1)), st(lambda a: a.amp_fuse.bias),
        st(lambda a: a.pha_fuse.weight.view(-1)), st(lambda a: a.pha_fuse.bias),
        st(lambda a: a.compress.weight.view(-1)), st(lambda a: a.compress.bias.view(())),
        st(lambda a: a.proj[0].weight), st(lambda a: a.proj[0].bias),
        st(lambda a: a.proj[2].weight), st(lambda a: a.proj[2].bias),
        st(lambda a: a.channel_interaction[1].weight[:, :, 0, 0]), st(lambda a: a.channel_interaction[1].bias),
        st(lambda a: a.channel_interaction[3].weight[:, :, 0, 0]), st(lambda a: a.channel_interaction[3].bias),
        st(lambda a: a.spatial_interaction.weight.view(-1)), st(lambda a: a.spatial_interaction.bias.view(())))
    return AdapterParams(st(lambda a: a.head.weight[:, :, 0, 0]), st(lambda a: a.head.bias),
                         st(lambda a: a.BN.weight), st(lambda a: a.BN.bias),
                         st(lambda a: a.BN.running_mean), st(lambda a: a.BN.running_var), mix,
                         st(lambda a: a.tail.weight[:, :, 0, 0]))


@torch.no_grad()
def _update_running_stats(adapters: Sequence[AdaptIR], stats: BatchStats) -> None:
    """BatchNorm's running-statistics update for the tasks present in the batch (count > 0), all
    tasks at once (no loop of small ops per task on the device)."""
    bns = [a.BN for a in adapters]
    seen = stats.count > 0
    tracked = torch.stack([bn.num_batches_tracked for bn in bns]) + seen.long()
    momentum = bns[0].momentum
    if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
        m = (1.0 / tracked.clamp(min=1).double()).to(stats.mean.dtype)[:, None]
    else:
        m = torch.full_like(stats.mean[:, :1], momentum)
    m = torch.where(seen[:, None], m, torch.zeros_like(m))
    means = torch.stack([bn.running_mean for bn in bns])
    vars_ = torch.stack([bn.running_var for bn in bns])
    new_mean = means + (stats.mean.to(means.dtype) - means) * m.to(means.dtype)
    new_var = vars_ + (stats.var.to(vars_.dtype) - vars_) * m.to(vars_.dtype)
    torch._foreach_copy_([bn.running_mean for bn in bns], list(new_mean.unbind(0)))
    torch._foreach_copy_([bn.running_var for bn in bns], list(new_var.unbind(0)))
    torch._foreach_copy_([bn.num_batches_tracked for bn in bns], list(tracked.unbind(0)))


def run_adapters(adapters: Sequence[AdaptIR], x: torch.Tensor, task: Optional[torch.Tensor]) -> torch.Tensor:
    """Image i of ``x`` through ``adapters[task[i]]`` (all adapters on one batch, one grouped
    computation per stage); ``task`` None means one adapter for all images."""
    first = adapters[0]
    layout = getattr(first, "layout", "nchw")
    training = first.BN.training
    if training:
        channels = x.shape[1] if layout == "nchw" else x.shape[-1]
        if x.numel() // max(channels, 1) <= 1:
            raise ValueError(f"x: BatchNorm in training needs more than one value per channel, got shape "
                             f"{tuple(x.shape)}")
    out, stats = ops.adaptir(x, layout, stack_params(adapters), task, training, first.BN.eps)
    if stats is not None and first.BN.track_running_stats:
        _update_running_stats(adapters, stats)
    return out
