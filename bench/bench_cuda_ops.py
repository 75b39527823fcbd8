"""CUDA C++ ops against their torch equivalents, side by side in one run (GPU only).

- channel LayerNorm on NCHW vs F.layer_norm after permutes (what the public model does);
- grouped depthwise 3x3 and 7x7 over the images routed to one expert vs index_select + torch's
  depthwise conv;
- the routing plan in one launch vs softmax + topk + sort + counts in torch.
Shapes: MoCE-IR decoder levels at 256 x 256 (192 channels at 64 x 64, 96 at 128 x 128, 48 at
256 x 256), batch 8. Each case records its effective bandwidth (minimal bytes / median time) and,
for reference, a device-to-device copy of the same bytes is benchmarked too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moce_fast
from moce_fast import routing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LEVELS = [(192, 64), (96, 128), (48, 256)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _bench(benchmark, fn, nbytes):
    fn()
    torch.cuda.synchronize()

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["bytes"] = nbytes


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("c,hw", LEVELS)
@pytest.mark.parametrize("impl", ["copy", "torch-permute-layer_norm", "cuda"])
def test_layer_norm(benchmark, impl, c, hw, dtype):
    dt = DTYPES[dtype]
    x = torch.randn(8, c, hw, hw, device="cuda", dtype=dt)
    w, b = torch.randn(c, device="cuda", dtype=dt), torch.randn(c, device="cuda", dtype=dt)
    benchmark.group = f"layer_norm C={c} {hw}x{hw} B=8 {dtype}"
    if impl == "copy":
        fn = x.clone
    elif impl == "cuda":
        fn = lambda: torch.ops.moce_fast.channel_layer_norm(x, w, b, 1e-5)  # noqa: E731
    else:
        fn = lambda: F.layer_norm(x.permute(0, 2, 3, 1), (c,), w, b, 1e-5).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    _bench(benchmark, fn, 2 * x.numel() * x.element_size())


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("c,hw", LEVELS)
@pytest.mark.parametrize("impl", ["copy", "torch-index_select-conv", "cuda"])
def test_grouped_dwconv(benchmark, impl, c, hw, k, dtype):
    dt = DTYPES[dtype]
    b = 8
    x = torch.randn(b, c, hw, hw, device="cuda", dtype=dt)
    w = torch.randn(c, 1, k, k, device="cuda", dtype=dt)
    bias = torch.randn(c, device="cuda", dtype=dt)
    idx = torch.tensor([[0], [1], [0], [1], [0], [1], [0], [1]], device="cuda")  # half the batch on expert 1
    plan = routing.make_plan(idx, torch.ones(b, 1, device="cuda", dtype=dt), 2)
    benchmark.group = f"grouped_dwconv k={k} C={c} {hw}x{hw} 4 of 8 images {dtype}"
    if impl == "copy":
        half = x[:4].clone()
        fn = half.clone
    elif impl == "cuda":
        fn = lambda: torch.ops.moce_fast.grouped_dwconv(x, plan.image, plan.offsets, 1, w, bias)  # noqa: E731
    else:
        rows = plan.image[4:]
        fn = lambda: F.conv2d(x.index_select(0, rows), w, bias, padding=k // 2, groups=c)  # noqa: E731
    _bench(benchmark, fn, 2 * 4 * c * hw * hw * x.element_size())


@pytest.mark.parametrize("b", [8, 64])
@pytest.mark.parametrize("impl", ["torch", "cuda"])
def test_routing_plan(benchmark, impl, b):
    logits = torch.randn(b, 4, device="cuda")
    benchmark.group = f"routing_plan B={b} E=4 k=1"
    with moce_fast.backend(impl):
        _bench(benchmark, lambda: moce_fast.ops.routing_plan(logits, 1), logits.numel() * 4)
