"""Backbone op benchmarks (issue 7), per op, so a GPU session can see which piece of the model's
time is where: the reference module's computation, moce_fast's torch backend and its triton
backend, side by side in one run.

Cases: the three full-resolution-to-latent widths of MoCE-IR (48 channels at 256x256, 96 at 128x128,
192 at 64x64; heads 1, 2, 4), batch 1 and 8 (8 at 128x128 for 48 channels), forward (eval) and
forward+backward, float32 (TF32 products everywhere, as bench_model.py) and bfloat16 on a GPU:
- norm-qkv: LayerNorm + the MDTA qkv 1x1 (C -> 3C);
- mdta: the whole MDTA after the norm (qkv 1x1, depthwise 3x3, attention, project_out, residual);
- gdfn: the whole GDFN after the norm (project_in, depthwise 3x3, gate, project_out, residual).
Implementations: reference (moce_fast.reference's modules, the public model's math), torch and
triton (moce_fast.nn's blocks' calls on that backend; triton on a GPU only: interpreter timings
mean nothing). Run: pytest bench/bench_backbone.py --benchmark-only [--benchmark-json=FILE]
"""

from __future__ import annotations

import pytest
import torch

import moce_fast
from moce_fast import nn as fnn
from moce_fast.nn.layers import norm_then
from moce_fast.reference import layers as ref

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
LEVELS = [(48, 1, 256), (96, 2, 128), (192, 4, 64)]
DTYPES = ["fp32", "bf16"] if GPU else ["fp32"]


@pytest.fixture(autouse=True)
def _tf32_everywhere():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


def _modules(dim, heads, dt):
    torch.manual_seed(0)
    norm, attn, ffn = fnn.LayerNorm(dim), fnn.Attention(dim, heads, False), fnn.FeedForward(dim, 2.0, False)
    with torch.no_grad():  # random weights; norm weights and temperatures around 1, like trained ones
        for m in (norm, attn, ffn):
            for name, p in m.named_parameters():
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith(("body.weight", "temperature")) else 0.0))
    return [m.to(DEVICE, dt) for m in (norm, attn, ffn)]


def _case(op, impl, norm, attn, ffn, x):
    if impl == "reference":  # the reference modules' own forward (nn subclasses keep it as super())
        if op == "norm-qkv":
            return lambda: torch.nn.functional.conv2d(ref.LayerNorm.forward(norm, x), attn.qkv.weight)
        if op == "mdta":
            return lambda: x + ref.Attention.forward(attn, ref.LayerNorm.forward(norm, x))
        return lambda: x + ref.FeedForward.forward(ffn, ref.LayerNorm.forward(norm, x))
    if op == "norm-qkv":
        return lambda: norm_then(norm, x, [attn.qkv])[0]
    if op == "mdta":
        return lambda: attn.attend(norm_then(norm, x, [attn.qkv])[0], residual=x)
    return lambda: ffn.from_hidden(norm_then(norm, x, [ffn.project_in])[0], residual=x)


# impl outermost: every implementation of one case runs back to back (this VM's speed drifts)
@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: f"C{lv[0]}")
@pytest.mark.parametrize("op", ["norm-qkv", "mdta", "gdfn"])
def test_backbone_op(benchmark, impl, op, level, batch, dtype, mode):
    if impl == "triton" and not GPU:
        pytest.skip("triton: needs a CUDA device")
    dim, heads, side = level
    if batch == 8 and side == 256:
        side = 128
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    norm, attn, ffn = _modules(dim, heads, dt)
    train = mode == "fwd+bwd"
    x = torch.randn(batch, dim, side, side, device=DEVICE, dtype=dt, requires_grad=train)
    call = _case(op, impl, norm, attn, ffn, x)
    benchmark.group = f"backbone {op} C={dim} {side}x{side} B={batch} {dtype} {mode}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if GPU else "CPU", impl=impl)
    grad = torch.randn_like(call()) if train else None

    leaves = [x, *norm.parameters(), *attn.parameters(), *ffn.parameters()]

    def run():
        with moce_fast.backend("triton" if impl == "triton" else "torch"):
            if train:
                for t in leaves:  # as a training loop's zero_grad(set_to_none=True): no accumulation timed
                    t.grad = None
                call().backward(grad)
            else:
                with torch.no_grad():
                    call()
        if GPU:
            torch.cuda.synchronize()

    run()  # warm-up (kernel compilation)
    benchmark.pedantic(run, rounds=10 if GPU else 3, warmup_rounds=0)
