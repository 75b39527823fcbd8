"""The backbone kernels (kernels/backbone.py: channel LayerNorm + 1x1, depthwise convs, the GDFN gate,
the transposed channel attention) on the triton backend against float64 references, forward and
every gradient, odd sizes, heads 1 to 8; then the whole MoCE-IR through them. Output and scratch
buffers are NaN-poisoned before every launch.

Without a GPU the kernels run through the Triton interpreter on CPU tensors (float32); with one,
compiled on CUDA tensors (float32 and bfloat16).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import moce_fast
from moce_fast import ops
from moce_fast.ops import attention as attention_ops
from moce_fast.ops import conv as conv_ops
from moce_fast.reference import layers as ref_layers
from conftest import TINY, make_pair, rel_err

# the op functions of the same names shadow these modules as attributes of moce_fast.ops
gdfn_ops = importlib.import_module("moce_fast.ops.gdfn")
ln_ops = importlib.import_module("moce_fast.ops.layer_norm")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytestmark = pytest.mark.skip(reason="no GPU and TRITON_INTERPRET is not 1")
TOL32 = 2e-5  # float32 inputs: the kernels' dots run in tf32x3 (float32 accuracy)
TOL_BF16 = 2e-2


@pytest.fixture(autouse=True)
def _poison():
    moce_fast.ops.set_poison_outputs(True)
    yield
    moce_fast.ops.set_poison_outputs(False)


def rand(*shape, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).requires_grad_(True)


def compare(fn, inputs, *, dtype=torch.float32, tol=TOL32, seed=0):
    """fn(*tensors) on the torch backend in float64 (the reference) and on the triton backend in
    ``dtype`` (on DEVICE): outputs and the gradients of every input from one random upstream gradient."""
    with moce_fast.backend("torch"):
        ref = fn(*inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    fast_in = [t.detach().to(DEVICE, dtype).requires_grad_(True) for t in inputs]
    with moce_fast.backend("triton"):
        fast = fn(*fast_in)
    fast = fast if isinstance(fast, tuple) else (fast,)
    g = torch.Generator().manual_seed(seed + 1)
    ups = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in ref]
    for f, r in zip(fast, ref):
        assert f.dtype == dtype and f.shape == r.shape
        assert rel_err(f.cpu(), r) < tol
    ref_grads = torch.autograd.grad(ref, inputs, ups)
    fast_grads = torch.autograd.grad(fast, fast_in, [u.to(DEVICE, dtype) for u in ups])
    for i, (fg, rg) in enumerate(zip(fast_grads, ref_grads)):
        assert torch.isfinite(fg).all(), f"gradient {i} is not finite"
        assert rel_err(fg.cpu(), rg) < tol * 3, f"gradient {i}: {rel_err(fg.cpu(), rg)}"


# ----------------------------------------------------------------------------- norm + 1x1 maps

@pytest.mark.parametrize("with_bias", [True, False], ids=["WithBias", "BiasFree"])
@pytest.mark.parametrize("b,c,h,w", [(2, 24, 7, 9), (1, 40, 5, 13), (3, 8, 1, 1)])
def test_norm_linear_chains(with_bias, b, c, h, w):
    # two chains: a 1x1 followed by another (the decoder's proj0 -> qkv, folded by triton) and one map
    n1, n2, n3 = 20, 3 * 20, c
    ins = [rand(b, c, h, w, seed=0, scale=2.0, shift=0.5), rand(c, seed=1, scale=0.3, shift=1.0),
           rand(n1, c, 1, 1, seed=2, scale=0.3), rand(n1, seed=3), rand(n2, n1, 1, 1, seed=4, scale=0.3),
           rand(n2, seed=5), rand(n3, c, 1, 1, seed=6, scale=0.3)]
    if with_bias:
        ins.append(rand(c, seed=7, scale=0.3))

    def fn(x, nw, w1, b1, w2, b2, w3, nb=None):
        return ops.norm_linear(x, nw, nb, [[(w1, b1), (w2, b2)], [(w3, None)]])

    compare(fn, ins)
    assert moce_fast.ops.last_run()["norm_linear"] == "triton"


def test_norm_linear_wide_input_spans_many_channel_blocks():
    ins = [rand(2, 100, 6, 6, seed=0), rand(100, seed=1, shift=1.0), rand(70, 100, 1, 1, seed=2, scale=0.1),
           rand(100, seed=3)]
    compare(lambda x, nw, w, nb: ops.norm_linear(x, nw, nb, [[(w, None)]]), ins)


def test_norm_linear_torch_backend_is_the_reference_norm_then_convs():
    x, nw, nb = rand(2, 8, 4, 4, seed=0), rand(8, seed=1), rand(8, seed=2)
    w, b = rand(16, 8, 1, 1, seed=3), rand(16, seed=4)
    with moce_fast.backend("torch"):
        (out,) = ops.norm_linear(x, nw, nb, [[(w, b)]])
    norm = ref_layers.LayerNorm(8).double()
    with torch.no_grad():
        norm.body.weight.copy_(nw)
        norm.body.bias.copy_(nb)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(norm(x), w, b), rtol=1e-12, atol=1e-12)
    torch.autograd.gradcheck(lambda *t: ops.norm_linear(t[0], t[1], t[2], [[(t[3], t[4])]])[0],
                             (x, nw, nb, w, b))


# ----------------------------------------------------------------------------- depthwise, GDFN gate

@pytest.mark.parametrize("ks", [3, 7])
@pytest.mark.parametrize("b,c,h,w", [(2, 6, 5, 9), (1, 20, 17, 3)])
def test_depthwise(ks, b, c, h, w):
    ins = [rand(b, c, h, w, seed=0), rand(c, 1, ks, ks, seed=1), rand(c, seed=2)]
    compare(ops.depthwise, ins)
    assert moce_fast.ops.last_run()["depthwise"] == "triton"


@pytest.mark.parametrize("b,hid,h,w", [(2, 6, 5, 9), (1, 20, 17, 3), (2, 17, 1, 1)])
def test_dw_gate(b, hid, h, w):
    ins = [rand(b, 2 * hid, h, w, seed=0), rand(2 * hid, 1, 3, 3, seed=1, scale=0.5), rand(2 * hid, seed=2)]
    compare(ops.dw_gate, ins)
    assert moce_fast.ops.last_run()["dw_gate"] == "triton"


@pytest.mark.parametrize("b,hid,n,h,w,bias,residual", [(2, 6, 5, 5, 9, True, True), (1, 40, 150, 7, 3, False, True),
                                                       (2, 17, 24, 1, 1, True, False)])
def test_gdfn_tail(b, hid, n, h, w, bias, residual):
    # the gate, project_out and the residual fused (the gated map is never written), and the backward
    ins = [rand(b, 2 * hid, h, w, seed=0), rand(2 * hid, 1, 3, 3, seed=1, scale=0.5), rand(2 * hid, seed=2),
           rand(n, hid, 1, 1, seed=3, scale=0.3)]
    ins += [rand(n, seed=4)] if bias else []
    ins += [rand(b, n, h, w, seed=5)] if residual else []

    def fn(hd, wd, bd, wo, *rest):
        rest = list(rest)
        bo = rest.pop(0) if bias else None
        res = rest.pop(0) if residual else None
        return ops.gdfn_tail(hd, wd, bd, wo, bo, res)

    compare(fn, ins)
    assert moce_fast.ops.last_run()["gdfn_tail"] == "triton"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("memory", ["nchw", "channels_last"])
def test_gdfn_tail_torch_inference_is_gate_conv_plus_residual(memory, bias):
    """The torch backend outside autograd: a channels-last gate map with an NCHW residual runs
    project_out as one GEMM per image with the residual as its addend (float32 on a CPU, the
    path's only device); it equals residual + conv1x1(gate) of the float64 reference, in NCHW."""
    b, hid, n, h, w = 2, 6, 5, 7, 9
    hd, wd, bd = rand(b, 2 * hid, h, w, seed=0), rand(2 * hid, 1, 3, 3, seed=1, scale=0.5), rand(2 * hid, seed=2)
    wo, bo, res = rand(n, hid, 1, 1, seed=3, scale=0.3), rand(n, seed=4) if bias else None, rand(b, n, h, w, seed=5)
    with torch.no_grad():
        x1, x2 = torch.nn.functional.conv2d(hd, wd, bd, padding=1, groups=2 * hid).chunk(2, dim=1)
        expect = res + torch.nn.functional.conv2d(torch.nn.functional.gelu(x1) * x2, wo, bo)
        f32 = [None if t is None else t.detach().float() for t in (hd, wd, bd, wo, bo, res)]
        if memory == "channels_last":
            f32[0] = f32[0].contiguous(memory_format=torch.channels_last)
        with moce_fast.backend("torch"):
            if memory == "channels_last":  # the gate keeps the channels-last layout: the fused path runs
                assert conv_ops.pixel_rows(ops.dw_gate(*f32[:3])) is not None
            out = ops.gdfn_tail(*f32)
    assert out.shape == expect.shape and out.is_contiguous()
    assert rel_err(out, expect) < TOL32


@pytest.mark.parametrize("memory", ["nchw", "channels_last"])
def test_dw_gate_torch_gradients(memory):
    """The torch backend's gate has its own backward (both halves' gradients written into one
    tensor): gradcheck in float64, and equal to autograd of the plain composition."""
    hd, wd, bd = rand(2, 8, 5, 6, seed=0), rand(8, 1, 3, 3, seed=1, scale=0.5), rand(8, seed=2)
    if memory == "channels_last":
        hd = hd.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with moce_fast.backend("torch"):
        torch.autograd.gradcheck(ops.dw_gate, (hd, wd, bd))
        out = ops.dw_gate(hd, wd, bd)
    x1, x2 = torch.nn.functional.conv2d(hd, wd, bd, padding=1, groups=8).chunk(2, dim=1)
    expect = torch.nn.functional.gelu(x1) * x2
    up = rand(*out.shape, seed=3).detach()
    for a, e in zip(torch.autograd.grad(out, (hd, wd, bd), up), torch.autograd.grad(expect, (hd, wd, bd), up)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_dw_gate_without_bias():
    compare(lambda h, w: ops.dw_gate(h, w, None), [rand(2, 8, 6, 7, seed=0), rand(8, 1, 3, 3, seed=1)])


# ----------------------------------------------------------------------------- channel attention

@pytest.mark.parametrize("heads", [1, 2, 3, 8])
@pytest.mark.parametrize("b,h,w", [(2, 7, 9), (1, 1, 5)])
def test_channel_attention(heads, b, h, w):
    c = 24
    ins = [rand(b, 3 * c, h, w, seed=0), rand(heads, 1, 1, seed=1, scale=0.3, shift=1.0)]

    def fn(qkv, t):  # q, k, v are channel slices of one map, read in place
        q, k, v = qkv.chunk(3, dim=1)
        return ops.channel_attention(q, k, v, t, heads)

    compare(fn, ins)
    assert moce_fast.ops.last_run()["channel_attention"] == "triton"


@pytest.mark.parametrize("heads", [1, 3, 8])
@pytest.mark.parametrize("bias,residual", [(False, True), (True, False), (False, False)])
def test_attention_project(heads, bias, residual):
    # residual + project_out(attention): project_out folded into the per-head attention matrices
    b, c, h, w = 2, 24, 5, 7
    ins = [rand(b, 3 * c, h, w, seed=0), rand(heads, 1, 1, seed=1, scale=0.3, shift=1.0),
           rand(16, c, 1, 1, seed=2, scale=0.3)]
    ins += [rand(16, seed=3)] if bias else []
    ins += [rand(b, 16, h, w, seed=4)] if residual else []

    def fn(qkv, t, wp, *rest):
        rest = list(rest)
        bp = rest.pop(0) if bias else None
        res = rest.pop(0) if residual else None
        q, k, v = qkv.chunk(3, dim=1)
        return ops.attention_project(q, k, v, t, heads, wp, bp, res)

    compare(fn, ins)
    assert moce_fast.ops.last_run()["attention_project"] == "triton"


@pytest.mark.parametrize("memory", ["nchw", "channels_last"])
def test_attention_project_torch_is_the_reference_composition(memory):
    """The torch fold equals normalize + attention + 1x1 conv + residual, forward and gradients; on
    channels-last q/k/v (chunks of a channels-last map, as oneDNN's convs give them) it reads them in
    place (per-head GEMMs over strided views)."""
    from moce_fast.reference.layers import transposed_attention

    qkv, t = rand(2, 3 * 12, 4, 5, seed=0), rand(3, 1, 1, seed=1, shift=1.0)
    if memory == "channels_last":
        qkv = qkv.contiguous(memory_format=torch.channels_last).detach().requires_grad_()
        assert ops.attention._pixel_rows(qkv.chunk(3, dim=1)[0]) is not None
    wp, bp, res = rand(12, 12, 1, 1, seed=2), rand(12, seed=3), rand(2, 12, 4, 5, seed=4)
    q, k, v = qkv.chunk(3, dim=1)
    with moce_fast.backend("torch"):
        out = ops.attention_project(q, k, v, t, 3, wp, bp, res)
    expect = res + torch.nn.functional.conv2d(transposed_attention(q, k, v, t, 3), wp, bp)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    # outside autograd the row norms take their own path; a channel of q that is zero everywhere
    # divides by eps there as in F.normalize
    with torch.no_grad():
        qkv0 = qkv.detach().clone(memory_format=torch.preserve_format)
        qkv0[:, 1] = 0.0
        qkv0[:, 12 + 2] = 0.0
        q0, k0, v0 = qkv0.chunk(3, dim=1)
        with moce_fast.backend("torch"):
            out0 = ops.attention_project(q0, k0, v0, t, 3, wp, bp, res)
        expect0 = res + torch.nn.functional.conv2d(transposed_attention(q0, k0, v0, t, 3), wp, bp)
    torch.testing.assert_close(out0, expect0, rtol=1e-12, atol=1e-12)
    # and with gradients (the channels-last path has its own backward): a zero channel of q and of k
    # gets the reference's gradient (the norm clamped at eps, no NaN)
    qkv0.requires_grad_(True)
    args = (t, wp, bp, res)
    with moce_fast.backend("torch"):
        got = torch.autograd.grad(ops.attention_project(*qkv0.chunk(3, dim=1), t, 3, wp, bp, res).square().sum(),
                                  (qkv0, *args))
    exp = torch.autograd.grad((res + torch.nn.functional.conv2d(transposed_attention(*qkv0.chunk(3, dim=1), t, 3),
                                                                wp, bp)).square().sum(), (qkv0, *args))
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)

    def fn(qkv, t, wp, bp, res):
        return ops.attention_project(*qkv.chunk(3, dim=1), t, 3, wp, bp, res)

    with moce_fast.backend("torch"):
        torch.autograd.gradcheck(fn, (qkv, t, wp, bp, res))


def test_channel_attention_long_reduction_split_over_programs():
    # 40 x 40 pixels: 25 blocks of 64 split across pixel groups, then reduced
    ins = [rand(1, 3 * 8, 40, 40, seed=0), rand(2, 1, 1, seed=1, shift=1.0)]
    compare(lambda qkv, t: ops.channel_attention(*qkv.chunk(3, dim=1), t, 2), ins)


def test_channel_attention_zero_row_matches_normalize():
    # a channel that is zero everywhere: F.normalize divides by eps, its gradient path is cut
    qkv = rand(1, 3 * 4, 3, 3, seed=0)
    with torch.no_grad():
        qkv[:, 1] = 0.0
        qkv[:, 4 + 2] = 0.0
    compare(lambda z, t: ops.channel_attention(*z.chunk(3, dim=1), t, 1), [qkv, rand(1, 1, 1, seed=1, shift=1.0)])


def test_head_dim_limit_is_reported():
    q = torch.randn(1, 2 * attention_ops.MAX_HEAD_DIM + 2, 2, 2, device=DEVICE)
    t = torch.ones(2, 1, 1, device=DEVICE)
    with moce_fast.backend("triton"), pytest.raises(moce_fast.BackendUnavailableError, match="channels per head"):
        ops.channel_attention(q, q, q, t, 2)


def test_triton_rejects_float64_clearly():
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64, device=DEVICE)
    with moce_fast.backend("triton"), pytest.raises(moce_fast.BackendUnavailableError, match="float64"):
        ops.dw_gate(x, torch.randn(4, 1, 3, 3, dtype=torch.float64, device=DEVICE), None)


