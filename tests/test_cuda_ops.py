"""The ops of the C++ extension moce_fast._C against float64 references.

Every op runs here on its CPU implementation (C++ loops with the same semantics), and on a GPU
on its CUDA kernel (those cases skip without a CUDA device). Outputs are poisoned with NaN before
launch (moce_fast._C.set_poison_outputs), inputs are fresh random values.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import moce_fast
from moce_fast import routing
from moce_fast.reference.layers import channel_layer_norm
from conftest import rel_err

pytestmark = pytest.mark.skipif(importlib.util.find_spec("moce_fast._C") is None,
                                reason="moce_fast._C was not built (needs a CUDA build of torch and nvcc)")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOL)


def cases(sizes, large):
    """(device, dtype, size) combinations; on CPU the large size runs in float32 only (time)."""
    out = []
    for device in DEVICES:
        for dtype in DTYPES:
            for hw in sizes:
                if device == "cpu" and hw == large and dtype != torch.float32:
                    continue
                marks = device.marks if hasattr(device, "marks") else ()
                dev = device.values[0] if hasattr(device, "values") else device
                out.append(pytest.param(dev, dtype, hw, marks=marks, id=f"{dev}-{str(dtype)[6:]}-{hw[0]}x{hw[1]}"))
    return out


@pytest.fixture(autouse=True)
def _poison():
    from moce_fast.ops import _cuda

    _cuda.set_poison_outputs(True)
    yield
    _cuda.set_poison_outputs(False)


def rand(*shape, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------ LayerNorm

@pytest.mark.parametrize("device,dtype,hw", cases([(1, 1), (7, 33), (33, 7), (130, 130)], large=(130, 130)))
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_forward_backward(device, dtype, hw, with_bias):
    c = 12
    x = rand(2, c, *hw, seed=1) * 3 + 0.5
    w, b = rand(c, seed=2), rand(c, seed=3)
    dy = rand(2, c, *hw, seed=4)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    yr = channel_layer_norm(xr, wr, br if with_bias else None)
    yr.backward(dy)
    xf, wf, bf = (t.to(device, dtype).clone().requires_grad_() for t in (x, w, b))
    y, mean, rstd = torch.ops.moce_fast.channel_layer_norm(xf, wf, bf if with_bias else None, 1e-5)
    assert y.dtype == dtype and not torch.isnan(y).any()
    assert rel_err(y, yr) < TOL[dtype]
    assert rel_err(mean, x.mean(1)) < max(TOL[dtype], 1e-6)
    y.backward(dy.to(device, dtype))
    assert rel_err(xf.grad, xr.grad) < 4 * TOL[dtype]
    assert rel_err(wf.grad, wr.grad) < 4 * TOL[dtype]
    if with_bias:
        assert rel_err(bf.grad, br.grad) < 4 * TOL[dtype]
    else:
        assert bf.grad is None


@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_gradcheck_and_opcheck(with_bias):
    x = rand(2, 5, 3, 4, seed=5).requires_grad_()
    w = rand(5, seed=6).requires_grad_()
    b = rand(5, seed=7).requires_grad_() if with_bias else None
    fn = lambda *a: torch.ops.moce_fast.channel_layer_norm(*a, 1e-5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    torch.library.opcheck(torch.ops.moce_fast.channel_layer_norm.default, (x, w, b, 1e-5))


def test_layer_norm_backend_cuda_is_used_by_ops_on_gpu_only():
    x = rand(1, 4, 3, 3, dtype=torch.float32)
    if torch.cuda.is_available():
        with moce_fast.backend("cuda"):
            moce_fast.ops.layer_norm(x.cuda(), torch.ones(4, device="cuda"), torch.zeros(4, device="cuda"))
        assert moce_fast.ops.last_run()["layer_norm"] == "cuda"
    with moce_fast.backend("auto"):
        moce_fast.ops.layer_norm(x, torch.ones(4), torch.zeros(4))
    assert moce_fast.ops.last_run()["layer_norm"] == "torch"  # auto on a CPU tensor


# -------------------------------------------------------------------------- grouped depthwise

def make_plan(b, e, k, seed, experts=None):
    g = torch.Generator().manual_seed(seed)
    if experts is None:
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(b)])
    else:
        idx = torch.tensor(experts).view(b, k)
    return routing.make_plan(idx, torch.rand(b, k, generator=g), e)


def reference_grouped(x, plan, expert, w, bias):
    lo, hi = plan.offsets[expert].item(), plan.offsets[expert + 1].item()
    return lo, hi, F.conv2d(x[plan.image[lo:hi]], w, bias, padding=w.shape[-1] // 2, groups=x.shape[1])


@pytest.mark.parametrize("device,dtype,hw", cases([(1, 1), (7, 33), (33, 7), (40, 130)], large=(40, 130)))
@pytest.mark.parametrize("k", [3, 7])
def test_grouped_dwconv_forward_backward(device, dtype, k, hw):
    b, e, top_k, c = 5, 3, 2, 6
    plan = make_plan(b, e, top_k, seed=k)
    x = rand(b, c, *hw, seed=10)
    w, bias = rand(c, 1, k, k, seed=11), rand(c, seed=12)
    for expert in range(e):
        dy = rand(b * top_k, c, *hw, seed=13 + expert)
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, bias))
        lo, hi, yr = reference_grouped(xr, plan, expert, wr, br)
        (yr * dy[lo:hi]).sum().backward()
        xf, wf, bf = (t.to(device, dtype).clone().requires_grad_() for t in (x, w, bias))
        y = torch.ops.moce_fast.grouped_dwconv(xf, plan.image.to(device), plan.offsets.to(device), expert, wf, bf)
        assert y.shape == (b * top_k, c, *hw)
        assert not torch.isnan(y[lo:hi]).any()
        if hi > lo:
            assert rel_err(y[lo:hi], yr) < TOL[dtype]
        (y[lo:hi].double() * dy[lo:hi].to(device)).sum().backward()
        if hi == lo:  # an expert with no image: zero gradients, allocated
            assert all(torch.count_nonzero(t.grad) == 0 for t in (xf, wf, bf))
            continue
        assert rel_err(xf.grad, xr.grad) < 4 * TOL[dtype]
        assert rel_err(wf.grad, wr.grad) < 8 * TOL[dtype]
        assert rel_err(bf.grad, br.grad) < 8 * TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_dwconv_empty_group_and_all_on_one_expert(device):
    b, c = 4, 3
    plan = make_plan(b, 3, 1, seed=0, experts=[2, 2, 2, 2])  # experts 0 and 1 get nothing
    x = rand(b, c, 9, 10, dtype=torch.float32, device=device, seed=1)
    w = rand(c, 1, 5, 5, dtype=torch.float32, device=device, seed=2)
    image, offsets = plan.image.to(device), plan.offsets.to(device)
    y0 = torch.ops.moce_fast.grouped_dwconv(x, image, offsets, 0, w, None)
    assert torch.isnan(y0).all()  # nothing written: every row stays poisoned
    y2 = torch.ops.moce_fast.grouped_dwconv(x, image, offsets, 2, w, None)
    assert rel_err(y2, F.conv2d(x, w, padding=2, groups=c)) < 1e-5
    dx, dw, db = torch.ops.moce_fast.grouped_dwconv_backward(torch.ones_like(y0), x, image, offsets, 0, w, True)
    assert torch.count_nonzero(dx) == 0 and torch.count_nonzero(dw) == 0 and torch.count_nonzero(db) == 0


def test_grouped_dwconv_gradcheck_and_opcheck():
    plan = make_plan(3, 2, 1, seed=3, experts=[1, 0, 1])
    x = rand(3, 2, 5, 6, seed=4).requires_grad_()
    w = rand(2, 1, 3, 3, seed=5).requires_grad_()
    bias = rand(2, seed=6).requires_grad_()
    lo, hi = plan.offsets[1].item(), plan.offsets[2].item()

    def fn(x, w, bias):
        return torch.ops.moce_fast.grouped_dwconv(x, plan.image, plan.offsets, 1, w, bias)[lo:hi]

    assert torch.autograd.gradcheck(fn, (x, w, bias))
    # opcheck compares against unspecified rows too, so it runs on a plan where one expert owns all rows
    full = make_plan(3, 2, 1, seed=3, experts=[1, 1, 1])
    torch.library.opcheck(torch.ops.moce_fast.grouped_dwconv.default, (x, full.image, full.offsets, 1, w, bias))


def test_grouped_dwconv_op_and_bad_input():
    plan = make_plan(2, 2, 1, seed=0, experts=[0, 1])
    x = rand(2, 3, 4, 4, dtype=torch.float32)
    w = rand(3, 1, 3, 3, dtype=torch.float32)
    with moce_fast.backend("torch"):
        yt = moce_fast.ops.grouped_dwconv(x, plan.image, plan.offsets, 1, w)
    y = torch.ops.moce_fast.grouped_dwconv(x, plan.image, plan.offsets, 1, w, None)
    assert rel_err(y[1:2], yt[1:2]) < 1e-6
    with pytest.raises(RuntimeError, match="weight: expected shape"):
        torch.ops.moce_fast.grouped_dwconv(x, plan.image, plan.offsets, 0, rand(3, 1, 4, 4, dtype=torch.float32),
                                           None)
    with pytest.raises(RuntimeError, match="expert: expected 0 <= expert < 2"):
        torch.ops.moce_fast.grouped_dwconv(x, plan.image, plan.offsets, 2, w, None)
    with pytest.raises(RuntimeError, match="index: expected a contiguous 1-D int64 tensor, got 1-D Int"):
        torch.ops.moce_fast.grouped_dwconv(x, plan.image.int(), plan.offsets, 0, w, None)


# ------------------------------------------------------------------------------- routing plan

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,e,k", [(1, 4, 1), (8, 4, 1), (7, 4, 2), (300, 3, 3), (5, 64, 4), (0, 4, 1)])
def test_routing_plan_matches_torch(device, b, e, k):
    logits = rand(b, e, dtype=torch.float32, seed=b + e).to(device)
    idx, gates, order, image, gate_sorted, counts, offsets = torch.ops.moce_fast.routing_plan(logits, k)
    g_ref, i_ref = logits.cpu().double().softmax(-1).topk(k, dim=-1)
    assert torch.equal(idx.cpu(), i_ref)
    assert rel_err(gates.cpu(), g_ref) < 1e-6 if b else gates.numel() == 0
    plan = routing.make_plan(i_ref, g_ref.float(), e)
    for got, want in [(order, plan.order), (image, plan.image), (counts, plan.counts), (offsets, plan.offsets)]:
        assert torch.equal(got.cpu(), want)
    if b:
        assert rel_err(gate_sorted.cpu(), plan.gate) < 1e-6


def test_routing_plan_op_and_errors():
    logits = rand(6, 4, dtype=torch.float32, seed=1).requires_grad_()
    with moce_fast.backend("torch"):
        idx_t, gates_t, plan_t = moce_fast.ops.routing_plan(logits, 2)
    idx, _, order, image, gate_sorted, counts, offsets = torch.ops.moce_fast.routing_plan(logits.detach(), 2)
    assert torch.equal(idx, idx_t) and torch.equal(order, plan_t.order) and torch.equal(offsets, plan_t.offsets)
    gates_t.sum().backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) > 0
    with pytest.raises(RuntimeError, match="k: expected 1 <= k <= E = 4"):
        torch.ops.moce_fast.routing_plan(logits.detach(), 5)
    with pytest.raises(RuntimeError, match="E <= 64"):
        torch.ops.moce_fast.routing_plan(rand(2, 65, dtype=torch.float32), 1)
    with pytest.raises(ValueError, match="k: expected"):
        moce_fast.ops.routing_plan(logits, 0)
    torch.library.opcheck(torch.ops.moce_fast.routing_plan.default, (logits.detach(), 2))
    # moce_fast.routing.make_plan (public): bad shapes and dtypes named, not an index_add_ error
    ids, g = torch.tensor([[0], [1]]), torch.ones(2, 1)
    for args, match in [((ids.float(), g, 4), r"indices: expected an int64 tensor \(B, k\), got \(\(2, 1\), "
                                                r"torch.float32\)"),
                        ((ids[:, 0], g, 4), r"indices: expected an int64 tensor \(B, k\), got \(\(2,\), torch.int64\)"),
                        ((ids, torch.ones(3, 1), 4), r"gates: expected the shape of indices \(2, 1\), got \(3, 1\)"),
                        ((ids, g, 0), "num_experts: expected a positive int, got 0"),
                        ((ids, g, 4.0), "num_experts: expected a positive int, got 4.0")]:
        with pytest.raises(ValueError, match=match):
            routing.make_plan(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_in_cuda_routing_and_dwconv():
    logits = rand(8, 4, dtype=torch.float32, device="cuda", seed=3)
    x = rand(8, 6, 16, 16, dtype=torch.float32, device="cuda", seed=4)
    w = rand(6, 1, 7, 7, dtype=torch.float32, device="cuda", seed=5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with moce_fast.backend("cuda"):
            _, _, plan = moce_fast.ops.routing_plan(logits, 1)
            for e in range(4):
                moce_fast.ops.grouped_dwconv(x, plan.image, plan.offsets, e, w)
    finally:
        torch.cuda.set_sync_debug_mode("default")
