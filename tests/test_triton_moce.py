"""The triton backend of the MoCE experts against the float64 reference.

Without a GPU the kernels run through the Triton interpreter on CPU tensors (float32 only: the
interpreter gets bfloat16 wrong); with a GPU they run compiled, on CUDA tensors, in float32 and
bfloat16.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moce_fast
from conftest import rel_err
from test_moce_layer import layer_inputs, make_layers

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytestmark = pytest.mark.skip(reason="no GPU and TRITON_INTERPRET is not 1")
# tf32 on a GPU (tl.dot default); exact fp32 arithmetic in the interpreter
TOL32 = 3e-4 if ON_GPU else 2e-5


@pytest.fixture(autouse=True)
def _poison():
    """Every output and scratch buffer of the Triton ops starts as NaN: an element a kernel fails
    to write shows up."""
    moce_fast.ops.set_poison_outputs(True)
    yield
    moce_fast.ops.set_poison_outputs(False)


def run_layer(layer, x, f, s, idx=None, gates=None, backend="triton"):
    with moce_fast.backend(backend):
        return layer(x, f, s, expert_indices=idx, expert_gates=gates)


def check_case(dim, num_experts, top_k, b, h, w, route, seed=0, grads=True):
    fast, ref = make_layers(dim=dim, num_experts=num_experts, top_k=top_k, freq_dim=6, seed=seed)
    x, s, f = layer_inputs(b, dim=dim, h=h, w=w, freq_dim=6, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    if route == "router":
        idx = gates = None
    else:
        if route == "all-on-one":
            e0 = int(torch.randint(num_experts, (1,), generator=g))
            idx = torch.stack([(torch.arange(top_k) + e0) % num_experts for _ in range(b)]) if b else \
                torch.zeros(0, top_k, dtype=torch.int64)
        else:  # every expert busy where the batch allows it
            idx = torch.stack([(torch.arange(top_k) + i) % num_experts for i in range(b)]) if b else \
                torch.zeros(0, top_k, dtype=torch.int64)
        gates = (torch.rand(b, top_k, generator=g, dtype=torch.float64) + 0.2)
    fast.eval(), ref.eval()
    with torch.no_grad():
        expected = ref(x, f, s, idx, gates)
    fast32 = fast.float().to(DEVICE)
    xs = [t.float().to(DEVICE).requires_grad_(grads) for t in (x, f, s)]
    idx_d = None if idx is None else idx.to(DEVICE)
    gates_d = None if gates is None else gates.float().to(DEVICE)
    y = run_layer(fast32, xs[0], xs[1], xs[2], idx_d, gates_d)
    assert moce_fast.ops.last_run()["moce_experts"] == "triton"
    assert y.shape == x.shape
    if b == 0:
        return
    assert rel_err(y.cpu(), expected) < TOL32
    if not grads:
        return
    # gradients of every input and parameter against the float64 reference
    weight = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (y.double() * weight.to(DEVICE)).sum().backward()
    xr = [t.clone().requires_grad_() for t in (x, f, s)]
    (ref(xr[0], xr[1], xr[2], idx, gates) * weight).sum().backward()
    # float32 gradients of tiny magnitude (a weight the output barely depends on) are compared on
    # the scale of all the gradients, not their own
    ref_params = dict(ref.named_parameters())
    scale = 1e-4 * max(t.grad.abs().max().item() for t in [*xr, *ref_params.values()] if t.grad is not None)

    def close(got, want, name):
        err = (got.cpu().double() - want).abs().max().item()
        assert err <= 50 * TOL32 * max(want.abs().max().item(), scale), (name, err)

    for name, a, r in zip(["x", "freq_emb", "shared"], xs, xr):
        if r.grad is None:
            assert a.grad is None or torch.count_nonzero(a.grad) == 0, name
        else:
            close(a.grad, r.grad, name)
    for name, p in fast32.named_parameters():
        r = ref_params[name].grad
        if r is None:  # an expert that got no image: no gradient, or zeros
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
        else:
            close(p.grad, r, name)


@pytest.mark.parametrize("route", ["router", "all-on-one", "every-expert"])
def test_triton_layer_matches_reference(route):
    check_case(dim=16, num_experts=4, top_k=1, b=5, h=9, w=13, route=route)


def test_triton_top2_odd_sizes():
    check_case(dim=8, num_experts=3, top_k=2, b=3, h=7, w=5, route="every-expert")


def test_triton_large_patches_cover_the_image():
    # H, W larger than the smaller patches and not multiples of any patch size
    check_case(dim=8, num_experts=4, top_k=1, b=4, h=19, w=35, route="every-expert", grads=False)


def test_triton_empty_batch_and_single_image():
    check_case(dim=8, num_experts=2, top_k=1, b=0, h=5, w=5, route="every-expert")
    check_case(dim=8, num_experts=2, top_k=2, b=1, h=6, w=3, route="every-expert")


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(dim=st.sampled_from([8, 16]), num_experts=st.integers(2, 4), data=st.data(), b=st.integers(0, 3),
       h=st.integers(1, 11), w=st.integers(1, 11), route=st.sampled_from(["router", "all-on-one", "every-expert"]))
def test_triton_random_configs(dim, num_experts, data, b, h, w, route):
    top_k = data.draw(st.integers(1, num_experts))
    # An expert of rank 1 or 2 normalises over one or two channels: rstd = 1/sqrt(eps), or
    # 2/|a1 - a2|, which is unbounded, so its float32 gradients are rounding noise amplified without
    # limit, on every backend. Gradients are compared where every rank is at least 4; the forward
    # is compared always.
    min_rank = dim // 2 ** (num_experts - 1)
    check_case(dim, num_experts, top_k, b, h, w, route, seed=dim + h * 7 + w,
               grads=b > 0 and h * w <= 64 and min_rank >= 4)


def test_triton_rejects_float64():
    fast, _ = make_layers(dim=8, num_experts=2, top_k=1, freq_dim=6)
    x, s, f = layer_inputs(2, dim=8, h=4, w=4, freq_dim=6)
    with pytest.raises(ValueError, match="triton backend takes float32"):
        run_layer(fast.to(DEVICE), x.to(DEVICE), f.to(DEVICE), s.to(DEVICE))


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (the interpreter gets bfloat16 wrong)")
def test_triton_bfloat16_on_gpu():
    fast, ref = make_layers(dim=16, num_experts=4, top_k=1, freq_dim=6)
    x, s, f = layer_inputs(4, dim=16, h=16, w=16, freq_dim=6)
    idx = torch.tensor([[0], [1], [2], [3]])
    gates = torch.full((4, 1), 0.7, dtype=torch.float64)
    with torch.no_grad():
        expected = ref.eval()(x, f, s, idx, gates)
        y = run_layer(fast.eval().to("cuda", torch.bfloat16), *(t.to("cuda", torch.bfloat16) for t in (x, f, s)),
                      idx.cuda(), gates.to("cuda", torch.bfloat16))
    assert rel_err(y.float().cpu(), expected) < 2e-2


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (host syncs and CUDA graphs exist only there)")
def test_triton_forward_has_no_host_sync_and_captures_in_a_cuda_graph():
    fast, _ = make_layers(dim=16, num_experts=4, top_k=2, freq_dim=6)
    layer = fast.eval().float().cuda()
    x, s, f = (t.float().cuda() for t in layer_inputs(4, dim=16, h=16, w=16, freq_dim=6))
    with torch.no_grad(), moce_fast.backend("triton"):
        expected = layer(x, f, s)  # warm-up: compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x, f, s)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x, f, s)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (host syncs exist only there)")
def test_triton_backward_has_no_host_sync():
    fast, _ = make_layers(dim=16, num_experts=4, top_k=2, freq_dim=6)
    layer = fast.float().cuda()
    x, s, f = (t.float().cuda().requires_grad_() for t in layer_inputs(4, dim=16, h=16, w=16, freq_dim=6))
    idx = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]], device="cuda")
    gates = torch.full((4, 2), 0.5, device="cuda")
    with moce_fast.backend("triton"):
        layer(x, f, s, expert_indices=idx, expert_gates=gates).sum().backward()  # warm-up: compiles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x, f, s, expert_indices=idx, expert_gates=gates).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_triton_backward_float32_accuracy():
    """With every rank >= 4 (well-conditioned LayerNorms), every gradient of the Triton backward,
    the routing gates' included, is within float32 accuracy of the float64 reference."""
    fast, ref = make_layers(dim=32, num_experts=4, top_k=2, freq_dim=6, seed=3)
    x, s, f = layer_inputs(3, dim=32, h=9, w=13, freq_dim=6, seed=4)
    idx = torch.tensor([[0, 1], [2, 3], [1, 2]])
    gates = torch.rand(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.2
    fast.eval(), ref.eval()
    f32 = fast.float().to(DEVICE)
    xs = [t.float().to(DEVICE).requires_grad_() for t in (x, s)]
    g32 = gates.float().to(DEVICE).requires_grad_()
    y = run_layer(f32, xs[0], f.float().to(DEVICE), xs[1], idx.to(DEVICE), g32)
    weight = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    (y.double() * weight.to(DEVICE)).sum().backward()
    xr = [t.clone().requires_grad_() for t in (x, s)]
    gr = gates.clone().requires_grad_()
    (ref(xr[0], f, xr[1], idx, gr) * weight).sum().backward()
    tol = 2e-5 if not ON_GPU else 3e-4
    for name, a, r in [("x", xs[0], xr[0]), ("shared", xs[1], xr[1]), ("gates", g32, gr)]:
        assert rel_err(a.grad.cpu(), r.grad) < tol, name
    ref_params = dict(ref.named_parameters())
    for name, p in f32.named_parameters():
        if ref_params[name].grad is not None:
            assert rel_err(p.grad.cpu(), ref_params[name].grad) < tol, name


def test_triton_op_opcheck():
    """The custom op (forward, fake function, autograd with its backward op) passes
    torch.library.opcheck, AOT-autograd tracing of the backward included."""
    import importlib

    M = importlib.import_module("moce_fast.ops.moce_experts")  # the module (ops.moce_experts is the function)
    fast, _ = make_layers(dim=8, num_experts=2, top_k=1, freq_dim=6)
    layer = fast.float().to(DEVICE)
    x, s, _ = (t.float().to(DEVICE) for t in layer_inputs(2, dim=8, h=5, w=4, freq_dim=6))
    plan = moce_fast.routing.make_plan(torch.tensor([[0], [1]], device=DEVICE), torch.full((2, 1), 0.8,
                                       device=DEVICE), 2)
    weights = [t for w in layer.expert_weights() for t in w[:-1]]
    sizes = [w.patch_size for w in layer.expert_weights()]
    args = (x.requires_grad_(), s.requires_grad_(), plan.order, plan.image, plan.gate.requires_grad_(), plan.offsets,
            [w.detach().requires_grad_() for w in weights], sizes, 1)
    torch.library.opcheck(M._moce_experts_triton_op, args)