# ----------------------------------------------------------------------------- custom ops

def test_backbone_ops_opcheck():
    x = torch.randn(2, 8, 5, 6, device=DEVICE)
    w = torch.randn(12, 8, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ln_ops._ln_linear_triton_op, (x.requires_grad_(True), w, torch.randn(12, device=DEVICE),
                                                         True, 1e-5))
    taps = torch.randn(8, 9, device=DEVICE, requires_grad=True)
    torch.library.opcheck(conv_ops._depthwise_triton_op, (x, taps, torch.randn(8, device=DEVICE), 3))
    torch.library.opcheck(gdfn_ops._dwgate_triton_op, (x, taps, torch.randn(8, device=DEVICE)))
    torch.library.opcheck(gdfn_ops._gdfn_tail_triton_op, (x, taps, torch.randn(8, device=DEVICE),
                                                          torch.randn(5, 4, device=DEVICE, requires_grad=True),
                                                          torch.randn(5, device=DEVICE, requires_grad=True),
                                                          torch.randn(2, 5, 5, 6, device=DEVICE, requires_grad=True)))
    qkv = torch.randn(2, 24, 5, 6, device=DEVICE, requires_grad=True)
    q, k, v = qkv.chunk(3, dim=1)
    torch.library.opcheck(attention_ops._attention_triton_op,
                          (q, k, v, torch.ones(2, 1, 1, device=DEVICE, requires_grad=True), 2))
    torch.library.opcheck(attention_ops._attention_matrices_op,
                          (q, k, torch.ones(2, 1, 1, device=DEVICE, requires_grad=True), 2))


# ----------------------------------------------------------------------------- the whole model

def _router_noise(monkeypatch):
    """The routers' training noise from one CPU generator, whatever device the model is on, so the
    float64 CPU reference and the model under test route alike."""
    g = torch.Generator().manual_seed(5)
    monkeypatch.setattr(torch, "randn_like", lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t))


def test_whole_model_inference_and_training_match_the_reference(monkeypatch):
    fast, ref = make_pair(TINY, seed=3, dtype=torch.float64)
    fast = fast.float().to(DEVICE)
    x = torch.rand(2, 3, 13, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), moce_fast.backend("triton"):
        out = fast(x.float().to(DEVICE))
    with torch.no_grad():
        expect = ref(x)
    assert rel_err(out.cpu(), expect) < 5e-5
    ran = moce_fast.ops.last_run()
    for op in ("norm_linear", "depthwise", "gdfn_tail", "attention_project", "moce_experts"):
        assert ran[op] == "triton", (op, ran)
    # training (noisy routing, batch statistics of nothing: the model has no BatchNorm): every gradient
    fast.train()
    ref.train()
    _router_noise(monkeypatch)
    with moce_fast.backend("triton"):
        y = fast(x.float().to(DEVICE))
        loss_fast = (y.double().cpu() * torch.linspace(-1, 1, y.numel()).reshape(y.shape).double()).sum()
        loss_fast = loss_fast + fast.aux_loss.double().cpu()
    _router_noise(monkeypatch)
    y_ref = ref(x)
    loss_ref = (y_ref * torch.linspace(-1, 1, y_ref.numel()).reshape(y_ref.shape).double()).sum() + ref.aux_loss
    names = [n for n, _ in ref.named_parameters()]
    g_fast = torch.autograd.grad(loss_fast, list(fast.parameters()), allow_unused=True)
    g_ref = torch.autograd.grad(loss_ref, list(ref.parameters()), allow_unused=True)
    for name, gf, gr in zip(names, g_fast, g_ref):
        if gr is None:
            assert gf is None or not gf.abs().any(), name
            continue
        assert gf is not None, name
        assert rel_err(gf.cpu(), gr) < 5e-4, (name, rel_err(gf.cpu(), gr))


@pytest.mark.skipif(not ON_GPU, reason="bfloat16 kernels need a CUDA device (the interpreter computes bf16 wrongly)")
def test_backbone_bfloat16_on_gpu():
    ins = [rand(2, 48, 33, 31, seed=0), rand(48, seed=1, shift=1.0), rand(144, 48, 1, 1, seed=2, scale=0.2),
           rand(48, seed=3)]
    compare(lambda x, nw, w, nb: ops.norm_linear(x, nw, nb, [[(w, None)]]), ins, dtype=torch.bfloat16,
            tol=TOL_BF16)
    compare(ops.dw_gate, [rand(2, 96, 33, 31, seed=0), rand(96, 1, 3, 3, seed=1, scale=0.5), rand(96, seed=2)],
            dtype=torch.bfloat16, tol=TOL_BF16)
    compare(lambda qkv, t: ops.channel_attention(*qkv.chunk(3, dim=1), t, 2),
            [rand(2, 3 * 96, 33, 31, seed=0), rand(2, 1, 1, seed=1, shift=1.0)], dtype=torch.bfloat16, tol=TOL_BF16)
    compare(lambda qkv, t, wp, res: ops.attention_project(*qkv.chunk(3, dim=1), t, 2, wp, None, res),
            [rand(2, 3 * 96, 33, 31, seed=0), rand(2, 1, 1, seed=1, shift=1.0), rand(96, 96, 1, 1, seed=2, scale=0.1),
             rand(2, 96, 33, 31, seed=3)], dtype=torch.bfloat16, tol=TOL_BF16)
    compare(lambda hd, wd, wo: ops.gdfn_tail(hd, wd, None, wo, None),
            [rand(2, 192, 33, 31, seed=0), rand(192, 1, 3, 3, seed=1, scale=0.5), rand(96, 96, 1, 1, seed=2, scale=0.1)],
            dtype=torch.bfloat16, tol=TOL_BF16)


@pytest.mark.skipif(not ON_GPU, reason="bfloat16 kernels need a CUDA device (the interpreter computes bf16 wrongly)")
def test_whole_model_bfloat16_on_gpu():
    from conftest import SMALL

    fast, ref = make_pair(SMALL, seed=11, dtype=torch.float64)
    x = torch.rand(2, 3, 40, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(x)
        with moce_fast.backend("triton"):
            got = fast.to(DEVICE, torch.bfloat16)(x.to(DEVICE, torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert rel_err(got.cpu(), expected) < 5e-2
    ran = moce_fast.ops.last_run()
    assert all(ran[op] == "triton" for op in ("norm_linear", "depthwise", "gdfn_tail", "attention_project"))


def test_float32_dot_precision_follows_torch_setting():
    from moce_fast.kernels import adapter as ak

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert ak.precision(torch.float32) == ak.adapter_precision(torch.float32) == "tf32x3"
        assert ak.adapter_precision(torch.bfloat16) == ak.adapter_precision(torch.float16) == "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert ak.precision(torch.float32) == ak.adapter_precision(torch.float32) == "tf32"
        assert ak.precision(torch.bfloat16) == "tf32"
        # the adapter's narrow hosts keep float32-accurate products (kernels.adapter.adapter_precision:
        # the head feeds the ill-conditioned global branch), whatever torch's float32 setting
        assert ak.adapter_precision(torch.bfloat16) == ak.adapter_precision(torch.float16) == "tf32x3"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (host syncs exist only there)")
def test_backbone_blocks_have_no_host_sync_on_gpu():
    from moce_fast.nn import EncoderBlock

    enc = EncoderBlock(32, 2, 2.66, False, "WithBias").cuda()
    dec = moce_fast.MoCEBlock(32, num_heads=2, freq_dim=None).cuda().eval()
    x = torch.randn(2, 32, 24, 20, device="cuda", requires_grad=True)

    def step():
        dec(enc(x)).square().mean().backward()

    with moce_fast.backend("triton"):
        step()  # warm-up: compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ran = moce_fast.ops.last_run()
    assert all(ran[op] == "triton" for op in ("norm_linear", "depthwise", "gdfn_tail", "attention_project"))


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (CUDA graphs exist only there)")
def test_whole_model_forward_captures_in_a_cuda_graph():
    from conftest import SMALL

    fast, _ = make_pair(SMALL, seed=2, dtype=torch.float32)
    fast = fast.cuda().eval()
    x = torch.rand(2, 3, 32, 32, device="cuda")
    with torch.no_grad(), moce_fast.backend("triton"):
        expected = fast(x)  # warm-up: compiles every kernel
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fast(x)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_empty_batch_on_every_backbone_op():
    x = torch.randn(0, 8, 5, 6, device=DEVICE)
    with moce_fast.backend("triton"):
        (y,) = ops.norm_linear(x, torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE),
                               [[(torch.randn(12, 8, 1, 1, device=DEVICE), None)]])
        assert y.shape == (0, 12, 5, 6)
        assert ops.depthwise(x, torch.randn(8, 1, 3, 3, device=DEVICE), None).shape == (0, 8, 5, 6)
        out = ops.gdfn_tail(x, torch.randn(8, 1, 3, 3, device=DEVICE), None, torch.randn(6, 4, 1, 1, device=DEVICE),
                            None, torch.randn(0, 6, 5, 6, device=DEVICE))
        assert out.shape == (0, 6, 5, 6)
        qkv = torch.randn(0, 24, 5, 6, device=DEVICE)
        out = ops.attention_project(*qkv.chunk(3, dim=1), torch.ones(2, 1, 1, device=DEVICE), 2,
                                    torch.randn(8, 8, 1, 1, device=DEVICE))
        assert out.shape == (0, 8, 5, 6)
    ran = moce_fast.ops.last_run()
    assert all(ran[op] == "triton" for op in ("norm_linear", "depthwise", "gdfn_tail", "attention_project"))
